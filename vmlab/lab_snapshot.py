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
import subprocess
import time
from pathlib import Path

from .errors import InfraError

log = logging.getLogger("vmlab.snapshot")

FORMAT = 1            # bump when what a snapshot holds or how it is restored changes
KEEP = 3              # snapshots kept per lab image (different lab memory, append...)
SAVE_TIMEOUT = 120    # seconds for QEMU to write the snapshot
LOAD_TIMEOUT = 60     # seconds for QEMU to read it back
DISABLE_ENV = "VMLAB_SNAPSHOTS"   # "0": never use or make snapshots


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


def qemu_version(binary: str) -> str:
    try:
        return subprocess.run([binary, "--version"], capture_output=True, text=True,
                              timeout=30).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "?"


def key(spec, image_path: Path) -> str:
    """What must be equal for a snapshot to be this lab: the image, the outer QEMU, the
    machine, and the kernel command line without the run's key."""
    append = re.sub(r"vmlab\.sshkey=\S+", "", spec.append)
    what = {"format": FORMAT, "image": image_path.name, "qemu": qemu_version(spec.binary),
            "machine": spec.machine, "cpu": spec.cpu, "smp": spec.smp, "memory_mb": spec.memory_mb,
            "accel": spec.accel, "append": " ".join(append.split())}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def directory(image_path: Path) -> Path:
    return image_path / "snapshots"


def find(image_path: Path, k: str) -> Path | None:
    d = directory(image_path) / k
    return d if (d / "meta.json").is_file() else None


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


def save(lab, k: str, progress) -> Path | None:
    """Snapshot ``lab`` (a NestedLab up with SSH) as ``k`` in its image's directory, then
    let it run on: back on the run's key, the share mounted. Returns the snapshot, or None
    when another vmlab saved it meanwhile."""
    m, image = lab.machine, lab.image.path
    final = directory(image) / k
    tmp = directory(image) / f".{k}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True, mode=0o700)
    os.chmod(directory(image), 0o700)
    start = time.monotonic()
    # nothing to log in with, the share unmounted (it blocks migration), the page cache
    # written out (the overlay kept with the memory must agree with it) and dropped (a
    # smaller file)
    lab.run("rm -f /root/.ssh/authorized_keys && umount /mnt/vmlab && sync && "
            "echo 3 > /proc/sys/vm/drop_caches", timeout=60)
    lab.session.close()
    lab.session = None
    try:
        m.cmd("stop")
        m.cmd("migrate", uri=f"exec:cat > {shlex.quote(str(tmp / 'vm.state'))}")
        _migrate_wait(m, SAVE_TIMEOUT, "saving the lab's snapshot")
        shutil.copyfile(lab.disk_overlay, tmp / "disk.qcow2")    # the VM is stopped
        shutil.copyfile(m.console_path, tmp / "console.log")
        for p in tmp.iterdir():
            os.chmod(p, 0o600)
        (tmp / "meta.json").write_text(json.dumps({
            "format": FORMAT, "key": k, "saved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "kernel": lab.kernel_release_at_boot, "bytes": (tmp / "vm.state").stat().st_size}))
        try:
            tmp.rename(final)
        except OSError:       # another vmlab saved this snapshot first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
            final = None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        m.cmd("cont")
        resume(lab)
    if final is not None:
        progress(f"saved a snapshot of the booted lab in {time.monotonic() - start:.1f}s "
                 f"({(final / 'vm.state').stat().st_size >> 20} MiB): later runs restore it "
                 f"instead of booting ({final})")
        prune(image, keep=final)
    return final


def discard(snap: Path) -> None:
    """Out of the way at once (a rename), then gone: another vmlab may still be reading it."""
    gone = snap.with_name(f".{snap.name}.discarded.{os.getpid()}")
    try:
        snap.rename(gone)
    except OSError:
        return
    shutil.rmtree(gone, ignore_errors=True)


def prune(image_path: Path, keep: Path) -> None:
    snaps = sorted((d for d in directory(image_path).iterdir() if (d / "meta.json").is_file()),
                   key=lambda d: d.stat().st_mtime, reverse=True)
    for d in snaps[KEEP:]:
        if d != keep:
            shutil.rmtree(d, ignore_errors=True)


def restore_into(lab, snap: Path) -> None:
    """Start ``lab.machine`` (launched with ``-incoming defer``) from ``snap`` and let it
    run: memory in, then the run's key through the port (resume)."""
    m = lab.machine
    m.cmd("migrate-incoming", uri=f"exec:cat {shlex.quote(str(snap / 'vm.state'))}")
    _migrate_wait(m, LOAD_TIMEOUT, "restoring the lab's snapshot")
    m.cmd("cont")
    resume(lab)


def resume(lab) -> None:
    """The run's key, the time and the share into a lab that runs without them (just
    restored, or just saved), then SSH with that key."""
    from . import ssh
    pub = ssh.public_key_b64(lab.key)
    s = socket.socket(socket.AF_UNIX)
    try:
        s.settimeout(10)
        s.connect(lab.machine.spec.key_port)
        s.sendall(f"VMLAB-KEY {pub} {int(time.time())}\n".encode())
        # the line stays in flight until lab-setup reads it: the socket stays open till
        # the key works
        lab.session = ssh.SSHSession.connect("lab", "127.0.0.1", lab.ssh_port, lab.key,
                                             timeout=30, alive=lab.machine.alive)
    finally:
        s.close()
