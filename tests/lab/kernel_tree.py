"""A kernel build-tree layout assembled from a Debian kernel's .debs, for the tree: lab
test: building a kernel takes hours on 2 cores, and what vmlab reads of a tree is its
layout (bzImage, .config, Module.symvers, modules.order and the modules, the Kbuild files
an external module builds against), which Debian's image and headers packages hold."""
from __future__ import annotations

import lzma
import os
import shutil
import subprocess
from pathlib import Path


def _merge(src: Path, dst: Path, skip=()) -> None:
    """Copy src's tree into dst, following symlinks (Debian's headers link into kbuild)."""
    for entry in src.iterdir():
        if entry.name in skip:
            continue
        target = dst / entry.name
        if entry.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            _merge(entry, target)
        else:
            shutil.copy2(entry, target, follow_symlinks=True)


def assemble(debs: Path, out: Path, *, drop_options=(), source: Path | None = None) -> Path:
    """``out`` laid out as a built tree of the kernel in ``debs`` (image, headers, -common,
    kbuild); ``drop_options`` are unset in its .config (a tree that lacks them). With
    ``source``, as built with ``make O=out`` from a source tree at ``source``: Debian's
    per-flavour headers are that layout already (a Makefile that includes the source's by
    its absolute path), with the kernel's 'source' link added."""
    x = out.parent / (out.name + ".x")
    shutil.rmtree(x, ignore_errors=True)
    x.mkdir(parents=True)
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(x)], check=True, timeout=300)
    arch_hdr = next(p for p in (x / "usr/src").iterdir() if p.name.endswith("-amd64"))
    common = next(p for p in (x / "usr/src").iterdir() if p.name.endswith("-common"))
    kbuild = next(p for p in (x / "usr/lib").iterdir() if p.name.startswith("linux-kbuild-"))
    release = (arch_hdr / "include/config/kernel.release").read_text().strip()
    out.mkdir(parents=True)
    top = source or out
    top.mkdir(parents=True, exist_ok=True)
    _merge(common, top)
    _merge(kbuild, top)
    # the per-flavour part last: .config, Module.symvers, generated headers; its Makefile
    # only includes -common's by absolute path, which the tree has in its own top
    _merge(arch_hdr, out, skip=("Makefile", "scripts", "tools"))
    if source is not None:
        (out / "Makefile").write_text(f"include {source.resolve()}/Makefile\n")
        for link in ("source", "scripts", "tools"):
            (out / link).symlink_to(source.resolve() / ("" if link == "source" else link))
    (out / "arch/x86/boot").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(x / "boot" / f"vmlinuz-{release}", out / "arch/x86/boot/bzImage")
    mods = x / "usr/lib/modules" / release
    order = []
    for line in (mods / "modules.order").read_text().split():
        rel = line.removeprefix("kernel/")
        src = mods / "kernel" / rel
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.exists():
            shutil.copyfile(src, dst)
        else:   # Debian ships them xz-compressed; a build tree has them plain
            with lzma.open(str(src) + ".xz") as f:
                dst.write_bytes(f.read())
        order.append(rel[:-len(".ko")] + ".o")
    (out / "modules.order").write_text("".join(f"{o}\n" for o in order))
    for name in ("modules.builtin", "modules.builtin.modinfo"):
        shutil.copyfile(mods / name, out / name)
    if drop_options:
        cfg = out / ".config"
        lines = [ln for ln in cfg.read_text().splitlines()
                 if not any(ln.startswith(f"{o}=") for o in drop_options)]
        cfg.write_text("\n".join(lines + [f"# {o} is not set" for o in drop_options]) + "\n")
    shutil.rmtree(x)
    os.sync()
    return out
