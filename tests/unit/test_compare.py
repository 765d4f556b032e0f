"""vmlab/compare.py on fake results (tests/lab/test_compare.py compares two real runs)."""
from __future__ import annotations

import json

import pytest

from vmlab import compare
from vmlab.errors import UserError


def test_permutation_test_tells_a_shift_from_noise():
    a = [0.10, 0.11, 0.12, 0.10, 0.13, 0.11, 0.12, 0.10]
    assert compare.permutation_p(a, list(a)) > 0.5
    assert compare.permutation_p(a, [x + 0.05 for x in a]) < 0.01
    assert compare.permutation_p(a, [x + 0.05 for x in a]) == compare.permutation_p(a, [x + 0.05 for x in a])
    t = compare.timing(a, [x + 0.05 for x in a])
    assert t["changed"] is True and t["median_b"] > t["median_a"]
    assert compare.timing(a[:3], a[:3])["changed"] is None     # too few samples to say


def _run(d, name, verdicts, passed, kernel="trixie", seconds=0.2):
    d.mkdir()
    moves = [{"verdict": v, "seconds": seconds} for v in verdicts]
    (d / "results.json").write_text(json.dumps({"experiment": name, "options": {"kernel": kernel},
                                                "passed": passed, "moves": moves}))
    return d


def test_a_cell_that_stops_matching_is_a_regression(tmp_path):
    a = compare.load_side(_run(tmp_path / "a", "x", ["REFAULTED", "STALE"], True))
    b = compare.load_side(_run(tmp_path / "b", "x", ["REFAULTED", "REFAULTED"], False))
    [row] = compare.compare(a, b)
    assert row["change"] == "REGRESSION" and row["b"]["verdicts"] == ["REFAULTED", "REFAULTED"]
    [row] = compare.compare(b, a)
    assert row["change"] == "fixed"
    [row] = compare.compare(a, a)
    assert row["change"] == "same"
    # a cell that matched and is gone from B is a regression too
    [row] = compare.compare(a, {})
    assert row["change"] == "REGRESSION" and row["why"] == "missing from B"


def test_cli_exit_status_and_outputs(tmp_path):
    import argparse
    a = _run(tmp_path / "a", "x", ["REFAULTED"], True)
    b = _run(tmp_path / "b", "x", ["STALE"], False)
    ns = argparse.Namespace(a=str(a), b=str(b), out=str(tmp_path / "c1"))
    assert compare.main(ns, print) == 1
    assert "REGRESSION" in (tmp_path / "c1" / "report.html").read_text()
    assert json.loads((tmp_path / "c1" / "compare.json").read_text())["cells"][0]["change"] == "REGRESSION"
    ns = argparse.Namespace(a=str(a), b=str(a), out=str(tmp_path / "c2"))
    assert compare.main(ns, print) == 0
    (tmp_path / "junk").mkdir()
    with pytest.raises(UserError, match="neither"):
        compare.main(argparse.Namespace(a=str(a), b=str(tmp_path / "junk"), out=None), print)
