"""Build small initramfs images from a Debian tree: busybox, chosen binaries with their
shared libraries, a closure of kernel modules, and vmlab's init scripts.

Written in Python rather than with initramfs-tools so that the lab and the guest boot the
same tiny, predictable userspace in a few seconds even under TCG.
"""
from __future__ import annotations

import gzip
import io
import lzma
import os
import stat
import subprocess
from pathlib import Path

from elftools.elf.elffile import ELFFile

from .errors import InfraError

LIB_DIRS = ("usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu", "usr/lib64", "lib64", "usr/lib")


class Cpio:
    """A cpio "newc" archive written entry by entry (what the kernel unpacks)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1
        self.names: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", nlink: int = 1) -> None:
        name = name.strip("/")
        if name in self.names:
            return
        self.names.add(name)
        nb = name.encode() + b"\0"
        hdr = b"070701" + b"".join(f"{v:08x}".encode() for v in (
            self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(nb), 0))
        self.ino += 1
        self.buf.write(hdr + nb)
        self.buf.write(b"\0" * ((4 - (len(hdr) + len(nb)) % 4) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * ((4 - len(data) % 4) % 4))

    def mkdir(self, name: str, mode: int = 0o755) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            self._entry("/".join(parts[:i]), stat.S_IFDIR | mode, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        parent = os.path.dirname(name.strip("/"))
        if parent:
            self.mkdir(parent)
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        parent = os.path.dirname(name.strip("/"))
        if parent:
            self.mkdir(parent)
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def bytes(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def _resolve(root: Path, rel: str) -> Path:
    """Follow symlinks inside ``root`` (absolute links are relative to the tree). A tree that
    was only extracted (no base-files) lacks the /lib -> /usr/lib links: look in usr/ too."""
    p = root / rel.lstrip("/")
    if not p.exists() and not p.is_symlink() and (root / "usr" / rel.lstrip("/")).exists():
        p = root / "usr" / rel.lstrip("/")
    for _ in range(40):
        if not p.is_symlink():
            return p
        target = os.readlink(p)
        p = (root / target.lstrip("/")) if target.startswith("/") else (p.parent / target)
    raise InfraError(f"symlink loop at {rel} in {root}")


def needed_libs(root: Path, binary: str) -> list[str]:
    """Paths (relative to root) of the ELF interpreter and every DT_NEEDED library, recursively."""
    out, missing = _needed(root, binary)
    if missing:
        raise InfraError(f"{binary} needs {missing[0]}, not found in {root}")
    return out


def missing_libs(root: Path, binary: str) -> list[str]:
    """The DT_NEEDED libraries of ``binary`` (and of its libraries) that ``root`` lacks."""
    return _needed(root, binary)[1]


def _needed(root: Path, binary: str) -> tuple[list[str], list[str]]:
    out: list[str] = []
    missing: list[str] = []
    todo = [binary]
    seen = set()
    while todo:
        rel = todo.pop()
        with open(_resolve(root, rel), "rb") as f:
            elf = ELFFile(f)
            for seg in elf.iter_segments():
                if seg.header.p_type == "PT_INTERP":
                    interp = seg.get_interp_name().lstrip("/")
                    if interp not in seen:
                        seen.add(interp)
                        out.append(interp)
            dyn = elf.get_section_by_name(".dynamic")
            names = [t.needed for t in dyn.iter_tags("DT_NEEDED")] if dyn else []
        for name in names:
            if name in seen:
                continue
            seen.add(name)
            for d in LIB_DIRS:
                if (root / d / name).exists():
                    out.append(f"{d}/{name}")
                    todo.append(f"{d}/{name}")
                    break
            else:
                missing.append(name)
    return out, missing


def modules_root(root: Path) -> Path:
    return _resolve(root, "lib/modules")


def kernel_version(root: Path) -> str:
    vers = sorted(p.name for p in modules_root(root).iterdir() if (p / "modules.builtin").exists())
    if len(vers) != 1:
        raise InfraError(f"expected one kernel in {root}/lib/modules, found {vers}")
    return vers[0]


def depmod(root: Path, kver: str) -> None:
    mroot = modules_root(root)
    subprocess.run(["depmod", "-b", str(mroot.parent.parent), kver], check=True,
                   capture_output=True, env=dict(os.environ, PATH="/usr/sbin:/sbin:" + os.environ.get("PATH", "")))


def _module_name(path: str) -> str:
    return os.path.basename(path).split(".ko")[0].replace("-", "_")


def _search_rank(rel: str) -> int:
    return 0 if rel.startswith("updates/") else 1 if rel.startswith("extra/") else 2


def _modinfo_depends(data: bytes) -> list[str]:
    """The modules a module needs, by name, as modpost wrote them into its .modinfo
    (``depends=``): what depmod would put in modules.dep for it."""
    sec = ELFFile(io.BytesIO(data)).get_section_by_name(".modinfo")
    for entry in (sec.data().split(b"\0") if sec is not None else ()):
        if entry.startswith(b"depends="):
            return [n.replace("-", "_") for n in entry[len(b"depends="):].decode().split(",") if n]
    return []


def _module_deps(moddir: Path, names: list[str]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """({module path: [paths it needs]}, {module name: path}), paths relative to
    ``moddir``. From modules.dep where depmod made one; an extracted (not installed)
    kernel has none, and depmod -a reads every module of it (6 s for Debian's): then
    only ``names`` and what they need are read, from their own .modinfo."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    if (moddir / "modules.dep").exists():
        for line in (moddir / "modules.dep").read_text().splitlines():
            path, _, rest = line.partition(":")
            deps[path] = rest.split()
            by_name[_module_name(path)] = path
        return deps, by_name
    for dirpath, _, files in os.walk(moddir):
        for f in files:
            if ".ko" in f:
                rel = os.path.relpath(os.path.join(dirpath, f), moddir)
                # one name in two places: depmod's order, updates/ and extra/ first
                if _module_name(rel) not in by_name or _search_rank(rel) < _search_rank(by_name[_module_name(rel)]):
                    by_name[_module_name(rel)] = rel
    todo = _roots(by_name, names)
    while todo:
        path = todo.pop()
        if path in deps:
            continue
        needs = _modinfo_depends(_decompressed(moddir / path))
        missing = [n for n in needs if n not in by_name]
        if missing:
            raise InfraError(f"{path} needs {', '.join(missing)}, which {moddir} does not have")
        deps[path] = [by_name[n] for n in needs]
        todo.extend(deps[path])
    # modules.dep lists every module a module needs, the last to be loaded first (as
    # depmod writes it): a loader that does not recurse loads them from the end
    return {p: _load_order(deps, [p])[-2::-1] for p in deps}, by_name


def _load_order(deps: dict[str, list[str]], paths: list[str]) -> list[str]:
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for d in deps.get(path, []):
            visit(d)
        order.append(path)

    for p in paths:
        visit(p)
    return order


def _roots(by_name: dict[str, str], names: list[str]) -> list[str]:
    """The files of ``names`` that are modules; the others are assumed built in
    (modules.builtin) or absent, and skipped."""
    return [by_name[n] for n in (x.replace("-", "_") for x in names) if n in by_name]


def module_closure(root: Path, kver: str, names: list[str]) -> list[str]:
    """Module files (relative to /lib/modules/<kver>) needed for ``names``, deps first."""
    deps, by_name = _module_deps(modules_root(root) / kver, names)
    return _load_order(deps, _roots(by_name, names))


def _decompressed(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        return subprocess.run(["zstd", "-dc", str(path)], check=True, capture_output=True).stdout
    return data


def add_modules(cpio: Cpio, root: Path, kver: str, names: list[str]) -> list[str]:
    """Add modules (uncompressed, so busybox modprobe can load them) and a modules.dep."""
    moddir = modules_root(root) / kver
    full, by_name = _module_deps(moddir, names)
    files = _load_order(full, _roots(by_name, names))
    dep_lines = []

    def plain(p: str) -> str:
        return p.split(".ko")[0] + ".ko"

    for rel in files:
        cpio.file(f"lib/modules/{kver}/{plain(rel)}", _decompressed(moddir / rel))
        dep_lines.append(f"{plain(rel)}: " + " ".join(plain(d) for d in full.get(rel, [])))
    cpio.file(f"lib/modules/{kver}/modules.dep", ("\n".join(dep_lines) + "\n").encode())
    for extra in ("modules.builtin", "modules.alias"):
        if (moddir / extra).exists():
            cpio.file(f"lib/modules/{kver}/{extra}", (moddir / extra).read_bytes())
    return [os.path.basename(f).split(".ko")[0] for f in files]


def add_binary(cpio: Cpio, root: Path, rel: str, dest: str | None = None) -> None:
    """A binary from the tree plus every library it needs."""
    cpio.file(dest or rel, _resolve(root, rel).read_bytes(), 0o755)
    try:
        libs = needed_libs(root, rel)
    except Exception as e:  # static binaries have no .dynamic; anything else is real
        if "static" in str(e):
            libs = []
        else:
            raise
    for lib in libs:
        cpio.file(lib, _resolve(root, lib).read_bytes(), 0o755)


def add_busybox(cpio: Cpio, root: Path) -> None:
    """busybox-static with the applets the init scripts use as symlinks in /bin."""
    cpio.file("bin/busybox", _resolve(root, "bin/busybox").read_bytes(), 0o755)
    for applet in ("sh", "mount", "umount", "mkdir", "cat", "echo", "ip", "modprobe", "insmod",
                   "switch_root", "poweroff", "reboot", "sleep", "ls", "grep", "sed", "chmod",
                   "ln", "mknod", "hostname", "dmesg", "uname", "ps", "kill", "dd", "hexdump",
                   "head", "tail", "cut", "tr", "wc", "rm", "cp", "mv", "sync", "init", "env",
                   "true", "false", "test", "[", "awk", "date", "stat", "lsmod", "setsid",
                   "touch", "find", "xargs", "printf", "id", "seq", "timeout", "md5sum", "od"):
        cpio.symlink(f"bin/{applet}", "busybox")
    cpio.symlink("sbin", "bin")


def write(cpio: Cpio, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    with gzip.open(tmp, "wb", compresslevel=6) as f:
        f.write(cpio.bytes())
    tmp.rename(path)

