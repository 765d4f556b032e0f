"""Issue: speed. A TCG lab is saved once per image and shape and restored instead of booted
(vmlab/lab_snapshot.py). A restored lab must be indistinguishable to what runs in it: the
same doctor facts and the same verdicts as a booted one; a snapshot that cannot be used is
one line and a boot (and a new snapshot), never a failed run."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from .conftest import qemu_pids, results_dir, vmlab_cmd

OFF = {"VMLAB_SNAPSHOTS": "0"}
TCG = ("--accel", "tcg")    # snapshots are of TCG labs: a host with nested KVM boots its labs
# what differs between any two labs, booted or restored
VOLATILE = ("boot_seconds", "accel_reason", "ssh_port", "results", "console", "seconds")


def _doctor(env: dict, name: str) -> tuple[dict, str]:
    out = results_dir(name)
    r = vmlab_cmd("doctor", "--json", *TCG, env={**env, "VMLAB_STATE_DIR": str(out)}, timeout=900)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout), r.stderr


def _strip(d):
    if isinstance(d, dict):
        return {k: _strip(v) for k, v in d.items() if k not in VOLATILE}
    if isinstance(d, list):
        return [_strip(v) for v in d]
    return d


@pytest.mark.nightly   # two doctor runs (two lab boots and two guests): the CI budget
def test_a_restored_lab_is_the_booted_lab(images_ready):
    """doctor's facts (the lab's KVM, exporter, heaps; the guest it runs) the same whether
    the lab booted or was restored; the restore is said, with the snapshot it used."""
    booted, _ = _doctor(OFF, "snap-doctor-booted")
    _doctor({}, "snap-doctor-first")             # makes the snapshot when there is none
    restored, err = _doctor({}, "snap-doctor-restored")
    assert "lab host restored in" in err and "booting lab host" not in err, err
    assert _strip(restored) == _strip(booted)


def _restored_lab_facts(env) -> tuple[str, int]:
    """(first uuid from the lab's RNG, its clock minus ours) of a restored lab."""
    r = vmlab_cmd("lab", "up", *TCG, env=env, timeout=900)
    try:
        assert r.returncode == 0 and "lab host restored in" in r.stderr, r.stderr
        r2 = vmlab_cmd("lab", "exec", "--", "cat /proc/sys/kernel/random/uuid; date +%s", env=env, timeout=120)
        assert r2.returncode == 0, r2.stderr
        uuid, when = r2.stdout.split()
        return uuid, int(when) - int(time.time())
    finally:
        assert vmlab_cmd("lab", "down", env=env, timeout=300).returncode == 0


def test_restored_labs_have_their_own_randomness_and_the_time(images_ready, tmp_path):
    """Every restore starts from one memory image: the VM generation ID and the host's
    entropy must make each one's RNG its own, and the key port sets its clock."""
    env = {"VMLAB_STATE_DIR": str(tmp_path / "s")}
    assert vmlab_cmd("lab", "up", *TCG, env=env, timeout=900).returncode == 0   # a snapshot
    assert vmlab_cmd("lab", "down", env=env, timeout=300).returncode == 0
    (u1, skew1), (u2, skew2) = _restored_lab_facts(env), _restored_lab_facts(env)
    assert u1 != u2
    assert abs(skew1) <= 5 and abs(skew2) <= 5, (skew1, skew2)


def test_a_snapshot_that_cannot_be_restored_is_a_boot_and_a_new_snapshot(images_ready, tmp_path):
    env = {"VMLAB_STATE_DIR": str(tmp_path / "s")}
    r = vmlab_cmd("lab", "up", *TCG, env=env, timeout=900)
    assert r.returncode == 0, r.stderr
    st = json.loads(vmlab_cmd("lab", "status", "--json", env=env, timeout=120).stdout)
    assert vmlab_cmd("lab", "down", env=env, timeout=300).returncode == 0
    snap = st["snapshot"].get("restored") or st["snapshot"].get("saved")
    assert snap and Path(snap).parent.parent == images_ready[0].path, st
    state = Path(snap) / "vm.state"
    with open(state, "r+b") as f:
        f.write(b"\0" * 4096)                   # a snapshot damaged on disk (its size intact)
    r = vmlab_cmd("lab", "up", *TCG, env=env, timeout=900)
    try:
        assert r.returncode == 0, r.stderr
        said = [ln for ln in r.stderr.splitlines() if "snapshot could not be used" in ln]
        assert len(said) == 1 and "booting the lab instead" in said[0], r.stderr
        assert "lab host up in" in r.stderr and "saved a snapshot of the booted lab" in r.stderr
        assert state.stat().st_size > 16 << 20     # saved again, whole
        r2 = vmlab_cmd("lab", "exec", "--", "uname -r", env=env, timeout=120)
        assert r2.returncode == 0 and r2.stdout.strip()
    finally:
        assert vmlab_cmd("lab", "down", env=env, timeout=300).returncode == 0
    assert qemu_pids(str(tmp_path)) == []


def _run(tmp_path, name: str, env: dict) -> dict:
    out = tmp_path / name
    r = vmlab_cmd("run", *TCG, "--out", str(out), env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def test_a_warm_run_takes_the_guest_saved_with_its_lab(images_ready, tmp_path):
    """The default experiment's lab snapshot holds its guest too (frozen, no key in it):
    a warm run restores both, thaws the guest with its own key and hot-plugs the buffer.
    Its verdicts are the booted run's; each restored guest has the time and an RNG of its
    own; nothing is left running."""
    env = {"VMLAB_STATE_DIR": str(tmp_path / "s")}
    booted = _run(tmp_path, "booted", {**env, **OFF})
    assert booted["lab"]["snapshot"] == {"none": "VMLAB_SNAPSHOTS=0"}
    assert not booted["guest"].get("with_lab_snapshot")
    _run(tmp_path, "first", env)                  # saves the snapshot when there is none
    warm = [_run(tmp_path, f"warm{i}", env) for i in (1, 2)]
    verdicts = [[r["baseline"]["verdict"]] + [m["verdict"] for m in r["moves"]] for r in [booted] + warm]
    assert verdicts[0] == ["REFAULTED", "REFAULTED", "REFAULTED", "REFAULTED", "STALE"], verdicts
    assert verdicts[1] == verdicts[2] == verdicts[0]
    for r in warm:
        assert r["passed"] is True and "restored" in r["lab"]["snapshot"], r["lab"]
        g = r["guest"]
        assert g["with_lab_snapshot"] is True and g["hotplug"]["bdf"], g
        assert abs(g["clock_minus_controller_s"]) <= 5, g
    assert warm[0]["guest"]["random_uuid"] != warm[1]["guest"]["random_uuid"]
    assert qemu_pids(str(tmp_path)) == []
