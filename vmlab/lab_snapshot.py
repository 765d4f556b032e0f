"""Snapshots of a booted TCG lab: saved once per lab image and shape, restored instead of
booting the lab (about 1 s instead of 8-11 s under TCG).

What QEMU allows, measured (QEMU 7.2, TCG, nested SVM): a lab whose 9p share is unmounted
migrates to a file (about 160 MiB of 3 GiB, 1.2 s) and comes back with ``-incoming``, KVM
in it still runs VMs. The share blocks migration while mounted, so it is unmounted
before the save and mounted again after a restore (with the new run's files). The disk:
the lab's root file system is written while it runs, so the lab boots on a qcow2 overlay
of its own and the snapshot keeps that overlay with the memory (the page cache and the
disk must agree). Keys: the snapshot holds none anyone could log in with (the run's key is
removed from authorized_keys before the save) and no vmlab-side secret; a restored lab gets
its run's key through a virtio-serial port (``vmlab.key``, read by lab-setup), with the
time, and its RNG is reseeded through a new VM generation ID.

A snapshot lives in its lab image's directory (``snapshots/<key>``), so it goes with its
image; a new one prunes all but the newest few. Anything that makes a snapshot unusable is
one logged line, and the lab boots as before.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import socket
import time
from dataclasses import asdict
from pathlib import Path

from .errors import InfraError
from .qemu import qemu_version

log = logging.getLogger("vmlab.snapshot")

FORMAT = 3            # bump when what a snapshot holds or how it is restored changes
KEEP = 4              # per lab image: the lab alone, with the default run's guest, with
                      # the matrix's, one more shape (lab memory, append, guest memory...)
SAVE_TIMEOUT = 120    # seconds for QEMU to write the snapshot
LOAD_TIMEOUT = 60     # seconds for QEMU to read it back
DISABLE_ENV = "VMLAB_SNAPSHOTS"   # "0": never use or make snapshots
RESUME_TIMEOUT = 30   # seconds for a restored lab to take its key
#: lab-setup makes it when its key-port reader runs (the kernel has a virtio console)
KEY_PORT_MARK = "/run/vmlab-keyport"


def enabled(spec, hwtrace: bool, extra_args) -> str | None:
    """None when a lab of this spec can be snapshotted, else why not (one phrase)."""
    if os.environ.get(DISABLE_ENV) == "0":
        return f"{DISABLE_ENV}=0"
    if spec.accel != "tcg":
        return "only a TCG lab is snapshotted (a KVM lab boots in seconds)"
    if hwtrace:
        return "the hardware oracle's plugin watches the lab from its first instruction"
    if extra_args:
        return "extra QEMU arguments for the lab"
    return None


def key(spec, image_path: Path, *, resident=None, guest_image=None, agent: str = "") -> str:
    """What must be equal for a snapshot to be this lab: the image, the outer QEMU, the
    machine, and the kernel command line without the run's key; the host agent (``agent``,
    exporter.agent_digest: the snapshot holds its fork server); with a resident guest
    (GuestOptions), that guest's options, its kernel's fixed arguments and the guest image."""
    append = re.sub(r"vmlab\.sshkey=\S+", "", spec.append)
    what = {"format": FORMAT, "image": image_path.name, "qemu": qemu_version(spec.binary),
            "machine": spec.machine, "cpu": spec.cpu, "smp": spec.smp, "memory_mb": spec.memory_mb,
            "accel": spec.accel, "append": " ".join(append.split()), "agent": agent}
    if resident is not None:
        o = asdict(resident)
        o.pop("boot_timeout", None)     # how long a boot may take is no part of the guest
        from .guest import BOOT_ARGS
        what["resident_guest"] = {"options": o, "image": guest_image.path.name, "boot_args": BOOT_ARGS}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def directory(image_path: Path) -> Path:
    return image_path / "snapshots"


def find(image_path: Path, k: str) -> Path | None:
    """The snapshot ``k`` when it is whole: its meta.json (written last) names the size of
    the memory file it was saved with."""
    d = directory(image_path) / k
    try:
        meta = json.loads((d / "meta.json").read_text())
        if (d / "vm.state").stat().st_size != meta["bytes"] or not (d / "disk.qcow2").is_file():
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return d


def _migrate_wait(machine, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        st = machine.cmd("query-migrate")
        status = st.get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise InfraError(f"{what}: migration {status}: {st.get('error-desc', '')}")
        if time.monotonic() > deadline:
            raise InfraError(f"{what}: not done within {timeout:.0f} s (status {status})")
        time.sleep(0.05)


def _cancel_migration(machine) -> None:
    """A save that failed half-way must not go on as a live migration once the lab runs
    again (it would end in postmigrate: a paused lab)."""
    try:
        if machine.cmd("query-migrate").get("status") in ("completed", "failed", "cancelled", None):
            return
        machine.cmd("migrate_cancel")
        deadline = time.monotonic() + 30
        while machine.cmd("query-migrate").get("status") not in ("failed", "cancelled", "completed"):
            if time.monotonic() > deadline:
                raise InfraError("the snapshot's migration does not stop")
            time.sleep(0.05)
    except InfraError:
        raise
    except Exception as e:   # a QEMU gone meanwhile: the caller finds it dead
        log.warning("snapshot: cancelling the migration: %s", e)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class NoKeyPort(Exception):
    """The lab kernel has no virtio console (lab-setup left no marker): a lab saved
    without its key could never be logged into again."""


def save(lab, k: str, progress) -> Path | None:
    """Snapshot ``lab`` (a NestedLab up with SSH) as ``k`` in its image's directory, then
    let it run on: back on the run's key, the share mounted. Returns the snapshot, or None
    when another vmlab saved it meanwhile; NoKeyPort when this lab cannot take a key after
    a restore (nothing was changed then)."""
    m, image = lab.machine, lab.image.path
    rc, _, _ = lab.run(f"[ -e {KEY_PORT_MARK} ]", timeout=30, check=False)
    if rc != 0:
        raise NoKeyPort(f"the lab kernel has no virtio console port ({KEY_PORT_MARK} missing)")
    final = directory(image) / k
    tmp = directory(image) / f".{k}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True, mode=0o700)
    os.chmod(directory(image), 0o700)
    start = time.monotonic()
    stopped = False
    prepared = True     # from the next command on, the lab may lack its key and share
    resident = None
    try:
        if lab.resident_guest is not None:
            # frozen first: no key in it, its vCPUs out of guest mode; a run thaws it
            resident = lab.resident_guest.freeze()
        # nothing to log in with, the share unmounted (it blocks migration; a relay just
        # closed may hold it a moment longer), the page cache written out (the overlay
        # kept with the memory must agree with it) and dropped (a smaller file)
        lab.run("rm -f /root/.ssh/authorized_keys && "
                "for i in 1 2 3 4 5 6 7 8 9 10; do umount /mnt/vmlab 2>/dev/null && break; sleep 0.2; done; "
                "! mountpoint -q /mnt/vmlab && sync && echo 3 > /proc/sys/vm/drop_caches", timeout=120)
        lab.session.close()
        lab.session = None
        m.cmd("stop")
        stopped = True
        m.cmd("migrate", uri=f"exec:cat > {shlex.quote(str(tmp / 'vm.state'))}")
        try:
            _migrate_wait(m, SAVE_TIMEOUT, "saving the lab's snapshot")
        except BaseException:
            _cancel_migration(m)
            raise
        shutil.copyfile(lab.disk_overlay, tmp / "disk.qcow2")    # the VM is stopped
        shutil.copyfile(m.console_path, tmp / "console.log")
        for f in tmp.iterdir():
            os.chmod(f, 0o600)
            _fsync(f)
        (tmp / "meta.json").write_text(json.dumps({
            "format": FORMAT, "key": k, "saved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "kernel": lab.kernel_release_at_boot, "bytes": (tmp / "vm.state").stat().st_size,
            "resident_guest": resident}))
        _fsync(tmp / "meta.json")
        if final.exists() and find(image, k) is None:
            discard(final)    # a snapshot cut short (a full disk, a crash): replaced
        try:
            tmp.rename(final)
        except OSError:       # another vmlab saved this snapshot first: keep theirs
            final = None
    except BaseException as e:
        # Ctrl-C or SIGTERM: the lab is about to be stopped, not resumed
        prepared = prepared and isinstance(e, Exception)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if prepared:
            if lab.session is not None:      # the prep failed half-way: start over clean
                lab.session.close()
                lab.session = None
            resume(lab, cont=stopped)
    if final is not None:
        progress(f"saved a snapshot of the booted lab in {time.monotonic() - start:.1f}s "
                 f"({(final / 'vm.state').stat().st_size >> 20} MiB): later runs restore it "
                 f"instead of booting ({final})")
        prune(image, keep=final)
    return final


def resident_record(snap: Path) -> dict | None:
    """The guest saved in ``snap`` ({"opts": GuestOptions as a dict, "pid": its QEMU in
    the lab}), or None."""
    try:
        rec = json.loads((snap / "meta.json").read_text()).get("resident_guest")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(rec, dict) and isinstance(rec.get("opts"), dict) and isinstance(rec.get("pid"), int):
        return rec
    return None


def discard(snap: Path) -> None:
    """Out of the way at once (a rename), then gone: another vmlab may still be reading it."""
    gone = snap.with_name(f".{snap.name}.{os.getpid()}.{time.monotonic_ns()}.discarded")
    try:
        snap.rename(gone)
    except OSError:
        return
    shutil.rmtree(gone, ignore_errors=True)


def prune(image_path: Path, keep: Path) -> None:
    """The newest KEEP snapshots stay; so do other vmlabs' saves in progress. Leftovers of
    a vmlab that died while saving or discarding (named with its pid) go."""
    d = directory(image_path)
    for left in d.glob(".*"):
        m = re.fullmatch(r"\.[0-9a-f]+\.(\d+)\.(?:tmp|\d+\.discarded)", left.name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            shutil.rmtree(left, ignore_errors=True)
    snaps = sorted((s for s in d.iterdir() if (s / "meta.json").is_file()),
                   key=lambda s: s.stat().st_mtime, reverse=True)
    for s in snaps[KEEP:]:
        if s != keep:
            shutil.rmtree(s, ignore_errors=True)


def restore_into(lab, snap: Path) -> None:
    """Start ``lab.machine`` (launched with ``-incoming defer``) from ``snap`` and let it
    run: memory in, then the run's key through the port (resume)."""
    m = lab.machine
    m.cmd("migrate-incoming", uri=f"exec:cat {shlex.quote(str(snap / 'vm.state'))}")
    _migrate_wait(m, LOAD_TIMEOUT, "restoring the lab's snapshot")
    resume(lab, cont=True)


def resume(lab, *, cont: bool = False) -> None:
    """The run's key, the time, fresh entropy and the share into a lab that runs without
    them (just restored, or just saved), then SSH with that key. With ``cont`` the lab is
    stopped, and runs once the first line waits in the port. SSH is tried once lab-setup
    says on the console that the key is in (a login tried before that is refused, and a
    new handshake costs a second under TCG); the line is sent again every second until
    then: lab-setup reopens the port between lines, and a line that arrives while it
    closes it is lost."""
    from . import ssh
    from .errors import RemoteError, WaitTimeout
    pub = ssh.public_key_b64(lab.key)
    deadline = time.monotonic() + RESUME_TIMEOUT
    console = Path(lab.machine.spec.console_log)
    try:
        seen_from = console.stat().st_size
    except OSError:
        seen_from = 0
    s = socket.socket(socket.AF_UNIX)
    try:
        s.settimeout(10)
        s.connect(lab.machine.spec.key_port)
        why = "lab-setup never said VMLAB-KEY-INSTALLED"
        while True:
            s.sendall(f"VMLAB-KEY {pub} {int(time.time())} {os.urandom(32).hex()}\n".encode())
            if cont:
                lab.machine.cmd("cont")
                cont = False
            if _console_says(console, seen_from, b"VMLAB-KEY-INSTALLED", time.monotonic() + 1):
                try:
                    lab.session = ssh.SSHSession.connect("lab", "127.0.0.1", lab.ssh_port, lab.key,
                                                         timeout=5, alive=lab.machine.alive)
                    return
                except (WaitTimeout, RemoteError) as e:
                    why = str(e)
            if time.monotonic() > deadline or not lab.machine.alive():
                raise WaitTimeout("the lab taking its key through the key port", RESUME_TIMEOUT, why)
    finally:
        s.close()


def _console_says(console: Path, offset: int, mark: bytes, until: float) -> bool:
    """``mark`` in the console log after ``offset`` before ``until``."""
    while True:
        try:
            with open(console, "rb") as f:
                f.seek(offset)
                if mark in f.read():
                    return True
        except OSError:
            pass
        if time.monotonic() >= until:
            return False
        time.sleep(0.02)
