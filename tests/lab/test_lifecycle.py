"""Issue: nested lab. Interrupting vmlab leaves nothing running; broken boots are
diagnosed in one line with exit status 2, within the configured timeout."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ROOT, VmlabProcess as _Proc, qemu_pids, vmlab_cmd


# (signal, the progress line that starts the phase, exit status, snapshots on, seconds
# into the phase): a lab boots only without a snapshot; a restore takes about 2 s
INTERRUPTS = [
    pytest.param(signal.SIGINT, "booting lab host", 130, False, 2, id="sigint-during-lab-boot"),
    pytest.param(signal.SIGINT, "restoring the lab host", 130, True, 0.3, id="sigint-during-lab-restore"),
    pytest.param(signal.SIGTERM, "booting guest", 143, True, 2, id="sigterm-during-guest-boot"),
]


@pytest.mark.parametrize("sig,phase,code,snapshots,into", INTERRUPTS)
def test_interrupt_leaves_nothing_running(images_ready, tmp_path, sig, phase, code, snapshots, into):
    _interrupt(tmp_path, sig, phase, code, snapshots=snapshots, into=into)


@pytest.mark.nightly
@pytest.mark.parametrize("n", range(20))
@pytest.mark.parametrize("sig,phase,code,snapshots,into", INTERRUPTS)
def test_interrupt_twenty_times_in_a_row(images_ready, tmp_path, sig, phase, code, snapshots, into, n):
    _interrupt(tmp_path, sig, phase, code, snapshots=snapshots, into=into)


def test_second_interrupt_cannot_cut_teardown_short(images_ready, tmp_path):
    """Ctrl-C, then Ctrl-C again while vmlab tears down: still 130, still nothing left."""
    _interrupt(tmp_path, signal.SIGINT, "booting guest", 130, again=True)


def _interrupt(tmp_path, sig, phase, code, again=False, snapshots=True, into=2.0):
    if snapshots:
        # a snapshot of this lab to restore (made by a first lab when there is none)
        env = {"VMLAB_STATE_DIR": str(tmp_path / "snap")}
        assert vmlab_cmd("lab", "up", "--accel", "tcg", env=env, timeout=900).returncode == 0
        assert vmlab_cmd("lab", "down", env=env, timeout=300).returncode == 0
    v = _Proc(tmp_path, "doctor", "--json", "--accel", "tcg",
              env=None if snapshots else {"VMLAB_SNAPSHOTS": "0"})
    p = v.p
    try:
        v.wait_for(phase, 600)
        time.sleep(into)
        assert qemu_pids(str(tmp_path)), "the lab QEMU should be running at this point"
        os.killpg(p.pid, sig)  # like the terminal's Ctrl-C: the whole process group
        if again:
            # Ctrl-C pressed again and again while vmlab tears down (a teardown may take
            # well under a second: every 50 ms until it has exited, 3 s at most)
            for _ in range(60):
                time.sleep(0.05)
                if p.poll() is not None:
                    break
                os.killpg(p.pid, sig)
        rc = p.wait(timeout=90)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    v.drained(5)
    assert rc == code, v.stderr()
    deadline = time.monotonic() + 10
    while qemu_pids(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert qemu_pids(str(tmp_path)) == []
    # no helper left either: nothing in the process table runs from this state dir
    left = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
    assert left == []
    # teardown ran to its end: the lab's private run directory (key, share) is gone
    assert list((tmp_path / "run").iterdir()) == [], list((tmp_path / "run").iterdir())
    if again:
        assert "still stopping" in v.stderr(), v.stderr()


def _one_line_exit2(r):
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("vmlab: error:")]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1, r.stderr
    return lines[0]


def _one_line_exit125(r):
    """A lab that was started and did not come up: 'could not test' (git bisect: skip)."""
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("vmlab: could not test:")]
    assert r.returncode == 125, r.stderr
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_kernel_image_says_it_is_a_tree_now(tmp_path):
    """--kernel-image (a bzImage with the image's own modules) is folded into tree:."""
    r = vmlab_cmd("doctor", "--kernel-image", "/src/linux/arch/x86/boot/bzImage",
                  env={"VMLAB_STATE_DIR": str(tmp_path)}, timeout=300)
    line = _one_line_exit2(r)
    assert "--kernel-image" in line and "use --kernel tree:/src/linux" in line
    assert qemu_pids(str(tmp_path)) == [] and not list(tmp_path.glob("doctor-*/lab-console.log"))


def test_missing_image(tmp_path):
    r = vmlab_cmd("doctor", "--no-build", env={"VMLAB_STATE_DIR": str(tmp_path / "s"),
                                                "VMLAB_CACHE_DIR": str(tmp_path / "empty")}, timeout=120)
    line = _one_line_exit2(r)
    assert "not built" in line and "vmlab images build lab" in line


def test_qemu_exits_early(images_ready, tmp_path):
    r = vmlab_cmd("doctor", "--lab-qemu-arg=-device", "--lab-qemu-arg=no-such-device",
                  env={"VMLAB_STATE_DIR": str(tmp_path)}, timeout=300)
    # how QEMU was asked to run is the user's input (2), not the kernel under test (125)
    line = _one_line_exit2(r)
    assert "no-such-device" in line and "cmdline" in line
    assert "booting it again" not in r.stderr, "a QEMU that refuses its arguments is not retried"


def test_boot_timeout_is_honoured(images_ready, tmp_path):
    # -S: QEMU starts with the CPU stopped, so the kernel never prints a line.
    start = time.monotonic()
    r = vmlab_cmd("doctor", "--boot-timeout", "15", "--lab-qemu-arg=-S",
                  env={"VMLAB_STATE_DIR": str(tmp_path)}, timeout=300)
    line = _one_line_exit125(r)
    assert "within 15s" in line and "console log:" in line
    # a started lab that hangs is booted once more (a TCG flake would not repeat), no more
    assert r.stderr.count("booting it again") == 1
    assert time.monotonic() - start < 150
    assert qemu_pids(str(tmp_path)) == []


def _procs_mentioning(marker: str) -> list[str]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and int(p.name) != os.getpid():
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            try:  # apt and dpkg inside the chroot: their root is under marker
                root = os.readlink(p / "root")
            except OSError:
                root = ""
            if marker in cmd or root.startswith(marker):
                out.append(f"{p.name}: {cmd[:120]}")
    return out


def test_interrupted_image_build_leaves_no_process_and_no_mount(tmp_path):
    """SIGINT while mmdebstrap runs: its apt/dpkg children die with it (process group, TERM
    then KILL) and nothing stays mounted in, or is left of, the half-built chroot."""
    from vmlab.images import mounts_under
    cache = tmp_path / "cache"
    env = dict(os.environ, VMLAB_CACHE_DIR=str(cache))
    p = subprocess.Popen([sys.executable, "-m", "vmlab.cli", "images", "build", "guest"], cwd=ROOT,
                         env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        end = time.monotonic() + 120
        while time.monotonic() < end and not any("mmdebstrap" in c for c in _procs_mentioning(str(cache))):
            time.sleep(0.2)
        assert any("mmdebstrap" in c for c in _procs_mentioning(str(cache))), "mmdebstrap never started"
        time.sleep(6)  # let it get as far as mounting and installing in the chroot
        os.killpg(p.pid, signal.SIGINT)
        rc = p.wait(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert rc == 130, p.stderr.read()
    assert _procs_mentioning(str(cache)) == []
    assert mounts_under(cache) == []
    assert not list((cache / "images").glob(".build-*"))
