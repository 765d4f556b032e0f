"""A QEMU build-directory layout (qemu-system-x86_64 and pc-bios/) assembled from Debian's
QEMU .debs, for the build: lab test: building QEMU takes most of an hour on 2 cores, and
what vmlab reads of a build directory is the binary and its firmware."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def assemble(debs: list[Path], out: Path) -> Path:
    x = out.parent / (out.name + ".x")
    shutil.rmtree(x, ignore_errors=True)
    x.mkdir(parents=True)
    for d in debs:
        for deb in sorted(d.glob("*.deb")):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(x)], check=True, timeout=300)
    (out / "pc-bios").mkdir(parents=True)
    shutil.copy2(x / "usr/bin/qemu-system-x86_64", out / "qemu-system-x86_64")
    # Debian spreads the firmware over packages and links it into /usr/share/qemu; a
    # build tree has it all in pc-bios/
    for top in ("usr/share/seabios", "usr/share/qemu"):
        for f in sorted((x / top).rglob("*")) if (x / top).is_dir() else ():
            target = f.resolve() if not f.is_symlink() else (f.parent / f.readlink())
            if f.is_symlink() and str(f.readlink()).startswith("/"):
                target = x / str(f.readlink()).lstrip("/")
            if target.is_file():
                dst = out / "pc-bios" / f.relative_to(x / top)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(target, dst)
    shutil.rmtree(x)
    return out
