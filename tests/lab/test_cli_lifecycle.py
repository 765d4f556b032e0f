"""Issue: nested lab. The debugging commands on a lab that outlives each command:
lab up/status/exec, guest up/exec, doctor --json on the running pair, guest down, lab down."""
from __future__ import annotations

import json
import os
import signal
import stat
import time

from .conftest import qemu_pids, vmlab_cmd


def test_persistent_lab_and_guest(images_ready, tmp_path):
    env = {"VMLAB_STATE_DIR": str(tmp_path)}
    try:
        r = vmlab_cmd("lab", "up", env=env, timeout=900)
        assert r.returncode == 0, r.stderr
        assert len(qemu_pids(str(tmp_path))) == 1, "the lab keeps running after 'lab up' returns"
        assert stat.S_IMODE(os.stat(tmp_path / "lab" / "lab-qmp.sock").st_mode) == 0o600

        r = vmlab_cmd("lab", "status", "--json", env=env, timeout=120)
        assert r.returncode == 0, r.stderr
        st = json.loads(r.stdout)
        assert st["status"] == "running" and st["kernel"]

        r = vmlab_cmd("lab", "exec", "--", "cat", "/sys/module/kvm_amd/parameters/npt", env=env, timeout=120)
        assert r.returncode == 0 and r.stdout.strip() == "Y", r.stderr
        r = vmlab_cmd("lab", "exec", "--", "false", env=env, timeout=120)
        assert r.returncode == 1  # the remote exit status is passed through
        # a command whose output never stops still ends at its timeout
        t = time.monotonic()
        r = vmlab_cmd("lab", "exec", "--timeout", "5", "--", "yes", env=env, timeout=120)
        assert r.returncode == 1 and "timed out after 5s" in r.stderr, r.stderr[-500:]
        assert time.monotonic() - t < 60

        r = vmlab_cmd("guest", "up", env=env, timeout=900)
        assert r.returncode == 0, r.stderr
        r = vmlab_cmd("guest", "exec", "--", "uname", "-n", env=env, timeout=120)
        assert r.returncode == 0 and r.stdout.strip() == "vmlab-guest", r.stderr

        r = vmlab_cmd("doctor", "--json", env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        rep = json.loads(r.stdout)
        assert rep["guest"]["accel"] == "kvm" and rep["lab"]["nested_paging"] is True

        r = vmlab_cmd("guest", "down", env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        r = vmlab_cmd("guest", "exec", "--", "true", env=env, timeout=120)
        assert r.returncode == 2 and "no guest is up" in r.stderr
    finally:
        r = vmlab_cmd("lab", "down", env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert qemu_pids(str(tmp_path)) == []
    r = vmlab_cmd("lab", "status", env=env, timeout=60)
    assert r.returncode == 2 and "no lab is up" in r.stderr


def test_lab_down_stops_a_hung_lab_from_its_state_file(images_ready, tmp_path):
    """No SSH, no answering QMP: the lab's QEMU is SIGSTOPped. 'lab down' must still stop it
    from the state file alone (pid + start time: QMP quit times out, SIGTERM stays pending
    on a stopped process, SIGKILL ends it)."""
    env = {"VMLAB_STATE_DIR": str(tmp_path)}
    r = vmlab_cmd("lab", "up", env=env, timeout=900)
    assert r.returncode == 0, r.stderr
    st = json.loads((tmp_path / "lab" / "state.json").read_text())
    try:
        os.kill(st["pid"], signal.SIGSTOP)
        t = time.monotonic()
        r = vmlab_cmd("lab", "down", env=env, timeout=300)
        took = time.monotonic() - t
        assert r.returncode == 0 and "lab is down" in r.stderr, r.stderr
        assert took < 120, took
        assert qemu_pids(str(tmp_path)) == []
        assert not (tmp_path / "lab" / "state.json").exists()
    finally:
        if qemu_pids(str(tmp_path)):
            os.kill(st["pid"], signal.SIGKILL)


def test_corrupt_state_file_means_no_lab(tmp_path):
    env = {"VMLAB_STATE_DIR": str(tmp_path)}
    (tmp_path / "lab").mkdir()
    (tmp_path / "lab" / "state.json").write_text('{"pid": 1, "ssh')
    r = vmlab_cmd("lab", "status", env=env, timeout=60)
    errs = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(errs) == 1 and "corrupt" in errs[0], r.stderr
    assert "Traceback" not in r.stderr
    r = vmlab_cmd("lab", "down", env=env, timeout=60)
    assert r.returncode == 0 and "corrupt" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "lab" / "state.json").exists()
