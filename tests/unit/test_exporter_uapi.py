"""vmlab/exporter_uapi.py against the C header, through tools/uapi_dump.c: every ioctl
number, constant, struct size and field offset."""
from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest

from tests.prereq import need_tools

from vmlab import exporter_uapi as U

ROOT = Path(__file__).resolve().parents[2]
EXP = ROOT / "host-tools" / "vmlab-exporter"
HEADER = EXP / "include" / "uapi" / "vmlab_exporter.h"


def _gcc():
    need_tools("gcc")


@pytest.fixture(scope="module")
def c_dump(tmp_path_factory) -> dict[str, int]:
    _gcc()
    out = tmp_path_factory.mktemp("uapi") / "uapi_dump"
    r = subprocess.run(["gcc", "-O0", "-Wall", "-Wextra", "-Werror", "-I", str(EXP / "include" / "uapi"),
                        "-o", str(out), str(EXP / "tools" / "uapi_dump.c")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([str(out)], capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    d: dict[str, int] = {}
    for line in r.stdout.splitlines():
        name, value = line.split()
        assert name not in d, f"duplicate {name}"
        d[name] = int(value)
    assert d, "uapi_dump printed nothing"
    return d


def test_same_names(c_dump):
    py = U.dump_names()
    assert sorted(set(c_dump) - set(py)) == [], "in C header, missing from Python"
    assert sorted(set(py) - set(c_dump)) == [], "in Python, missing from C header"


def test_same_values(c_dump):
    py = U.dump_names()
    diff = {k: (c_dump[k], py.get(k)) for k in c_dump if c_dump[k] != py.get(k)}
    assert diff == {}


def test_dump_equal(c_dump):
    assert c_dump == U.dump_names()


def test_every_struct_field_is_dumped(c_dump):
    """The dump tool lists an offset for every field the Python mirror knows, so a field
    added on one side only shows up as a missing name, not as a silent shift."""
    for cname, (_, names) in U.STRUCTS.items():
        for n in names:
            assert f"offsetof_{cname}_{n}" in c_dump, (cname, n)


def test_header_has_no_implicit_padding(tmp_path):
    """gcc -Wpadded on every struct of the header: no hole, no tail padding."""
    _gcc()
    src = tmp_path / "pad.c"
    src.write_text("#include <vmlab_exporter.h>\n" +
                   "".join(f"struct {c} v_{c};\n" for c in U.STRUCTS))
    r = subprocess.run(["gcc", "-c", "-Wpadded", "-Werror", "-I", str(HEADER.parent),
                        "-o", str(tmp_path / "pad.o"), str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("cname", sorted(U.STRUCTS))
def test_natural_alignment(cname):
    st, names = U.STRUCTS[cname]
    codes = st.format[1:] if isinstance(st.format, str) else st.format.decode()[1:]
    offs = U.offsets(st, names)
    for n, c in zip(names, codes):
        assert offs[n] % struct.calcsize(c) == 0, (cname, n)
    assert st.size % max(struct.calcsize(c) for c in codes) == 0


def test_ioc_encoding():
    # _IOR(0xBB, 0, struct vmlab_abi): direction read=2 in bits 30-31
    assert U.IOC_ABI >> 30 == 2
    assert (U.IOC_CREATE >> 8) & 0xFF == 0xBB
    assert (U.IOC_CREATE >> 16) & 0x3FFF == U.CREATE.size
    assert U.IOC_PTE & 0xFF == 5
    assert U.ABI_VERSION == 5


def test_magic_is_not_nsfs_or_remoteproc():
    """0xB7 belongs to nsfs and remoteproc_cdev (ioctl-number.rst): ABI 1 collided."""
    assert U.IOC_MAGIC != 0xB7


def test_pack_unpack_by_name():
    b = U.pack(U.MOVE_S, U.MOVE_FIELDS, fd=7, mode=U.MOVE["ZAP_ONLY"], caching=U.CACHING_KEEP)
    assert len(b) == U.MOVE_S.size == 40
    assert U.unpack(U.MOVE_S, U.MOVE_FIELDS, b) == {
        "fd": 7, "mode": 3, "caching": 0xFFFFFFFF, "flags": 0, "generation": 0,
        "first_page": 0, "page_count": 0}
    with pytest.raises(KeyError):
        U.pack(U.MOVE_S, U.MOVE_FIELDS, id=1)
    r = U.pack(U.RELEASE, U.RELEASE_FIELDS, id=3, max_generation=2, flags=U.RELEASE_FORCE)
    assert U.unpack(U.RELEASE, U.RELEASE_FIELDS, r)["flags"] == 1
    assert U.offsets(U.INFO, U.INFO_FIELDS)["pmd_faults"] == U.INFO.size - 8
