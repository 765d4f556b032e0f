"""Issue: nested lab. Interrupting vmlab leaves nothing running; broken boots are
diagnosed in one line with exit status 2, within the configured timeout."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from .conftest import ROOT, qemu_pids, vmlab_cmd


class _Proc:
    """vmlab in its own process group (as a shell runs it), stderr collected on a thread."""

    def __init__(self, state, *args):
        env = dict(os.environ, VMLAB_STATE_DIR=str(state))
        self.p = subprocess.Popen([sys.executable, "-m", "vmlab.cli", *args], cwd=ROOT, env=env,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.err = []
        self.t = threading.Thread(target=lambda: self.err.extend(iter(self.p.stderr.readline, "")),
                                  daemon=True)
        self.t.start()

    def stderr(self) -> str:
        return "".join(self.err)

    def wait_for(self, text, timeout):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if text in self.stderr():
                return
            if self.p.poll() is not None:
                break
            time.sleep(0.2)
        pytest.fail(f"never saw {text!r}; stderr so far:\n{self.stderr()}")


@pytest.mark.parametrize("sig,phase,code", [
    (signal.SIGINT, "booting lab host", 130),
    (signal.SIGTERM, "booting guest", 143),
], ids=["sigint-during-lab-boot", "sigterm-during-guest-boot"])
def test_interrupt_leaves_nothing_running(images_ready, tmp_path, sig, phase, code):
    v = _Proc(tmp_path, "doctor", "--json")
    p = v.p
    try:
        v.wait_for(phase, 600)
        time.sleep(2)
        assert qemu_pids(str(tmp_path)), "the lab QEMU should be running at this point"
        os.killpg(p.pid, sig)  # like the terminal's Ctrl-C: the whole process group
        rc = p.wait(timeout=90)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    v.t.join(5)
    assert rc == code, v.stderr()
    deadline = time.monotonic() + 10
    while qemu_pids(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert qemu_pids(str(tmp_path)) == []
    # no helper left either: nothing in the process table runs from this state dir
    left = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
    assert left == []


def _one_line_exit2(r):
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("vmlab: error:")]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_wrong_kernel_path(images_ready, tmp_path):
    r = vmlab_cmd("doctor", "--kernel-image", "/nonexistent/bzImage",
                  env={"VMLAB_STATE_DIR": str(tmp_path)}, timeout=300)
    line = _one_line_exit2(r)
    assert "/nonexistent/bzImage" in line and "console log:" in line
    assert qemu_pids(str(tmp_path)) == []


def test_missing_image(tmp_path):
    r = vmlab_cmd("doctor", "--no-build", env={"VMLAB_STATE_DIR": str(tmp_path / "s"),
                                                "VMLAB_CACHE_DIR": str(tmp_path / "empty")}, timeout=120)
    line = _one_line_exit2(r)
    assert "not built" in line and "vmlab images build lab" in line


def test_qemu_exits_early(images_ready, tmp_path):
    r = vmlab_cmd("doctor", "--lab-qemu-arg=-device", "--lab-qemu-arg=no-such-device",
                  env={"VMLAB_STATE_DIR": str(tmp_path)}, timeout=300)
    line = _one_line_exit2(r)
    assert "no-such-device" in line and "console log:" in line


def test_boot_timeout_is_honoured(images_ready, tmp_path):
    # -S: QEMU starts with the CPU stopped, so the kernel never prints a line.
    start = time.monotonic()
    r = vmlab_cmd("doctor", "--boot-timeout", "15", "--lab-qemu-arg=-S",
                  env={"VMLAB_STATE_DIR": str(tmp_path)}, timeout=300)
    line = _one_line_exit2(r)
    assert "within 15s" in line and "console log:" in line
    assert time.monotonic() - start < 120
    assert qemu_pids(str(tmp_path)) == []
