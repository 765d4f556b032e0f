"""Where a kernel comes from: a Debian suite, the user's .debs, or the user's build tree.

    trixie            Debian's kernel of that suite (a KERNEL_SUITES key)
    deb:PATH          a linux-image .deb, or a directory of .debs (image, headers, the
                      headers' -common and kbuild packages), installed over a base suite
    tree:DIR          a kernel build tree after ``make``: arch/x86/boot/bzImage, .config,
                      Module.symvers, modules.order and the modules

The image cache key hashes what the user brought (every .deb; the tree's bzImage,
.config, Module.symvers and modules), so a rebuilt kernel gets a fresh image and an
unchanged one is reused. Checks that concern the input (a path that does not exist, no
image .deb) are ConfigError (exit 2); checks that concern the kernel under test (a
.config without KVM) are CouldNotTest (exit 125, ``git bisect run`` skips the commit).
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, CouldNotTest

#: kernel choice -> (base suite, suite the kernel comes from); a --qemu suite is one of them
KERNEL_SUITES = {
    "trixie": ("trixie", "trixie"),                         # 6.12, QEMU 10.0
    "trixie-backports": ("trixie", "trixie-backports"),     # 7.3, QEMU 11.1
    "bookworm-backports": ("bookworm", "bookworm-backports"),  # 6.12, QEMU 10.0
    "bullseye": ("bullseye", "bullseye"),                   # 5.10, QEMU 5.2
    "bookworm": ("bookworm", "bookworm"),                   # 6.1, QEMU 7.2
    "forky": ("forky", "forky"),                            # 7.2
}
#: Testing suites: their archive index carries a Valid-Until a week ahead, and the archive
#: this machine reaches served forky's expired by 19 days (measured 2026-11-26). Only for
#: them apt is told not to check it; signatures are still checked.
TESTING_SUITES = ("forky",)
#: Debian release number -> suite, as the kernel ABI names it (linux-image-7.2.12+deb14-amd64)
_DEB_RELEASE = {"11": "bullseye", "12": "bookworm", "13": "trixie", "14": "forky"}
#: The base a user kernel goes on when nothing says otherwise.
DEFAULT_BASE = "trixie"

#: What a lab kernel must have (y or m): the lab boots from virtio-blk, talks over
#: virtio-net, mounts its share over 9p, runs guests under KVM on the emulated AMD CPU,
#: loads the exporter module (a dma-buf exporter). Missing one stops the run (exit 125).
LAB_REQUIRED = ("CONFIG_MODULES", "CONFIG_BLK_DEV_INITRD", "CONFIG_PCI", "CONFIG_VIRTIO_PCI",
                "CONFIG_VIRTIO_BLK", "CONFIG_EXT4_FS", "CONFIG_VIRTIO_NET", "CONFIG_NET_9P",
                "CONFIG_NET_9P_VIRTIO", "CONFIG_9P_FS", "CONFIG_SERIAL_8250_CONSOLE",
                "CONFIG_DEVTMPFS", "CONFIG_KVM", "CONFIG_KVM_AMD", "CONFIG_DMA_SHARED_BUFFER")
#: What must be off: a kernel that only loads signed modules refuses the exporter.
LAB_FORBIDDEN = ("CONFIG_MODULE_SIG_FORCE",)
#: What some experiments need; without it they are not applicable (the lab says so at
#: run time too: /dev/udmabuf, a system heap, vgem), never a failure.
LAB_OPTIONAL = {"CONFIG_UDMABUF": "exporter kind udmabuf",
                "CONFIG_DMABUF_HEAPS_SYSTEM": "exporter kind heap",
                "CONFIG_DRM_VGEM": "exporter kind vgem",
                "CONFIG_TRANSPARENT_HUGEPAGE": "HUGE_PMD buffers"}
#: A guest kernel boots from our initramfs with virtio devices only.
GUEST_REQUIRED = ("CONFIG_MODULES", "CONFIG_BLK_DEV_INITRD", "CONFIG_PCI", "CONFIG_VIRTIO_PCI",
                  "CONFIG_VIRTIO_NET", "CONFIG_SERIAL_8250_CONSOLE", "CONFIG_DEVTMPFS")
GUEST_OPTIONAL = {"CONFIG_DRM_VIRTIO_GPU": "a guest GPU (guest.gpu)",
                  "CONFIG_HOTPLUG_PCI_PCIE": "a buffer hot-plugged into a running guest"}


@dataclass(frozen=True)
class KernelSource:
    form: str                     # "suite" | "deb" | "tree"
    spec: str                     # as the user wrote it (deb:/tree: with an absolute path)
    suite: str                    # the base suite (a KERNEL_SUITES key)
    path: Path | None = None      # the .deb, the directory of .debs, or the tree
    digest: str | None = None     # content hash of what the user brought
    debs: tuple = ()              # deb: the .deb files, sorted
    release: str | None = None    # tree: include/config/kernel.release; deb: the image's ABI
    base_why: str = ""            # how the base suite was chosen, for the progress line
    config_missing_optional: tuple = field(default=(), compare=False)
    source_dir: Path | None = None  # tree: built with make O=: the source the build dir includes

    @property
    def user(self) -> bool:
        return self.form != "suite"


def deb_fields(path: Path) -> dict:
    """Package, Version and Architecture of one .deb (dpkg-deb -f)."""
    try:
        out = subprocess.run(["dpkg-deb", "-f", str(path), "Package", "Version", "Architecture"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        raise ConfigError(str(path), "", f"not a readable .deb ({e})") from None
    return dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)


def _digest(files, root: Path | None = None) -> str:
    h = hashlib.sha256()
    for p in files:
        h.update((str(p.relative_to(root)) if root else p.name).encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()[:16]


def base_from_debs(fields: list[dict]) -> str | None:
    """The suite a Debian kernel .deb was built for, from its ABI name and version
    (7.2.12+deb14 is forky's; 7.3.4-1~bpo13+1 is trixie-backports'), or None."""
    for f in fields:
        if not f.get("Package", "").startswith("linux-image-"):
            continue
        bpo = re.search(r"~bpo(\d+)", f.get("Version", ""))
        if bpo and bpo.group(1) in ("12", "13"):
            return f"{_DEB_RELEASE[bpo.group(1)]}-backports"
        deb = re.search(r"\+deb(\d+)-", f["Package"])
        if deb and deb.group(1) in _DEB_RELEASE:
            return _DEB_RELEASE[deb.group(1)]
    return None


def _parse_deb(spec: str, where: tuple[str, str], base: str | None, kind: str) -> KernelSource:
    p = Path(os.path.abspath(spec[len("deb:"):] or "."))
    if p.is_dir():
        debs = sorted(x for x in p.iterdir() if x.suffix == ".deb" and x.is_file())
    elif p.is_file() and p.suffix == ".deb":
        debs = [p]
    else:
        raise ConfigError(*where, f"{spec}: no such .deb file or directory")
    if not debs:
        raise ConfigError(*where, f"{spec}: the directory holds no .deb")
    fields = [deb_fields(d) for d in debs]
    # what `make bindeb-pkg` leaves beside the kernel and no lab runs: the debug image
    # (hundreds of MB) and the userspace headers
    keep = [i for i, f in enumerate(fields) if not (f.get("Package", "").endswith(("-dbg", "-dbgsym"))
                                                   or f.get("Package") == "linux-libc-dev")]
    debs, fields = [debs[i] for i in keep], [fields[i] for i in keep]
    if not debs:
        raise ConfigError(*where, f"{spec}: only debug and libc-dev .debs, no kernel")
    bad = [f"{d.name} ({f.get('Architecture')})" for d, f in zip(debs, fields)
           if f.get("Architecture") not in ("amd64", "all")]
    if bad:
        raise ConfigError(*where, f"{spec}: not amd64: {', '.join(bad)}")
    names = [f.get("Package", "") for f in fields]
    images = [n for n in names if re.match(r"linux-image-\d", n)]
    if not images:
        raise ConfigError(*where, f"{spec}: no linux-image-<version> .deb among {', '.join(names)}")
    if len(images) > 1:
        raise ConfigError(*where, f"{spec}: more than one kernel image: {', '.join(images)}")
    release = re.sub(r"^linux-image-", "", images[0]).removesuffix("-unsigned")
    if kind == "lab" and not any(n == f"linux-headers-{release}" for n in names):
        raise ConfigError(*where, f"{spec}: no linux-headers-{release} .deb: the lab builds the "
                                  f"exporter module against it (add it, with its -common and "
                                  f"linux-kbuild packages)")
    inferred = base_from_debs(fields)
    chosen = base or inferred or DEFAULT_BASE
    why = ("given" if base else f"inferred from {images[0]}" if inferred
           else f"the default ({images[0]} names no Debian release)")
    return KernelSource("deb", f"deb:{p}", chosen, p, _digest(debs), tuple(debs), release,
                        base_why=why)


def config_options(config: Path) -> dict[str, str]:
    """CONFIG_X -> value of a kernel .config (unset options are absent)."""
    out = {}
    for line in config.read_text(errors="replace").splitlines():
        m = re.match(r"(CONFIG_\w+)=(.*)", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def check_config(opts: dict[str, str], kind: str, where: str) -> tuple[str, ...]:
    """Stop (CouldNotTest, exit 125) when the kernel under test lacks what the lab or the
    guest needs, naming every missing option in one line; return the missing optional
    options (experiments that need them are not applicable)."""
    required = LAB_REQUIRED if kind == "lab" else GUEST_REQUIRED
    missing = [o for o in required if opts.get(o) not in ("y", "m")]
    on = [o for o in LAB_FORBIDDEN if opts.get(o) == "y"] if kind == "lab" else []
    if missing or on:
        parts = []
        if missing:
            parts.append(f"lacks {', '.join(missing)}")
        if on:
            parts.append(f"has {', '.join(on)}=y (the exporter module is not signed)")
        raise CouldNotTest(f"{where}: the {kind} kernel {' and '.join(parts)}")
    optional = LAB_OPTIONAL if kind == "lab" else GUEST_OPTIONAL
    return tuple(f"{o} ({what})" for o, what in optional.items() if opts.get(o) not in ("y", "m"))


#: where an x86 boot image has its setup header's magic (Documentation/arch/x86/boot.rst)
BZIMAGE_MAGIC_AT = 0x202

TREE_FILES = ("arch/x86/boot/bzImage", ".config", "Module.symvers", "modules.order",
              "include/config/kernel.release")


def tree_modules(tree: Path) -> list[Path]:
    """The built modules modules.order lists (paths as .o in newer trees, .ko in older)."""
    out = []
    for line in (tree / "modules.order").read_text().split():
        ko = tree / re.sub(r"\.o$", ".ko", line.removeprefix("kernel/"))
        if not ko.is_file():
            raise CouldNotTest(f"{tree}: modules.order lists {line} but {ko} was not built "
                               f"(run make modules)")
        out.append(ko)
    return out


def install_tree_modules(tree: Path, modules_dir: Path, release: str) -> int:
    """Put a tree's modules into an image root where ``make modules_install`` would
    (lib/modules/RELEASE/kernel/..., modules.order, modules.builtin*), as built: a tree
    need not be set up to sign or compress, and nothing in it is written. Returns the
    number of modules; the caller runs depmod."""
    import shutil
    mdir = modules_dir / release
    order = []
    for ko in tree_modules(tree):
        rel = ko.relative_to(tree)
        (mdir / "kernel" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ko, mdir / "kernel" / rel)
        order.append(f"kernel/{rel}")
    mdir.mkdir(parents=True, exist_ok=True)
    (mdir / "modules.order").write_text("".join(f"{o}\n" for o in order))
    for name in ("modules.builtin", "modules.builtin.modinfo"):
        src = tree / name
        (mdir / name).write_bytes(src.read_bytes() if src.is_file() else b"")
    return len(order)


def _parse_tree(spec: str, where: tuple[str, str], base: str | None, kind: str) -> KernelSource:
    t = Path(os.path.abspath(spec[len("tree:"):] or "."))
    if not t.is_dir():
        raise ConfigError(*where, f"{spec}: no such directory")
    # make O=DIR: the build's outputs in DIR, whose Makefile includes the source's by its
    # absolute path and whose 'source' link points there; the exporter is built in DIR
    src = (t / "source").resolve() if (t / "source").is_dir() else t
    if src == t:
        src_why = "no Makefile and scripts/Makefile.build"
    else:
        src_why = f"its source link points to {src}, which has no Makefile and scripts/Makefile.build"
    if not (t / "Makefile").is_file() or not (src / "Makefile").is_file() or \
            not (src / "scripts/Makefile.build").is_file():
        raise ConfigError(*where, f"{spec}: not a kernel tree ({src_why})")
    if not (t / ".config").is_file():
        raise ConfigError(*where, f"{spec}: no .config (configure and build the tree first)")
    opts = config_options(t / ".config")
    optional = check_config(opts, kind, f"{t}/.config")
    missing = [f for f in TREE_FILES if not (t / f).is_file()]
    if missing:
        # configured but not (completely) built: the commit under test did not build
        raise CouldNotTest(f"{t}: not built: no {', '.join(missing)} (run make)")
    release = (t / "include/config/kernel.release").read_text().strip()
    with open(t / "arch/x86/boot/bzImage", "rb") as f:
        f.seek(BZIMAGE_MAGIC_AT)
        if f.read(4) != b"HdrS":
            # the build under test made something that is no kernel: found before an image
            # is built around it
            raise CouldNotTest(f"{t}/arch/x86/boot/bzImage: not an x86 boot image "
                               f"(no 'HdrS' setup header at {BZIMAGE_MAGIC_AT:#x})")
    files = [t / f for f in ("arch/x86/boot/bzImage", ".config", "Module.symvers")]
    files += tree_modules(t)
    return KernelSource("tree", f"tree:{t}", base or DEFAULT_BASE, t, _digest(files, t),
                        release=release, base_why="given" if base else "the default",
                        config_missing_optional=optional, source_dir=src if src != t else None)


@dataclass(frozen=True)
class QemuSource:
    """The lab's QEMU (the VMM under test): the base suite's, another suite's, the user's
    .debs, or the user's build directory (qemu-system-x86_64 and pc-bios/)."""
    form: str                     # "default" | "suite" | "deb" | "build"
    spec: str
    suite: str | None = None      # suite: the suite it comes from
    path: Path | None = None
    digest: str | None = None
    debs: tuple = ()

    @property
    def user(self) -> bool:
        return self.form in ("deb", "build")


#: what a build directory brings into the lab image: the binary, its firmware
QEMU_BUILD_BINARY = "qemu-system-x86_64"


@functools.lru_cache(maxsize=16)
def parse_qemu(spec: str, where: tuple[str, str]) -> QemuSource:
    if spec == "default":
        return QemuSource("default", spec)
    if spec.startswith("suite:"):
        return QemuSource("suite", spec, spec[len("suite:"):])
    if spec.startswith("deb:"):
        p = Path(os.path.abspath(spec[len("deb:"):] or "."))
        debs = sorted(x for x in p.iterdir() if x.suffix == ".deb") if p.is_dir() else \
            [p] if p.is_file() and p.suffix == ".deb" else None
        if debs is None:
            raise ConfigError(*where, f"{spec}: no such .deb file or directory")
        names = [deb_fields(d).get("Package") for d in debs]
        if "qemu-system-x86" not in names:
            raise ConfigError(*where, f"{spec}: no qemu-system-x86 .deb among {', '.join(map(str, names)) or 'none'}")
        return QemuSource("deb", f"deb:{p}", path=p, digest=_digest(debs), debs=tuple(debs))
    if spec.startswith("build:"):
        d = Path(os.path.abspath(spec[len("build:"):] or "."))
        binary = d / QEMU_BUILD_BINARY
        if not d.is_dir():
            raise ConfigError(*where, f"{spec}: no such directory")
        if not (d / "pc-bios").is_dir():
            raise ConfigError(*where, f"{spec}: not a QEMU build directory (no pc-bios/)")
        if not (binary.is_file() and os.access(binary, os.X_OK)):
            # configured, not built: the commit under test did not build
            raise CouldNotTest(f"{spec}: no executable {QEMU_BUILD_BINARY} (run make)")
        files = [binary] + sorted(p for p in (d / "pc-bios").rglob("*") if p.is_file()) \
            + sorted(p for p in d.glob("*.so") if p.is_file())      # --enable-modules
        return QemuSource("build", f"build:{d}", path=d, digest=_digest(files, d))
    raise ConfigError(*where, f"{spec!r}: default, suite:NAME, deb:PATH or build:DIR")


@functools.lru_cache(maxsize=32)
def parse(spec: str, where: tuple[str, str], *, base: str | None = None,
          kind: str = "lab") -> KernelSource:
    """The kernel ``spec`` names; ``where`` (file, key) for the one-line error. Cached in
    this process: a deb: or tree: source is hashed once per command."""
    if base is not None and base not in KERNEL_SUITES:
        raise ConfigError(*where, f"base suite {base!r}: one of {', '.join(KERNEL_SUITES)}")
    if spec.startswith("deb:"):
        return _parse_deb(spec, where, base, kind)
    if spec.startswith("tree:"):
        return _parse_tree(spec, where, base, kind)
    if spec not in KERNEL_SUITES:
        raise ConfigError(*where, f"unknown kernel {spec!r}: a suite ({', '.join(KERNEL_SUITES)}), "
                                  f"deb:PATH or tree:DIR")
    if base is not None:
        raise ConfigError(*where, f"a base suite applies to deb: and tree: kernels; {spec} "
                                  f"brings its own")
    return KernelSource("suite", spec, spec)
