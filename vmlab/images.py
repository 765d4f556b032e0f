"""Lab-host and guest images, built from Debian packages with mmdebstrap.

An image lives in ``<cache>/vmlab/images/<kind>-<key>/`` where ``key`` hashes the recipe
and every input file; ``manifest.json`` records sha256 of each artifact, the suite and
the package versions. A directory that has a manifest is complete (it is renamed into
place only when finished), so a warm build is a lookup.

    lab:   vmlinuz, initrd.img (tiny, ours), rootfs.img (ext4: kernel, headers, QEMU,
           python3, dropbear, the vmlab-exporter module built against this kernel)
    guest: vmlinuz, initramfs.img (busybox, dropbear, virtio modules, guest agent)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import initramfs, kernel_source
from .config import KERNEL_SUITES
from .errors import CommandFailed, ConfigError, CouldNotTest, ImageMissing, NotRoot, UserError
from .kernel_source import KernelSource, QemuSource
from .paths import images_dir, locked, repo_root, sha256_file

log = logging.getLogger("vmlab.images")

# Bump when the way images are assembled changes in a way the inputs below don't show.
RECIPE_VERSION = 3
MIRROR = "http://deb.debian.org/debian"

LAB_PACKAGES = [
    "linux-image-amd64", "linux-headers-amd64", "qemu-system-x86", "kmod", "busybox-static",
    "python3", "dropbear-bin", "gcc", "make", "libc6-dev",
    # what a test box has, for the lab as one (lab.kind ssh in tests/lab/test_box.py):
    # dkms, and procps for the box's own undo (pkill, pgrep)
    "dkms", "procps",
    # vmlab itself, for the lab as lab.kind local (tests/lab/test_box.py): its Python
    # dependencies from Debian; qemu.qmp, which Debian does not package, is copied in
    # (Recipe.vendored)
    "python3-paramiko", "python3-yaml", "python3-jsonschema", "python3-pyelftools",
    "python3-jinja2", "python3-matplotlib", "python3-rich",
    # matplotlib's fonttools needs python3-scipy | python3-munkres: munkres (a small
    # module) spares the cold build scipy's 100 MiB and 4 s of setup
    "python3-munkres",
    # virtio-gpu-gl host blobs: QEMU's OpenGL module, EGL and Mesa's software renderer.
    "qemu-system-modules-opengl", "libegl1", "libegl-mesa0", "libgl1-mesa-dri", "libgbm1", "libgl1",
]
LAB_INITRD_MODULES = ["virtio_pci", "virtio_blk", "ext4", "crc32c_generic", "crc32c_intel"]

# suites whose QEMU has no separate OpenGL module package (bullseye's 5.2 and
# bookworm's 7.2: virtio-gpu-gl is built in or absent; host blobs need a newer QEMU)
_NO_OPENGL_MODULE = {"bullseye", "bookworm"}


def lab_packages(qemu_suite: str) -> tuple:
    """The lab image's packages, for the suite its QEMU comes from."""
    if qemu_suite in _NO_OPENGL_MODULE:
        return tuple(p for p in LAB_PACKAGES if p != "qemu-system-modules-opengl")
    return tuple(LAB_PACKAGES)


GUEST_PACKAGES = ["linux-image-amd64", "busybox-static", "dropbear-bin"]
GUEST_MODULES = ["virtio_pci", "virtio_net", "virtio_blk", "virtio_console", "virtio_rng",
                 "virtio_gpu", "drm", "drm_kms_helper"]

LAB_INPUTS = ["guest-images/lab", "host-tools/vmlab-exporter", "host-tools/vmm-align",
              "vmlab/initramfs.py"]
GUEST_INPUTS = ["guest-images/guest", "guest-images/agent", "host-tools/vmlab-exporter/include",
                "vmlab/initramfs.py"]
_SKIP_SUFFIXES = (".o", ".ko", ".mod", ".mod.c", ".cmd", ".symvers", ".order", ".pyc",
                  # prose decides no byte of an image: a README's edit rebuilt the lab image
                  # (70 s) and its snapshots
                  ".md")


@dataclass(frozen=True)
class Recipe:
    kind: str                       # "lab" | "guest"
    kernel: str = "trixie"          # a KERNEL_SUITES key
    packages: tuple = ()
    modules: tuple = ()
    inputs: tuple = ()
    mirror: str = MIRROR
    version: int = RECIPE_VERSION
    qemu_suite: str | None = None   # lab: QEMU from this suite instead of the kernel's
    # the user's kernel ("deb:<digest>" | "tree:<digest>"): what it is, by content; the
    # source itself (paths) does not shape the key, so a moved tree keeps its image
    user_kernel: str | None = None
    user_qemu: str | None = None    # lab: "deb:<digest>" | "build:<digest>", as user_kernel
    vendored: str | None = None     # lab: the pure-Python package copied in ("qemu.qmp==V")
    source: KernelSource | None = field(default=None, compare=False, repr=False)
    qemu_source: QemuSource | None = field(default=None, compare=False, repr=False)

    @property
    def suites(self) -> tuple[str, str]:
        return KERNEL_SUITES[self.kernel]

    @property
    def label(self) -> str:
        """How image names and messages call the kernel: the suite, or deb-/tree-<digest>."""
        return self.user_kernel.replace(":", "-") if self.user_kernel else self.kernel

    def fields(self) -> dict:
        """The recipe as JSON: what shapes the image (not where the user's kernel lies)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in ("source", "qemu_source")}
        fields = json.loads(json.dumps(fields))   # tuples as lists, as asdict() gave
        for optional in ("qemu_suite", "user_kernel", "user_qemu", "vendored"):
            if fields[optional] is None:
                del fields[optional]   # images from before these options keep their keys
        return fields

    def key(self) -> str:
        # everything that decides the bytes: recipe fields, apt sources and pins, inputs
        fields = self.fields()
        # the lab's dpkg options shape its bytes (eatmydata's hooks do not)
        dpkg = _LAB_DPKG_ARGS if self.kind == "lab" else []
        h = hashlib.sha256(json.dumps([fields, _sources(self), _apt_args(self)] + ([dpkg] if dpkg else []),
                                      sort_keys=True).encode())
        root = repo_root()
        for rel in self.inputs:
            for path in sorted(_walk(root / rel)):
                h.update(str(path.relative_to(root)).encode() + b"\0")
                h.update(path.read_bytes())
        return h.hexdigest()[:16]


def _walk(p: Path):
    if p.is_file():
        yield p
        return
    for dirpath, dirnames, files in os.walk(p):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in files:
            if not f.endswith(_SKIP_SUFFIXES) and not f.startswith("."):
                yield Path(dirpath) / f


_TREE_BUILD_PACKAGES = ("dwarves",)
#: where a build:DIR QEMU lives in the lab image (customize.sh puts it there)
QEMU_BUILD_DIR = "opt/vmlab-qemu"
#: the packages that bring Debian's kernel: a user kernel replaces them
_DEBIAN_KERNEL = ("linux-image-amd64", "linux-headers-amd64")


def recipe(kind: str, kernel: str = "trixie", qemu: str | None = None,
           base: str | None = None) -> Recipe:
    """The image recipe for ``kernel`` (a suite, deb:PATH or tree:DIR, see
    vmlab.kernel_source; ``base`` the suite a user kernel goes on) with the lab's QEMU
    ``qemu`` (default, suite:NAME, deb:PATH, build:DIR, or a bare suite name)."""
    if kind not in ("lab", "guest"):
        raise ConfigError("<command line>", "image", f"unknown image kind {kind!r} (lab or guest)")
    if qemu and qemu != "default" and ":" not in qemu:
        qemu = f"suite:{qemu}"
    qsrc = kernel_source.parse_qemu(qemu or "default", ("<command line>", "--qemu"))
    qemu_suite = qsrc.suite
    src = kernel_source.parse(kernel, ("<command line>", "--kernel" if kind == "lab" else
                                       "--guest-kernel"), base=base, kind=kind)
    suite = src.suite
    user = f"{src.form}:{src.digest}" if src.user else None
    if kind == "lab":
        if qemu_suite == KERNEL_SUITES[suite][1]:
            qemu_suite = None   # the kernel's own suite already brings its QEMU: one image
        pkgs = lab_packages(qemu_suite or KERNEL_SUITES[suite][1])
        inputs = LAB_INPUTS
    else:
        pkgs, inputs = tuple(GUEST_PACKAGES), GUEST_INPUTS
    if user:
        pkgs = tuple(p for p in pkgs if p not in _DEBIAN_KERNEL)
        if src.form == "tree" and kind == "lab":
            # what building a module against a tree needs beyond gcc and make (Debian's
            # linux-kbuild brings it for deb:): pahole for BTF of modules
            pkgs += _TREE_BUILD_PACKAGES
    modules = LAB_INITRD_MODULES if kind == "lab" else GUEST_MODULES
    lab_qemu = qsrc if kind == "lab" and qsrc.user else None
    if lab_qemu and lab_qemu.form == "deb":
        # the user's QEMU .debs replace the suite's (apt installs them with what they need)
        pkgs = tuple(p for p in pkgs if p not in ("qemu-system-x86", "qemu-system-modules-opengl"))
    return Recipe(kind, suite, pkgs, tuple(modules), tuple(inputs),
                  qemu_suite=qemu_suite if kind == "lab" else None, user_kernel=user,
                  user_qemu=f"{lab_qemu.form}:{lab_qemu.digest}" if lab_qemu else None,
                  vendored=f"qemu.qmp=={_qemu_qmp()[1]}" if kind == "lab" else None,
                  source=src, qemu_source=lab_qemu)


def _qemu_qmp() -> tuple[Path, str]:
    """Where this vmlab's qemu.qmp lies and its version: the lab image carries a copy."""
    import importlib.metadata

    import qemu.qmp
    return Path(qemu.qmp.__file__).parent, importlib.metadata.version("qemu.qmp")


@dataclass
class Image:
    kind: str
    path: Path
    manifest: dict = field(default_factory=dict)

    def artifact(self, name: str) -> Path:
        return self.path / name

    @property
    def kernel_release(self) -> str:
        return self.manifest.get("kernel_release", "?")


def image_dir(r: Recipe) -> Path:
    qemu = f"-qemu-{r.qemu_suite}" if r.qemu_suite else \
        f"-qemu-{r.user_qemu.replace(':', '-')}" if r.user_qemu else ""
    base = f"-on-{r.kernel}" if r.user_kernel else ""
    return images_dir() / f"{r.kind}-{r.label}{base}{qemu}-{r.key()}"


def find(r: Recipe) -> Image | None:
    d = image_dir(r)
    m = d / "manifest.json"
    if m.exists():
        return Image(r.kind, d, json.loads(m.read_text()))
    return None


def require(r: Recipe) -> Image:
    img = find(r)
    if img is None:
        qemu = f" --qemu suite:{r.qemu_suite}" if r.qemu_suite else \
            f" --qemu {r.qemu_source.spec}" if r.qemu_source else ""
        kernel = r.source.spec if r.source else r.kernel
        base = f" --lab-base {r.kernel}" if r.user_kernel else ""
        raise ImageMissing(f"{r.kind} image ({kernel}{qemu}) is not built: expected {image_dir(r)}; "
                           f"run 'vmlab images build {r.kind} --kernel {kernel}{base}{qemu}'")
    return img


def ensure(r: Recipe, progress=print) -> tuple[Image, bool]:
    """The image for ``r``, building it when missing. Returns (image, built_now)."""
    img = find(r)
    if img:
        progress(f"{r.kind} image up to date: {img.path}")
        return img, False
    return build(r, progress), True


def _run_logged(argv: list[str], logf: Path, what: str, progress, timeout: float, env=None) -> None:
    """Run a long build step with its output in ``logf`` and a progress line every 15 s.
    The step leads its own process group, so an interrupt or a timeout stops its apt and
    dpkg children too (TERM, then KILL), not just the top process."""
    from .proc import popen, stop_group
    start = time.monotonic()
    with open(logf, "ab") as out:
        out.write(("\n$ " + " ".join(argv) + "\n").encode())
        out.flush()
        p = popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                  start_new_session=True)
        try:
            while True:
                try:
                    rc = p.wait(timeout=15)
                    break
                except subprocess.TimeoutExpired:
                    el = time.monotonic() - start
                    if el > timeout:
                        stop_group(p)
                        raise CommandFailed(argv, -9, "", f"{what} exceeded {timeout:.0f}s; log: {logf}")
                    progress(f"  {what}: {el:.0f}s ... ({_last_line(logf)})")
        except BaseException:
            stop_group(p)
            raise
    if rc != 0:
        raise CommandFailed(argv, rc, "", f"{what} failed; log: {logf}: {_last_line(logf)}")


def _unescape_mountinfo(field: bytes) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo; the rest is raw bytes."""
    return os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field))


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below ``root``, deepest first (/proc/self/mountinfo, read as bytes
    so that a non-ASCII path is matched exactly)."""
    root_s = os.path.realpath(root)
    found = []
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                mp = _unescape_mountinfo(line.split()[4])
                if mp == root_s or mp.startswith(root_s + "/"):
                    found.append(mp)
    except OSError:
        pass
    return sorted(found, key=lambda m: m.count("/"), reverse=True)


def _rmtree_one_fs(top: Path) -> list[str]:
    """Delete ``top`` without ever descending into another filesystem (a mount that
    appeared after the check, a bind of /dev or /proc): such directories are left in
    place and returned."""
    try:
        dev = os.lstat(top).st_dev
    except FileNotFoundError:
        return []
    kept = []
    for dirpath, dirnames, filenames in os.walk(top, topdown=False):
        for name in filenames:
            p = os.path.join(dirpath, name)
            try:
                if os.lstat(p).st_dev == dev:
                    os.unlink(p)
            except OSError:
                pass
        for name in dirnames:
            p = os.path.join(dirpath, name)
            try:
                st = os.lstat(p)
                if os.path.islink(p):
                    os.unlink(p)
                elif st.st_dev != dev:
                    kept.append(p)
                else:
                    os.rmdir(p)
            except OSError:
                pass
    try:
        os.rmdir(top)
    except OSError:
        pass
    return kept


def remove_build_dir(work: Path) -> bool:
    """Unmount whatever a killed mmdebstrap left mounted in its chroot (proc, sys, dev
    binds), then delete. Never deletes through a mount: a bind of the host's /dev under
    the chroot would otherwise be emptied. Returns False (and leaves that part of the
    tree) if something stays mounted."""
    from .proc import run_cmd
    for mp in mounts_under(work):
        try:
            run_cmd(["umount", "-l", mp], timeout=30)
        except Exception as e:
            log.error("cannot unmount %s: %s", mp, e)
    if mounts_under(work):
        log.error("%s still has mounts; left in place", work)
        return False
    kept = _rmtree_one_fs(work)
    if kept:
        log.error("left in place (another filesystem): %s", kept[:5])
    return not kept


#: a tree in memory only with this much to spare: the lab's is about 1.5 GiB
_TREE_IN_MEMORY_MIN = 6 << 30


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _make_tree(root: Path, in_memory: bool = True) -> None:
    """The directory the image's tree is installed into: a tmpfs of its own when memory
    allows, else a directory on the cache's disk. Its 50,000 files are written
    once, read once by mke2fs and deleted: on disk their writeback competed with the
    build itself (mmdebstrap took 52-85 s for one recipe on this disk)."""
    from .proc import run_cmd
    avail = _mem_available()
    root.mkdir()
    if not in_memory or avail < _TREE_IN_MEMORY_MIN:
        return
    try:
        run_cmd(["mount", "-t", "tmpfs", "-o", f"size={(avail - (2 << 30)) >> 20}m,mode=0755",
                 "vmlab-image-tree", str(root)], timeout=30)
    except Exception as e:   # a container without mount rights: the disk does it
        log.info("image tree on disk: tmpfs: %s", e)


def _drop_tree(root: Path) -> None:
    """Delete the tree: a tmpfs's memory is freed by its unmount."""
    from .proc import run_cmd
    if os.path.realpath(root) in mounts_under(root):
        run_cmd(["umount", str(root)], timeout=60)
        root.rmdir()
    else:
        shutil.rmtree(root)


def _last_line(p: Path) -> str:
    try:
        with open(p, "rb") as f:
            f.seek(max(0, os.path.getsize(p) - 400))
            lines = [ln for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
        return lines[-1][:100] if lines else ""
    except OSError:
        return ""


def _sources(r: Recipe) -> list[str]:
    base, ksuite = r.suites
    src = [f"deb {r.mirror} {base} main"]
    for extra in dict.fromkeys((ksuite, r.qemu_suite)):
        if extra and extra != base:
            src.append(f"deb {r.mirror} {extra} main")
    return src


# kernel_source.TESTING_SUITES: an index past its Valid-Until; signatures are still checked
_APT_OPTS = {s: ['--aptopt=Acquire::Check-Valid-Until "false"'] for s in kernel_source.TESTING_SUITES}


def _apt_args(r: Recipe) -> list[str]:
    """mmdebstrap options for apt: pins (kernel and QEMU suites) and per-suite apt options."""
    extra = [o for s in dict.fromkeys(r.suites + (r.qemu_suite,)) for o in _APT_OPTS.get(s, [])]
    return _apt_pins(r) + extra


def _apt_pins(r: Recipe) -> list[str]:
    base, ksuite = r.suites
    if r.qemu_suite:
        # QEMU (and, like `apt -t`, whatever its suite has) from the QEMU's suite; the
        # kernel and its headers held at the kernel's suite: the kernel under test stays
        pin = (f"Package: *\\nPin: release n={r.qemu_suite}\\nPin-Priority: 990\\n\\n"
               f"Package: src:linux src:linux-signed-amd64\\nPin: release n={ksuite}\\n"
               f"Pin-Priority: 1001\\n")
        return [f"--setup-hook=mkdir -p \"$1/etc/apt/preferences.d\" && "
                f"printf '{pin}' > \"$1/etc/apt/preferences.d/vmlab-qemu\""]
    if ksuite == base:
        return []
    # Like `apt -t <backports>`: whatever backports has wins, so the kernel under test and
    # the lab's VMM (and its firmware deps, e.g. seabios) come from one consistent suite;
    # base suites may lack what the lab needs (bookworm has no qemu-system-modules-opengl).
    pin = (f"Package: *\\nPin: release n={ksuite}\\nPin-Priority: 990\\n")
    return [f"--setup-hook=mkdir -p \"$1/etc/apt/preferences.d\" && "
            f"printf '{pin}' > \"$1/etc/apt/preferences.d/vmlab-kernel\""]


def build(r: Recipe, progress=print) -> Image:
    if os.geteuid() != 0:
        raise NotRoot("building images needs root (mmdebstrap --mode=root, mke2fs -d); "
                      "run as root")
    for tool in ("mmdebstrap", "mke2fs"):
        if not shutil.which(tool) and not os.path.exists(f"/usr/sbin/{tool}"):
            raise ImageMissing(f"{tool} not found: apt-get install mmdebstrap e2fsprogs")
    final = image_dir(r)
    images_dir().mkdir(parents=True, exist_ok=True)
    with locked(images_dir() / f".{final.name}.lock", f"the {r.kind} image build", timeout=3 * 3600):
        img = find(r)
        if img:  # another vmlab built it while we waited for the lock
            return img
        work = images_dir() / f".build-{final.name}-{os.getpid()}"
        for stale in images_dir().glob(".build-*-*"):
            # a build killed before its cleanup (its tree may be a tmpfs that holds
            # memory until unmounted): this image's are stale while its lock is ours,
            # any other image's once the vmlab that made it is gone
            pid = stale.name.rsplit("-", 1)[1]
            if stale.name.startswith(f".build-{final.name}-") or \
                    (pid.isdigit() and not os.path.exists(f"/proc/{pid}")):
                remove_build_dir(stale)
        work.mkdir(parents=True)
        start = time.monotonic()
        what = f"{r.source.spec} on {r.kernel}, {r.source.base_why}" if r.user_kernel else r.kernel
        progress(f"building {r.kind} image ({what}) in {work} (log: {work}/build.log)")
        try:
            try:
                manifest = (_build_lab if r.kind == "lab" else _build_guest)(r, work, progress)
            except CommandFailed as e:
                user = [s.spec for s in (r.source, r.qemu_source) if s is not None and s.user]
                why = _user_kernel_failure(r, work / "build.log") if user else None
                if why:
                    # the kernel or QEMU under test (its .debs, its tree) and not vmlab: exit 125
                    raise CouldNotTest(f"{r.kind} image for {' with '.join(user)}: {why} "
                                       f"(build log: {images_dir() / f'failed-{final.name}.log'})") from e
                raise
            if r.qemu_source:
                manifest["qemu_source"] = {"spec": r.qemu_source.spec, "form": r.qemu_source.form,
                                           "digest": r.qemu_source.digest}
            if r.user_kernel:
                manifest["kernel_source"] = {"spec": r.source.spec, "form": r.source.form,
                                             "digest": r.source.digest, "base": r.kernel,
                                             "base_why": r.source.base_why}
                if r.source.config_missing_optional:
                    # what the tree's .config lacks that some experiments need: those are
                    # not applicable on it (the lab's probe says which at run time)
                    manifest["kernel_source"]["config_missing_optional"] = \
                        list(r.source.config_missing_optional)
            manifest.update(kind=r.kind, kernel_suite=r.kernel, suites=list(r.suites), key=r.key(),
                            recipe=r.fields(), built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            build_seconds=round(time.monotonic() - start, 1))
            manifest["artifacts"] = {p.name: sha256_file(p) for p in sorted(work.iterdir())
                                     if p.is_file() and p.name not in ("build.log", "manifest.json")}
            (work / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            shutil.rmtree(final, ignore_errors=True)
            work.rename(final)
        except BaseException:
            keep = images_dir() / f"failed-{final.name}.log"
            if (work / "build.log").exists():
                shutil.copyfile(work / "build.log", keep)
                progress(f"build log kept at {keep}")
            remove_build_dir(work)
            raise
        progress(f"{r.kind} image built in {manifest['build_seconds']}s: {final}")
        return Image(r.kind, final, manifest)


def _user_kernel_failure(r: Recipe, logf: Path) -> str | None:
    """Why an image of the user's kernel failed, when it is the kernel's fault: apt cannot
    meet the .debs' dependencies on the base suite, or the exporter does not build
    against it. None otherwise (a mirror down is vmlab's or the machine's failure)."""
    try:
        text = logf.read_text(errors="replace")
    except OSError:
        return None
    unmet = re.findall(r"^\s*(?:(\S+) :)?\s+((?:Pre-)?Depends: .+?)\s*$", text, re.M)
    if unmet:
        lines, pkg = [], ""
        for who, dep in unmet:
            pkg = who or pkg
            lines.append(f"{pkg} {dep}")
        return (f"its dependencies cannot be met on {r.kernel}: {'; '.join(dict.fromkeys(lines))}"
                f" (another base: --lab-base, e.g. the suite the .debs were built for)")
    if "vmlab: exporter build failed" in text and r.user_kernel:
        # against Debian's own kernel it is vmlab's failure, whoever's QEMU rides along
        return "the vmlab exporter module does not build against this kernel"
    return None


def _mmdebstrap(r: Recipe, variant: str, root: Path, logf: Path, progress, hooks: list[str],
                env_extra: dict | None = None) -> None:
    base, _ = r.suites
    # a user's .deb is a path apt installs with its dependencies: one --include each, so a
    # path is never split at a comma
    debs = [f"--include={d}" for d in (r.source.debs if r.source and variant != "extract" else ())]
    if r.qemu_source and r.qemu_source.form == "deb":
        debs += [f"--include={d}" for d in r.qemu_source.debs]
    argv = ["mmdebstrap", f"--variant={variant}", "--mode=root", "--format=directory",
            "--include=" + ",".join(r.packages), *debs, *_apt_args(r), *hooks, base, str(root),
            *_sources(r)]
    env = dict(os.environ, VMLAB_SRC=str(repo_root()), **(env_extra or {}))
    _run_logged(argv, logf, "mmdebstrap", progress, timeout=1800, env=env)


#: what nothing in the lab reads: less for dpkg to write and mke2fs to copy
_LAB_DPKG_ARGS = [f"--dpkgopt=path-exclude=/usr/share/{d}/*" for d in ("man", "doc", "locale", "info")] + \
    ["--dpkgopt=path-include=/usr/share/doc/*/copyright",
     "--dpkgopt=path-include=/usr/share/locale/locale.alias"]
_EATMYDATA_HOOKS = "/usr/share/mmdebstrap/hooks/eatmydata"


def _build_lab(r: Recipe, work: Path, progress) -> dict:
    root = work / "root"
    logf = work / "build.log"
    customize = repo_root() / "guest-images/lab/customize.sh"
    src = r.source
    tree = {"VMLAB_TREE": str(src.path)} if src and src.form == "tree" else {}
    qbuild = r.qemu_source if r.qemu_source and r.qemu_source.form == "build" else None
    if qbuild:
        tree["VMLAB_QEMU_BUILD"] = str(qbuild.path)
    if r.vendored:
        tree["VMLAB_QEMU_QMP"] = str(_qemu_qmp()[0])
    hooks = [f"--essential-hook=sh {repo_root() / 'guest-images/lab/essential-hook.sh'} \"$1\"",
             f"--customize-hook=sh {customize} \"$1\"", *_LAB_DPKG_ARGS]
    if os.path.isdir(_EATMYDATA_HOOKS):
        # dpkg without fsync: the image is a file written once, a crash rebuilds it
        hooks.append(f"--hook-dir={_EATMYDATA_HOOKS}")
    srcdir = src.source_dir if src else None
    if srcdir:
        # make O=: the build directory's Makefile includes the source's by its absolute
        # path, so the source is bound read-only at that path around customize.sh's
        # module build; the directories made for it go afterwards (leaf first)
        mp = '"$1"' + shlex.quote(str(srcdir))
        made = shlex.quote(str(work / "tree-source-made"))
        hooks = [f"--customize-hook=d={shlex.quote(str(srcdir))}; : > {made}; "
                 f"while [ ! -e \"$1$d\" ]; do echo \"$d\" >> {made}; d=$(dirname \"$d\"); done; "
                 f"mkdir -p {mp} && mount --bind {shlex.quote(str(srcdir))} {mp} && "
                 f"mount -o remount,bind,ro {mp}",
                 *hooks,
                 f"--customize-hook=umount {mp} && while IFS= read -r d; do rmdir \"$1$d\"; done < {made}"]
    # a user's kernel on disk: a tree's unstripped modules can outgrow the memory left
    _make_tree(root, in_memory=not r.user_kernel)
    try:
        _mmdebstrap(r, "essential", root, logf, progress, hooks, tree)
    finally:
        bound = os.path.realpath(root) + str(srcdir) if srcdir else None
        if bound and bound in mounts_under(root):
            # customize.sh failed before the hook that unbinds it
            subprocess.run(["umount", "-l", bound], timeout=60)
    if src and src.form == "tree":
        n = kernel_source.install_tree_modules(src.path, initramfs.modules_root(root), src.release)
        progress(f"  installed {n} modules of {src.path}")
        initramfs.depmod(root, src.release)
    if qbuild:
        missing = initramfs.missing_libs(root, QEMU_BUILD_DIR + "/qemu-system-x86_64")
        if missing:
            # the QEMU the user brought (given with --qemu or lab.qemu: named by its path,
            # which says which); a build for another system is the user's input, exit 2
            raise UserError(f"the lab's QEMU {qbuild.spec}: qemu-system-x86_64 needs "
                            f"{', '.join(missing)}, which the {r.kernel} lab image lacks (build it "
                            f"on {r.kernel}, or add the libraries' packages)")
    kver = initramfs.kernel_version(root)
    if src and src.user and kver != src.release:
        raise CouldNotTest(f"{src.spec}: the image holds kernel {kver}, not {src.release}")
    vmlinuz = src.path / "arch/x86/boot/bzImage" if src and src.form == "tree" else find_vmlinuz(root, kver)
    shutil.copyfile(vmlinuz, work / "vmlinuz")
    cpio = initramfs.Cpio()
    initramfs.add_busybox(cpio, root)
    loaded = initramfs.add_modules(cpio, root, kver, list(r.modules))
    cpio.file("etc/vmlab-modules", ("\n".join(loaded) + "\n").encode())
    cpio.file("init", (repo_root() / "guest-images/lab/initramfs-init").read_bytes(), 0o755)
    for d in ("proc", "sys", "dev", "newroot"):
        cpio.mkdir(d)
    initramfs.write(cpio, work / "initrd.img")
    packages = dict(line.split("\t", 1) for line in
                    (root / "usr/lib/vmlab/packages.tsv").read_text().splitlines() if "\t" in line)
    if not (root / f"lib/modules/{kver}/updates/vmlab_exporter.ko").exists():
        raise CommandFailed(["vmlab-exporter build"], 1, "", "module not installed in lab image")
    du = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    size_mb = int(du * 1.25 / 2**20) + 512
    progress(f"  making ext4 root filesystem ({size_mb} MiB)")
    # a new file reads as zeros: the journal needs no zeroing (the inode tables keep
    # theirs, or the lab's kernel would zero them in the background at every boot)
    _run_logged(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "vmlab-lab",
                 "-E", "lazy_journal_init=1", "-d", str(root),
                 str(work / "rootfs.img"), f"{size_mb}M"], logf, "mke2fs", progress, timeout=900)
    _drop_tree(root)
    return {"kernel_release": kver, "packages": packages, "initrd_modules": loaded,
            # a build directory's QEMU says its version when it runs, not in a package
            "qemu_version": None if qbuild else packages.get("qemu-system-x86", "?")}


def find_vmlinuz(root: Path, kver: str) -> Path:
    """The kernel image of ``kver``: /boot when installed, elsewhere when only extracted
    (newer Debian kernels ship it under /usr/lib and copy it to /boot in postinst)."""
    for rel in (f"boot/vmlinuz-{kver}", f"usr/lib/modules/{kver}/vmlinuz",
                f"usr/lib/linux-image-{kver}/vmlinuz", f"lib/modules/{kver}/vmlinuz"):
        p = root / rel
        if p.exists():
            return p
    hits = sorted(p for p in root.rglob(f"vmlinu*{kver}*") if p.is_file()) or \
        sorted(p for p in root.rglob("vmlinuz") if kver in str(p))
    if not hits:
        raise CommandFailed(["find vmlinuz"], 1, "", f"no kernel image for {kver} in {root}")
    return hits[0]


def build_guest_agent(out: Path) -> None:
    srcs = sorted(str(p) for p in (repo_root() / "guest-images/agent").glob("*.c"))
    inc = repo_root() / "host-tools/vmlab-exporter/include/uapi"
    from .proc import run_cmd
    run_cmd(["gcc", "-static", "-O2", "-Wall", "-Wextra", f"-I{inc}", "-o", str(out), *srcs],
            timeout=120)


def _build_guest(r: Recipe, work: Path, progress) -> dict:
    root = work / "root"
    logf = work / "build.log"
    pkgs = work / "packages.txt"
    hook = f"--extract-hook=ls \"$1/var/cache/apt/archives\" > {pkgs}"
    _make_tree(root, in_memory=not r.user_kernel)
    _mmdebstrap(r, "extract", root, logf, progress, [hook])
    src = r.source
    if src and src.form == "deb":
        # extracted as the suite's own kernel is (the guest runs no dpkg): the image and
        # the packages with its modules and binary, not headers or kbuild
        for deb in src.debs:
            name = kernel_source.deb_fields(deb).get("Package", "")
            if not name.startswith(("linux-headers-", "linux-kbuild-")):
                from .proc import run_cmd
                run_cmd(["dpkg-deb", "-x", str(deb), str(root)], timeout=300)
    elif src and src.form == "tree":
        kernel_source.install_tree_modules(src.path, initramfs.modules_root(root), src.release)
        initramfs.depmod(root, src.release)
    kver = initramfs.kernel_version(root)
    if src and src.user and kver != src.release:
        raise CouldNotTest(f"{src.spec}: the image holds kernel {kver}, not {src.release}")
    vmlinuz = src.path / "arch/x86/boot/bzImage" if src and src.form == "tree" else find_vmlinuz(root, kver)
    shutil.copyfile(vmlinuz, work / "vmlinuz")
    cpio = initramfs.Cpio()
    initramfs.add_busybox(cpio, root)
    initramfs.add_binary(cpio, root, "usr/sbin/dropbear", "bin/dropbear")
    loaded = initramfs.add_modules(cpio, root, kver, list(r.modules))
    cpio.file("etc/vmlab-modules", ("\n".join(loaded) + "\n").encode())
    agent = work / "vmlab-guest-agent"
    if (repo_root() / "guest-images/agent/vmlab-guest-agent.c").exists():
        progress("  compiling the guest agent (static)")
        build_guest_agent(agent)
        cpio.file("bin/vmlab-guest-agent", agent.read_bytes(), 0o755)
        agent.unlink()
    cpio.file("init", (repo_root() / "guest-images/guest/init").read_bytes(), 0o755)
    cpio.file("etc/inittab", (repo_root() / "guest-images/guest/inittab").read_bytes())
    cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    cpio.file("etc/shadow", b"root:*:19000:0:99999:7:::\n", 0o600)
    cpio.file("etc/group", b"root:x:0:\n")
    cpio.file("etc/shells", b"/bin/sh\n")
    for d in ("proc", "sys", "dev", "run", "tmp", "root", "etc/dropbear"):
        cpio.mkdir(d)
    initramfs.write(cpio, work / "initramfs.img")
    packages = {}
    for name in pkgs.read_text().split():
        if name.endswith(".deb"):
            pkg, ver, _ = name[:-4].split("_", 2)
            packages[pkg] = ver.replace("%3a", ":")
    pkgs.unlink()
    _drop_tree(root)
    return {"kernel_release": kver, "packages": packages, "modules": loaded}


def list_images() -> list[Image]:
    out = []
    if images_dir().exists():
        for d in sorted(images_dir().iterdir()):
            m = d / "manifest.json"
            if m.exists():
                man = json.loads(m.read_text())
                out.append(Image(man.get("kind", "?"), d, man))
    return out


if __name__ == "__main__":  # pragma: no cover - debugging aid
    build(recipe(sys.argv[1]))
