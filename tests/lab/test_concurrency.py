"""Two vmlab commands at once do not disturb each other: each `vmlab run` has its own lab,
results directory, key, share and sockets, and both pass."""
from __future__ import annotations

import json

from .conftest import qemu_pids, results_dir, vmlab_at_once


def test_two_runs_at_once_both_pass(images_ready, tmp_path):
    outs = [results_dir(f"run-concurrent-{i}") for i in (1, 2)]
    for d in outs:
        d.rmdir()  # --out must be new or empty; let each run create its own
    ends = vmlab_at_once([["run", "--out", str(d)] for d in outs],
                         env={"VMLAB_STATE_DIR": str(tmp_path / "state")})
    for (rc, out, err), d in zip(ends, outs):
        assert rc == 0, f"{d}:\n{out}\n{err}"
        res = json.loads((d / "results.json").read_text())
        assert res["passed"] is True
        assert [m["verdict"] for m in res["moves"]] == ["REFAULTED"] * 3 + ["STALE"]
        assert qemu_pids(str(d)) == []
    # two labs, two consoles, two keys that never touched the results directories
    consoles = [(d / "lab-console.log").read_text() for d in outs]
    assert all("VMLAB-LAB-READY" in c for c in consoles)
    assert not any((d / "id_ed25519").exists() or (d / "share").exists() for d in outs)
