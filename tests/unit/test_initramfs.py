"""vmlab/initramfs.py: the newc writer (checked with the system cpio), the module closure,
module decompression and ELF library discovery."""
from __future__ import annotations

import lzma
import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.prereq import need_tools

from vmlab import initramfs
from vmlab.errors import InfraError
from vmlab.initramfs import Cpio

KVER = "6.0.0"


def extract(data: bytes, dest: Path) -> None:
    need_tools("cpio")
    dest.mkdir()
    r = subprocess.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames"], input=data, cwd=dest,
                       capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr.decode()


def test_cpio_newc_extracts(tmp_path):
    c = Cpio()
    c.file("init", b"#!/bin/sh\necho hi\n", 0o755)
    c.file("/etc/deep/er/conf.txt", b"x" * 4097, 0o600)
    c.file("empty", b"")
    for n in range(1, 8):  # every padding remainder of name and data
        c.file(f"pad/{'n' * n}", b"d" * n)
    c.mkdir("proc")
    c.mkdir("a/b/c", 0o700)
    c.symlink("bin/sh", "busybox")
    c.symlink("lib64", "/usr/lib64")
    c.file("init", b"duplicate ignored", 0o644)
    data = c.bytes()
    assert data.startswith(b"070701")
    assert len(data) % 4 == 0
    assert b"TRAILER!!!\0" in data
    out = tmp_path / "x"
    extract(data, out)
    assert (out / "init").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert stat.S_IMODE((out / "init").stat().st_mode) == 0o755
    assert (out / "etc/deep/er/conf.txt").read_bytes() == b"x" * 4097
    assert stat.S_IMODE((out / "etc/deep/er/conf.txt").stat().st_mode) == 0o600
    assert (out / "etc/deep/er").is_dir()
    assert (out / "empty").read_bytes() == b""
    for n in range(1, 8):
        assert (out / "pad" / ("n" * n)).read_bytes() == b"d" * n
    assert (out / "proc").is_dir()
    assert (out / "a/b/c").is_dir()
    assert stat.S_IMODE((out / "a/b/c").stat().st_mode) == 0o700
    assert stat.S_IMODE((out / "pad").stat().st_mode) == 0o755  # implicit parent
    assert (out / "bin/sh").is_symlink() and os.readlink(out / "bin/sh") == "busybox"
    assert os.readlink(out / "lib64") == "/usr/lib64"
    assert (out / "bin").is_dir() and not (out / "bin").is_symlink()


def test_cpio_parent_dirs_precede_children():
    c = Cpio()
    c.file("x/y/z", b"1")
    data = c.bytes()
    assert data.index(b"x\0") < data.index(b"x/y\0") < data.index(b"x/y/z\0")


def test_cpio_listing(tmp_path):
    need_tools("cpio")
    c = Cpio()
    c.file("a/f", b"1")
    c.symlink("l", "a/f")
    r = subprocess.run(["cpio", "-t", "--quiet"], input=c.bytes(), capture_output=True, timeout=30)
    assert r.returncode == 0
    assert r.stdout.decode().split() == ["a", "a/f", "l"]


def test_write_gzip(tmp_path):
    import gzip
    c = Cpio()
    c.file("hello", b"world")
    initramfs.write(c, tmp_path / "initrd.img")
    assert not (tmp_path / "initrd.tmp").exists()
    data = gzip.decompress((tmp_path / "initrd.img").read_bytes())
    extract(data, tmp_path / "x")
    assert (tmp_path / "x/hello").read_bytes() == b"world"


# --- modules ---------------------------------------------------------------------------
@pytest.fixture
def modtree(tmp_path) -> Path:
    root = tmp_path / "root"
    md = root / "lib" / "modules" / KVER
    (md / "kernel/drivers").mkdir(parents=True)
    mods = {
        "kernel/drivers/a-mod.ko.xz": ["kernel/drivers/b_mod.ko.xz"],
        "kernel/drivers/b_mod.ko.xz": ["kernel/drivers/c.ko.xz"],
        "kernel/drivers/c.ko.xz": [],
        "kernel/drivers/d.ko.xz": ["kernel/drivers/c.ko.xz"],
        "kernel/drivers/lonely.ko.xz": [],
    }
    for rel in mods:
        (md / rel).write_bytes(lzma.compress(f"ELF:{rel}".encode()))
    (md / "modules.dep").write_text("".join(f"{k}: {' '.join(v)}\n" for k, v in mods.items()))
    (md / "modules.builtin").write_text("kernel/drivers/builtin_x.ko\n")
    return root


def test_module_closure_deps_first(modtree):
    got = initramfs.module_closure(modtree, KVER, ["a-mod"])
    assert got == ["kernel/drivers/c.ko.xz", "kernel/drivers/b_mod.ko.xz", "kernel/drivers/a-mod.ko.xz"]


def test_module_closure_dash_underscore_and_unknown(modtree):
    got = initramfs.module_closure(modtree, KVER, ["a_mod", "nonexistent", "builtin_x", "d", "b-mod"])
    assert got == ["kernel/drivers/c.ko.xz", "kernel/drivers/b_mod.ko.xz",
                   "kernel/drivers/a-mod.ko.xz", "kernel/drivers/d.ko.xz"]


def test_module_closure_nothing(modtree):
    assert initramfs.module_closure(modtree, KVER, ["nonexistent"]) == []


def test_kernel_version(modtree):
    assert initramfs.kernel_version(modtree) == KVER


def test_add_modules(modtree, tmp_path):
    c = Cpio()
    names = initramfs.add_modules(c, modtree, KVER, ["a-mod", "missing"])
    assert names == ["c", "b_mod", "a-mod"]
    out = tmp_path / "x"
    extract(c.bytes(), out)
    md = out / "lib" / "modules" / KVER
    assert (md / "kernel/drivers/c.ko").read_bytes() == b"ELF:kernel/drivers/c.ko.xz"
    assert (md / "kernel/drivers/b_mod.ko").read_bytes() == b"ELF:kernel/drivers/b_mod.ko.xz"
    assert (md / "kernel/drivers/a-mod.ko").read_bytes() == b"ELF:kernel/drivers/a-mod.ko.xz"
    assert not list(md.rglob("*.xz"))
    assert not (md / "kernel/drivers/d.ko").exists()
    dep = (md / "modules.dep").read_text().splitlines()
    assert dep == ["kernel/drivers/c.ko: ",
                   "kernel/drivers/b_mod.ko: kernel/drivers/c.ko",
                   "kernel/drivers/a-mod.ko: kernel/drivers/b_mod.ko"]
    assert (md / "modules.builtin").read_text() == "kernel/drivers/builtin_x.ko\n"


def test_add_modules_gz_and_plain(tmp_path):
    import gzip
    root = tmp_path / "root"
    md = root / "lib" / "modules" / KVER
    md.mkdir(parents=True)
    (md / "g.ko.gz").write_bytes(gzip.compress(b"GZ"))
    (md / "p.ko").write_bytes(b"PLAIN")
    (md / "modules.dep").write_text("g.ko.gz: p.ko\np.ko:\n")
    (md / "modules.builtin").write_text("")
    c = Cpio()
    assert initramfs.add_modules(c, root, KVER, ["g"]) == ["p", "g"]
    extract(c.bytes(), tmp_path / "x")
    xm = tmp_path / "x" / "lib" / "modules" / KVER
    assert (xm / "g.ko").read_bytes() == b"GZ"
    assert (xm / "p.ko").read_bytes() == b"PLAIN"
    assert (xm / "modules.dep").read_text() == "p.ko: \ng.ko: p.ko\n"


def _module_object(path: Path, depends: str) -> bytes:
    """A real ELF object with a .modinfo section, as modpost leaves in a .ko."""
    need_tools("gcc")
    src = path.with_suffix(".c")
    src.write_text(f'__attribute__((section(".modinfo"), used)) static const char '
                   f'info[] = "license=GPL\\0depends={depends}\\0name={path.stem}";\n')
    subprocess.run(["gcc", "-c", "-o", str(path), str(src)], check=True, timeout=60)
    return path.read_bytes()


def test_add_modules_without_modules_dep_reads_modinfo(tmp_path):
    """An extracted kernel (the guest image) has no modules.dep: the closure comes from
    the modules' own depends=, transitively, and the cpio's modules.dep is depmod's."""
    root = tmp_path / "root"
    md = root / "lib" / "modules" / KVER
    (md / "kernel/a").mkdir(parents=True)
    (md / "kernel/b").mkdir(parents=True)
    objs = {"kernel/a/top-mod.ko.xz": "mid,base_mod", "kernel/b/mid.ko.xz": "base_mod",
            "kernel/a/base-mod.ko.xz": "", "kernel/b/other.ko.xz": "mid"}
    for rel, depends in objs.items():
        (md / rel).write_bytes(lzma.compress(_module_object(tmp_path / Path(rel).name.split(".")[0],
                                                            depends)))
    (md / "modules.builtin").write_text("")
    c = Cpio()
    assert initramfs.add_modules(c, root, KVER, ["top_mod", "absent"]) == ["base-mod", "mid", "top-mod"]
    assert not (md / "modules.dep").exists()     # nothing written into the tree
    extract(c.bytes(), tmp_path / "x")
    xm = tmp_path / "x" / "lib" / "modules" / KVER
    assert (xm / "modules.dep").read_text().splitlines() == [
        "kernel/a/base-mod.ko: ", "kernel/b/mid.ko: kernel/a/base-mod.ko",
        "kernel/a/top-mod.ko: kernel/b/mid.ko kernel/a/base-mod.ko"]
    assert not (xm / "kernel/b/other.ko").exists()


def test_a_name_in_updates_wins_over_the_kernels_as_depmod_has_it(tmp_path):
    md = tmp_path / "root" / "lib" / "modules" / KVER
    for d in ("kernel/drivers", "updates", "extra"):
        (md / d).mkdir(parents=True)
    (md / "kernel/drivers/twin.ko").write_bytes(_module_object(tmp_path / "twin", ""))
    (md / "extra/twin.ko").write_bytes(_module_object(tmp_path / "twin", ""))
    (md / "updates/twin.ko").write_bytes(_module_object(tmp_path / "twin", ""))
    assert initramfs.module_closure(tmp_path / "root", KVER, ["twin"]) == ["updates/twin.ko"]
    (md / "updates/twin.ko").unlink()
    assert initramfs.module_closure(tmp_path / "root", KVER, ["twin"]) == ["extra/twin.ko"]


def test_a_module_needing_an_absent_one_is_an_error(tmp_path):
    md = tmp_path / "root" / "lib" / "modules" / KVER
    md.mkdir(parents=True)
    (md / "lone.ko").write_bytes(_module_object(tmp_path / "lone", "gone"))
    with pytest.raises(initramfs.InfraError, match="lone.ko needs gone"):
        initramfs.add_modules(Cpio(), tmp_path / "root", KVER, ["lone"])


# --- ELF --------------------------------------------------------------------------------
def test_needed_libs_host_ls():
    libs = initramfs.needed_libs(Path("/"), "bin/ls")
    names = [os.path.basename(p) for p in libs]
    assert "libc.so.6" in names
    assert any(n.startswith("ld-linux") for n in names), libs
    assert all(not p.startswith("/") for p in libs)
    assert len(libs) == len(set(libs))
    assert libs[0] == "lib64/ld-linux-x86-64.so.2"  # PT_INTERP first, as the ELF names it
    for p in libs:
        assert (Path("/") / p).exists(), p


def test_needed_libs_python():
    import sys
    exe = os.path.realpath(sys.executable).lstrip("/")
    libs = initramfs.needed_libs(Path("/"), exe)
    assert any(os.path.basename(p) == "libc.so.6" for p in libs)


def test_resolve_absolute_symlink_inside_root(tmp_path):
    (tmp_path / "usr/lib").mkdir(parents=True)
    (tmp_path / "usr/lib/real").write_text("x")
    (tmp_path / "lib").symlink_to("/usr/lib")  # absolute: relative to the tree, not the host
    assert initramfs._resolve(tmp_path, "lib/real") == tmp_path / "usr/lib/real"
    (tmp_path / "loop").symlink_to("loop")
    with pytest.raises(InfraError, match="symlink loop at loop"):
        initramfs._resolve(tmp_path, "loop")


def parse_newc_strict(data: bytes) -> list[tuple[str, int, bytes]]:
    """A strict newc reader: every header must start exactly where padding says it does."""
    out, off = [], 0
    while True:
        assert data[off:off + 6] == b"070701", (off, data[off:off + 16])
        f = [int(data[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, namesize = f[1], f[6], f[11]
        assert f[12] == 0  # check field
        name_end = off + 110 + namesize
        name = data[off + 110:name_end - 1].decode()
        assert data[name_end - 1] == 0
        doff = (name_end + 3) & ~3
        assert data[name_end:doff] == b"\0" * (doff - name_end)
        body = data[doff:doff + filesize]
        nxt = (doff + filesize + 3) & ~3
        assert data[doff + filesize:nxt] == b"\0" * (nxt - doff - filesize)
        if name == "TRAILER!!!":
            assert nxt == len(data)
            return out
        out.append((name, mode, body))
        off = nxt


def test_cpio_strict_layout():
    c = Cpio()
    for n in range(0, 9):
        c.file(f"f{'x' * n}", b"y" * n, 0o640)
    c.symlink("s", "target")
    entries = parse_newc_strict(c.bytes())
    assert [e[0] for e in entries] == [f"f{'x' * n}" for n in range(9)] + ["s"]
    for n, (name, mode, body) in enumerate(entries[:9]):
        assert body == b"y" * n
        assert mode == stat.S_IFREG | 0o640
    assert entries[9][1] == stat.S_IFLNK | 0o777 and entries[9][2] == b"target"
