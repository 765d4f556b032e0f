"""Issue: nested lab. The debugging commands on a lab that outlives each command:
lab up/status/exec, guest up/exec, doctor --json on the running pair, two `vmlab run` at
once reusing that lab (issue speed: reuse), guest down, lab down."""
from __future__ import annotations

import pytest

import fcntl
import json
import os
import signal
import stat
import time

from .conftest import qemu_pids, vmlab_at_once, vmlab_cmd


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

        # two experiments at once in the running lab, whose guest would differ from the
        # persistent one (memory): each boots only a guest of its own (its own name, port
        # and socket) beside the persistent guest, which they leave be
        lab_pid = json.loads((tmp_path / "lab" / "state.json").read_text())["pid"]
        guest_pid = json.loads((tmp_path / "lab" / "guest.json").read_text())["pid"]
        outs = [tmp_path / f"reuse{i}" for i in (1, 2)]
        names, spans = set(), []
        for rc, out, err in vmlab_at_once([["run", "--guest-memory", "384", "--out", str(o)]
                                           for o in outs], env=env):
            assert rc == 0, err[-3000:]
            assert "running in the lab that 'vmlab lab up' started" in err, err[-2000:]
            assert "not using the running guest: its memory_mb is 512, this run wants 384" in err, err[-2000:]
        for o in outs:
            res = json.loads((o / "results.json").read_text())
            assert res["lab"]["reused_from"] == str(tmp_path / "lab")
            assert [m["verdict"] for m in res["moves"]] == ["REFAULTED"] * 3 + ["STALE"]
            names.add(res["guest"]["name"])
            spans.append((res["started"], res["ended"]))
        assert len(names) == 2 and "guest" not in names, names
        # at once, not one after the other (ISO timestamps of one clock compare as text)
        assert max(s for s, _ in spans) < min(e for _, e in spans), spans
        assert qemu_pids(str(tmp_path)) == [lab_pid], "no lab of their own, the lab still up"
        r = vmlab_cmd("guest", "exec", "--", "uname", "-n", env=env, timeout=120)
        assert r.returncode == 0 and r.stdout.strip() == "vmlab-guest", r.stderr

        # issue speed: experiments whose guest matches run in the persistent guest, their
        # buffer hot-plugged and unplugged, twice in a row in one guest QEMU; the verdicts
        # are those of a run with a guest (and lab) of its own (test_default_experiment)
        bdfs = []
        for i in (3, 4):
            o = tmp_path / f"reuse{i}"
            r = vmlab_cmd("run", "--out", str(o), env=env, timeout=600)
            assert r.returncode == 0, r.stderr[-3000:]
            assert "running in the guest that 'vmlab guest up' started" in r.stderr, r.stderr[-2000:]
            res = json.loads((o / "results.json").read_text())
            assert res["guest"]["reused_from"] == str(tmp_path / "lab" / "guest.json")
            assert res["guest"]["name"] == "guest" and res["guest"]["boot_seconds"] is None
            assert res["baseline"]["verdict"] == "REFAULTED"
            assert [m["verdict"] for m in res["moves"]] == ["REFAULTED"] * 3 + ["STALE"]
            # unplugged: QEMU let the device go, so the quarantine could be freed
            assert res["released_at_end"] and res["released_at_end"] > 0, res.get("released_at_end")
            bdfs.append(res["guest"]["hotplug"]["bdf"])
            r = vmlab_cmd("guest", "exec", "--", "test", "-e", f"/sys/bus/pci/devices/{bdfs[-1]}",
                          env=env, timeout=120)
            assert r.returncode == 1, f"{bdfs[-1]} still in the guest after the run"
        assert json.loads((tmp_path / "lab" / "guest.json").read_text())["pid"] == guest_pid
        # while another command holds the persistent guest (here: this test holds its
        # lock, as a run in it does), a run does not wait for it: it boots a guest of its own
        with open(tmp_path / "lab" / "guest.lock", "a") as lk:
            fcntl.flock(lk, fcntl.LOCK_EX)
            r = vmlab_cmd("run", "--out", str(tmp_path / "busy"), env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "the running guest is in use by another command" in r.stderr, r.stderr[-2000:]
        assert json.loads((tmp_path / "busy" / "results.json").read_text())["guest"]["name"] != "guest"

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


@pytest.mark.nightly   # core tier under 30 min on 2 cores, cold cache (DESIGN.md CI tiers)
def test_keep_leaves_a_failed_runs_lab_up_and_takes_a_passed_ones_down(images_ready, tmp_path):
    env = {"VMLAB_STATE_DIR": str(tmp_path / "state")}
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("version: 1\nname: keep-wrong\nexporter: {kind: vmlab, size: 64K}\n"
                     "moves:\n  - {mode: MIGRATE, expect: STALE}\n")
    try:
        r = vmlab_cmd("run", str(wrong), "--keep", "--out", str(tmp_path / "r1"), env=env,
                      timeout=900)
        assert r.returncode == 1, r.stderr[-3000:]
        assert "the lab stays up for inspection" in r.stderr and "vmlab lab down" in r.stderr
        [pid] = qemu_pids(str(tmp_path / "state"))
        r = vmlab_cmd("lab", "exec", "--", "lsmod", env=env, timeout=120)
        assert r.returncode == 0 and "vmlab_exporter" in r.stdout, r.stderr
        # --keep with a lab up that does not fit the run: refused before anything starts
        r = vmlab_cmd("run", "--keep", "--lab-memory", "2048", "--out", str(tmp_path / "r4"),
                      env=env, timeout=120)
        assert r.returncode == 2 and "does not fit" in r.stderr and "memory_mb" in r.stderr, r.stderr
        assert not (tmp_path / "r4").exists() and qemu_pids(str(tmp_path / "state")) == [pid]
        # --keep and --fresh contradict each other: refused before anything starts
        r = vmlab_cmd("run", "--keep", "--fresh", "--out", str(tmp_path / "r2"), env=env, timeout=120)
        assert r.returncode == 2 and "choose one" in r.stderr and not (tmp_path / "r2").exists()
    finally:
        r = vmlab_cmd("lab", "down", env=env, timeout=300)
    assert r.returncode == 0 and qemu_pids(str(tmp_path / "state")) == []
    # a passing run with --keep takes the lab it started down again
    r = vmlab_cmd("run", "--keep", "--out", str(tmp_path / "r3"), env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert qemu_pids(str(tmp_path / "state")) == [], "a passed run's lab is not kept"
    assert not (tmp_path / "state" / "lab" / "state.json").exists()
