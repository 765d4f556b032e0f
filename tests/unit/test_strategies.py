"""Strategy files (configs/strategies/): cells from axes of patches, checked before any run."""
from __future__ import annotations

import pytest
import yaml

from vmlab import strategies
from vmlab.config import ConfigError
from vmlab.paths import repo_root

STRATEGIES = repo_root() / "configs" / "strategies"


def test_caching_strategy_has_every_combination():
    doc, cells = strategies.load(STRATEGIES / "caching.yaml")
    assert len(cells) == 3 * 3 * 2
    by = {c.name: c.raw for c in cells}
    assert set(doc["cells"]) == set(by)
    wc_flip = by["caching-WC-uc-flip"]
    assert wc_flip["exporter"]["caching"] == "WC" and wc_flip["guest"]["mapping"] == "uc"
    assert wc_flip["moves"][0]["caching"] == "WB"          # FLIP from WC
    assert by["caching-UC-wb-flip"]["moves"][0]["caching"] == "WB"
    assert by["caching-WB-wc-flip"]["moves"][0]["caching"] == "WC"
    assert "caching" not in by["caching-WB-wc-keep"]["moves"][0]
    assert doc["cells"]["caching-WB-wc-keep"] == {"exporter": "WB", "guest": "wc", "change": "keep"}


def test_vmm_strategy_pair():
    _, cells = strategies.load(STRATEGIES / "vmm-on-move.yaml")
    none, remap = (c.raw for c in cells)
    assert (none["vmm_on_move"], remap["vmm_on_move"]) == ("none", "remap")
    assert none["moves"][-1]["expect"] == "STALE" and remap["moves"][-1]["expect"] == "REFAULTED"


def _write(tmp_path, doc):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


GOOD = {"version": 1, "name": "s", "title": "t", "why": "w",
        "base": {"version": 1, "exporter": {"kind": "vmlab", "size": "64K"},
                 "moves": [{"mode": "MIGRATE", "expect": "REFAULTED"}]},
        "axes": {"c": {"WB": {"exporter": {"caching": "WB"}}, "UC": {"exporter": {"caching": "UC"}}}}}


@pytest.mark.parametrize("change,key", [
    ({"axes": {"c": {"XX": {"exporter": {"caching": "XX"}}}}}, "axes (cell s-XX) exporter.caching"),
    ({"base": dict(GOOD["base"], name="n")}, "base"),
    ({"surprise": 1}, "surprise"),
    ({"axes": {"c": {}}}, "axes"),
    ({"why": ""}, "why"),
])
def test_a_bad_strategy_file_is_one_line_naming_file_and_key(tmp_path, change, key):
    p = _write(tmp_path, dict(GOOD, **change))
    with pytest.raises(ConfigError) as ei:
        strategies.load(p)
    s = str(ei.value)
    assert s.startswith(f"{p}: {key}") and "\n" not in s, s


def test_cells_are_written_for_reproduction(tmp_path):
    _, cells = strategies.load(_write(tmp_path, GOOD))
    strategies.write_cells(cells, tmp_path / "cells")
    assert sorted(f.name for f in (tmp_path / "cells").iterdir()) == ["s-UC.yaml", "s-WB.yaml"]
    wb = next(c for c in cells if c.name == "s-WB")
    assert wb.path.endswith("s-WB.yaml")
    assert yaml.safe_load(open(wb.path))["exporter"]["caching"] == "WB"
