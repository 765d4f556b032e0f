"""Issue: caching-strategy comparison. The strategy matrices run for real and their
report has every cell, with every layer's memtype. Nightly: 18 + 2 guests (about 6 min)."""
from __future__ import annotations

import json

import pytest

from .conftest import ROOT, qemu_pids, results_dir, vmlab_cmd

STRATEGIES = ROOT / "configs" / "strategies"


@pytest.mark.nightly
def test_caching_strategy_matrix(images_ready):
    out = results_dir("strategies-caching")
    r = vmlab_cmd("matrix", "--strategies", str(STRATEGIES / "caching.yaml"), "--kernels", "trixie",
                  "--out", str(out), timeout=3600)
    doc = json.loads((out / "matrix.json").read_text())
    assert len(doc["cells"]) == 18 and doc["strategy"]["axes"] == ["exporter", "guest", "change"]
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"   # every cell refaulted
    page = (out / "report.html").read_text()
    table = page.split('id="strategies"', 1)[1].split("</table>", 1)[0]
    assert table.count("<tr class=") == 18
    for c in doc["cells"]:
        res = json.loads((out / c["results_rel"] / "results.json").read_text())
        chain = res["caching_chain"]
        want = res["config"]["exporter"]["caching"]
        assert chain["exporter"]["requested"] == want
        # AMD NPT: whatever the host's memtype, the guest's own mapping decides. Measured
        # 2026-11-26: wc -> write-combining, uc -> uncached-minus, and wb (through /dev/mem
        # on the BAR, not RAM to the guest's kernel) -> uncached-minus
        asked = res["config"]["guest"]["mapping"]
        assert chain["guest"]["memtype"] == {"wb": "uncached-minus", "wc": "write-combining",
                                             "uc": "uncached-minus"}[asked], chain
        if res["config"]["moves"][0].get("caching") not in (None, "KEEP"):   # flip
            assert res["moves"][0]["exporter_info"]["caching"] == res["config"]["moves"][0]["caching"]
        assert (out / "strategy-cells" / f"{c['entry']}.yaml").exists()
    accels = {json.loads((out / c["results_rel"] / "results.json").read_text())["lab"]["accel"]
              for c in doc["cells"]}
    assert ("not meaningful: TCG lab" in table) == ("tcg" in accels)
    assert qemu_pids(str(out)) == []


@pytest.mark.nightly
def test_vmm_strategy_pair(images_ready):
    out = results_dir("strategies-vmm")
    r = vmlab_cmd("matrix", "--strategies", str(STRATEGIES / "vmm-on-move.yaml"), "--kernels",
                  "trixie-backports", "--out", str(out), timeout=1800)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    doc = json.loads((out / "matrix.json").read_text())
    verdicts = {c["entry"]: c["verdicts"] for c in doc["cells"]}
    # the baseline read, then the moves
    assert verdicts == {"vmm-none": ["REFAULTED", "REFAULTED", "REFAULTED", "STALE"],
                        "vmm-remap": ["REFAULTED", "REFAULTED", "REFAULTED", "REFAULTED"]}
    assert "vmm-remap" in (out / "report.html").read_text()
