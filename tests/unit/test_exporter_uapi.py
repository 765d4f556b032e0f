"""vmlab/exporter_uapi.py against the C header, through tools/uapi_dump.c."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from vmlab import exporter_uapi as U

ROOT = Path(__file__).resolve().parents[2]
EXP = ROOT / "host-tools" / "vmlab-exporter"


@pytest.fixture(scope="module")
def c_dump(tmp_path_factory) -> dict[str, int]:
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    out = tmp_path_factory.mktemp("uapi") / "uapi_dump"
    r = subprocess.run(["gcc", "-O0", "-Wall", "-Werror", "-I", str(EXP / "include" / "uapi"),
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


def test_ioc_encoding():
    # _IOR(0xB7, 0, struct vmlab_abi): direction read=2 in bits 30-31
    assert U.IOC_ABI >> 30 == 2
    assert (U.IOC_CREATE >> 8) & 0xFF == 0xB7
    assert (U.IOC_CREATE >> 16) & 0x3FFF == U.CREATE.size
    assert U.IOC_PTE & 0xFF == 5
