"""Issue: the hardware oracle. The vmlab-hwtrace plugin runs in the real outer QEMU: first
its control socket in a paused QEMU (no guest), then a whole `vmlab run` in which it sees
which lab-host page each guest access hit after MIGRATE, MIGRATE_NO_ZAP and MIGRATE_SILENT."""
from __future__ import annotations

import os
import stat
import subprocess
import time

import pytest

from vmlab import hwtrace
from vmlab.errors import InfraError

from .test_experiments import run


@pytest.fixture(scope="module")
def plugin():
    return str(hwtrace.plugin_path(print))


def test_plugin_control_socket_in_real_qemu(plugin, tmp_path):
    sock = tmp_path / "hw.sock"
    q = subprocess.Popen(["qemu-system-x86_64", "-M", "pc", "-accel", "tcg", "-S", "-nodefaults",
                          "-display", "none", "-m", "64", "-plugin", f"{plugin},sock={sock}"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    hw = hwtrace.HwTrace(str(sock), timeout=10)
    try:
        hello = hw.connect(within=30)
        assert hello["abi"] == hwtrace.PLUGIN_ABI and hello["plugin_api"] >= 1
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        for bad in ("range 10 5", "range zz 10", "set old 12 xyz", "epoch -1", "sample x", "frobnicate"):
            with pytest.raises(InfraError, match="hardware oracle"):
                hw.command(bad)
        hw.setup(hwtrace.GUEST_MAP_VA, hwtrace.GUEST_MAP_VA + 8192, [0x20, 0x21, 0x22, 0x21])
        hw.epoch(7)
        d = hw.dump()
        assert d["epoch"] == 7 and d["old"]["pages"] == 0 and d["new"]["pages"] == 3
        assert d["va"] == [hwtrace.GUEST_MAP_VA, hwtrace.GUEST_MAP_VA + 8192]
        assert d["in_range"] == 0 and d["first_old_hit_ns"] is None and d["old_hits_by_pc"] == []
        # a move: 0x20 and 0x21 retire, 0x22 stays, 0x30 arrives; then 0x22 leaves and 0x20
        # comes back (current again: no longer retired)
        hw.retire(time.monotonic_ns(), [0x22, 0x30])
        d = hw.dump()
        assert (d["old"]["pages"], d["new"]["pages"]) == (2, 2)
        hw.retire(time.monotonic_ns(), [0x20, 0x30])
        d = hw.dump()
        assert (d["old"]["pages"], d["new"]["pages"]) == (2, 2)   # 0x21 and 0x22 retired
        for bad in ("retire x 20", "retire 5 zz", "retire"):
            with pytest.raises(InfraError, match="hardware oracle"):
                hw.command(bad)
        # a 64 MiB buffer's pfn list in one line
        big = range(1 << 20, (1 << 20) + 16384)
        hw.command("set new " + " ".join(f"{p:x}" for p in big))
        assert hw.dump()["new"]["pages"] == 16384
        hw.retire(time.monotonic_ns(), [p + 16384 for p in big])
        assert (hw.dump()["old"]["pages"], hw.dump()["new"]["pages"]) == (16384 + 2, 16384)
    finally:
        hw.close()
        q.terminate()
        q.wait(timeout=30)
    assert not sock.exists(), "the plugin leaves no socket behind"


@pytest.mark.nightly   # core tier under 30 min on 2 cores, cold cache (DESIGN.md CI tiers)
def test_hardware_oracle_judges_every_move(images_ready):
    res = run("hw-oracle", "hw-oracle.yaml")
    assert res["passed"] is True
    assert res["lab"]["accel"] == "tcg"
    assert res["hw_oracle"]["qemu"] == hwtrace.qemu_source_version()[1]
    npages = 256
    base = res["baseline"]["hw_oracle"]
    assert base["verdict"] == "HW_REFAULTED" and base["pages_hit_new"] == npages
    mig, nozap, mig2, *watched, silent = res["moves"]
    assert len(watched) == 3
    for m in watched:   # the guest reads all along; only before each move on the old pages
        h = m["hw_oracle"]
        assert m["verdict"] == "REFAULTED" and h["verdict"] == "HW_REFAULTED", m.get("detail")
        assert h["guest_hits_old"] == 0 and h["accesses_elsewhere"] == 0
    assert sum(m["hw_oracle"]["hits_before_retire"] for m in watched) > 0
    for m in (mig, mig2):
        h = m["hw_oracle"]
        assert m["verdict"] == "REFAULTED" and h["verdict"] == "HW_REFAULTED"
        assert h["guest_hits_old"] == 0 and h["guest_hits_new"] > 0
        # the full read is 512 eight-byte loads per page, every one at a current pfn
        assert h["guest_hits_new"] >= 512 * npages and h["accesses_elsewhere"] == 0
    h = nozap["hw_oracle"]
    assert nozap["verdict"] == "STALE" and h["verdict"] == "HW_STALE"
    assert h["guest_hits_old"] > 0 and h["guest_hits_new"] == 0
    assert h["old_hits"] and h["old_hits"][0]["vaddr"].startswith(hex(hwtrace.GUEST_MAP_VA)[:6])
    # every retired-page hit is accounted for by the guest instruction that made it
    assert sum(p["hits"] for p in h["old_hits_by_pc"]) + h["old_hits_other_pcs"] == h["guest_hits_old"]
    assert all(int(p["vaddr_min"], 16) >= hwtrace.GUEST_MAP_VA for p in h["old_hits_by_pc"])
    # the silent move: every stamp reads current, the hardware sees retired pages
    h = silent["hw_oracle"]
    assert silent["stamps_verdict"] == "REFAULTED" and silent["pages"] == {"REFAULTED": npages}
    assert h["verdict"] == "HW_STALE" and h["guest_hits_old"] > 0 and h["guest_hits_new"] == 0
    assert silent["verdict"] == "HW_STALE"
    assert "disagree" in silent["oracle_disagreement"]
    assert not any(m.get("oracle_disagreement") for m in (mig, nozap, mig2, *watched))
