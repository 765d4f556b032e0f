"""Issue nightly CI: `vmlab matrix --shard K/N` on two "machines" (two processes here, each
with its own lab) and `vmlab report merge` joining them into one matrix, as the shipped CI
workflows (configs/ci/) do."""
from __future__ import annotations

import pytest

import json
import xml.etree.ElementTree as ET

from .conftest import qemu_pids, results_dir, vmlab_cmd

ENTRIES = ["calibration", "dmaheap-order0"]


@pytest.mark.nightly   # core tier under 30 min on 2 cores, cold cache (DESIGN.md CI tiers)
def test_two_shards_and_a_merge(images_ready):
    shards = [results_dir(f"shard-{k}") for k in (1, 2)]
    for k, out in zip((1, 2), shards):
        r = vmlab_cmd("matrix", "--kernels", "trixie", "--only", ",".join(ENTRIES),
                      "--shard", f"{k}/2", "--out", str(out), timeout=1800)
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"shard {k}/2" in r.stderr
    docs = [json.loads((d / "matrix.json").read_text()) for d in shards]
    assert [d["shard"] for d in docs] == ["1/2", "2/2"]
    # 2 cells cut in 2: one each; together each entry once
    assert [len(d["cells"]) for d in docs] == [1, 1]
    assert sorted(c["entry"] for d in docs for c in d["cells"]) == sorted(ENTRIES)

    merged = results_dir("shards-merged")
    r = vmlab_cmd("report", "merge", *map(str, shards), "--out", str(merged), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((merged / "matrix.json").read_text())
    assert doc["status"] == "finished" and doc["missing_shards"] == []
    assert sorted((c["entry"], c["kernel_suite"], c["match"]) for c in doc["cells"]) == \
        [(e, "trixie", True) for e in sorted(ENTRIES)]
    for c in doc["cells"]:
        assert (merged / c["results_rel"] / "results.json").is_file()
    suite = ET.parse(merged / "junit.xml").getroot()
    assert suite.get("tests") == "2" and suite.get("failures") == "0"
    html = (merged / "report.html").read_text()
    assert all(e in html for e in ENTRIES)
    # one shard alone is not the whole matrix: 125 and the missing shard named
    alone = results_dir("shards-merged-alone")
    r = vmlab_cmd("report", "merge", str(shards[0]), "--out", str(alone), timeout=300)
    assert r.returncode == 125 and "2/2" in r.stderr, r.stderr
    assert qemu_pids(str(shards[0])) == [] and qemu_pids(str(shards[1])) == []
