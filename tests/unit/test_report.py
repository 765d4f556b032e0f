"""report.html of a run, rendered from a results dict (the boundary: no VM); the lab test
test_default_experiment renders a real run's report in Chromium."""
from __future__ import annotations

import base64
import re

from vmlab import report


def _res():
    moves = [{"n": 1, "mode": "MIGRATE", "caching": "KEEP", "expected": ["REFAULTED"], "verdict": "REFAULTED",
              "pages": {"REFAULTED": 4}, "page_map": [["REFAULTED", 4]], "seconds": 0.2, "passed": True,
              "watch": {"latency_s": 0.05}, "kvm_evidence": {"summary": "KVM zapped 4 of 4"},
              "memslot_evidence": {"deleted": 1, "created": 1, "recreated": True}},
             {"n": 2, "mode": "MIGRATE_NO_ZAP", "caching": "KEEP", "expected": ["STALE"], "verdict": "STALE",
              "pages": {"STALE": 3, "REFAULTED": 1}, "page_map": [["STALE", 3], ["REFAULTED", 1]],
              "seconds": 0.3, "passed": True, "detail": "<b>kept</b>"}]
    return {"experiment": "x<y", "config": {"description": "<script>alert(1)</script>",
                                          "exporter": {"size": "16K"}},
            "status": "finished", "passed": True, "started": "now",
            "baseline": {"verdict": "REFAULTED", "pages": {"REFAULTED": 4}, "expected": ["REFAULTED"],
                         "page_map": [["REFAULTED", 4]], "passed": True},
            "moves": moves, "lab": {"kernel": "7.3.4", "qemu": "11.1.3", "accel": "tcg"},
            "caching_chain": {"exporter": {"kind": "vmlab", "caching": "WB"},
                              "lab_host_pte": {"memtype": "WB"}, "kvm": {"mmu": "NPT"},
                              "guest": {"requested": "uc", "memtype": "uncached-minus"},
                              "mismatches": ["host mapping WB vs guest mapping uncached-minus"]}}


def test_run_report_has_every_part_and_escapes_everything(tmp_path):
    (tmp_path / "results.json").write_text("{}")
    page = report.run_html(_res(), tmp_path)
    assert "<script>" not in page and "&lt;script&gt;" in page and "&lt;b&gt;kept" in page
    assert page.count('class="pagemap"') == 3                   # baseline + 2 moves
    assert page.count('class="box') == 4 and page.count('class="box bad"') == 2   # host, guest
    assert "<svg" in page and "move -&gt; guest observed (n=1)" in page
    assert "deleted 1, created 1, recreated" in page
    assert '<a href="results.json">' in page and "reproduce.sh" not in page   # only what exists
    assert page.index('id="environment"') < page.index('id="verdicts"')      # it opens the report
    assert "host CPU" in page and "lab QEMU" in page
    assert not re.search(r"(src|href)=\"https?:", page)           # nothing fetched from the network


def test_page_map_png_is_a_png():
    uri = report.page_map_png([["REFAULTED", 255], ["STALE", 1]], 256)
    assert uri.startswith("data:image/png;base64,")
    assert base64.b64decode(uri.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.latency_svg([{"n": 1}]) is None
