"""Issue nightly CI (vmlab compare): two real runs in one kept lab, the second with a config
whose last move no longer leaves the mapping stale; compare calls it a regression (exit 1)
and names the verdicts on both sides."""
from __future__ import annotations

import pytest

import json

from .conftest import qemu_pids, results_dir, vmlab_cmd
from .test_experiments import EXP


@pytest.mark.nightly   # core tier under 30 min on 2 cores, cold cache (DESIGN.md CI tiers)
def test_compare_of_two_real_runs(images_ready, tmp_path):
    env = {"VMLAB_STATE_DIR": str(tmp_path / "state")}
    changed = tmp_path / "changed.yaml"
    # the default experiment, but its fourth move zaps: the expected STALE becomes REFAULTED
    changed.write_text((EXP / "default.yaml").read_text().replace("mode: MIGRATE_NO_ZAP", "mode: MIGRATE"))
    a, b, c = results_dir("compare-a"), results_dir("compare-b"), results_dir("compare-out")
    try:
        assert vmlab_cmd("lab", "up", env=env, timeout=900).returncode == 0
        r = vmlab_cmd("run", "--out", str(a), env=env, timeout=900)
        assert r.returncode == 0, r.stderr[-2000:]
        r = vmlab_cmd("run", str(changed), "--out", str(b), env=env, timeout=900)
        assert r.returncode == 1, r.stderr[-2000:]
    finally:
        vmlab_cmd("lab", "down", env=env, timeout=300)
    assert qemu_pids(str(tmp_path)) == []
    r = vmlab_cmd("compare", str(a), str(b), "--out", str(c), timeout=120)
    assert r.returncode == 1 and "REGRESSION" in r.stdout, r.stdout + r.stderr
    [row] = json.loads((c / "compare.json").read_text())["cells"]
    assert row["entry"] == "default" and row["change"] == "REGRESSION"
    assert row["a"]["verdicts"][-1] == "STALE" and row["b"]["verdicts"][-1] == "REFAULTED"
    r = vmlab_cmd("compare", str(a), str(a), "--out", str(results_dir("compare-same")), timeout=120)
    assert r.returncode == 0 and "same" in r.stdout
