"""vmlab/merge.py: shards and runs from many machines into one matrix (fake results
directories here; tests/lab/test_shards.py merges two real shards)."""
from __future__ import annotations

import json
import shutil

import pytest

from vmlab import merge
from vmlab.errors import UserError


def _matrix(d, cells, shard=None, kernels=("trixie",), status="finished",
            entries=("calibration", "udmabuf-shmem")):
    d.mkdir(parents=True)
    recs = []
    for entry, kernel, match in cells:
        cd = d / kernel / "lab" / entry
        cd.mkdir(parents=True)
        (cd / "results.json").write_text("{}")
        recs.append({"entry": entry, "kernel_suite": kernel, "match": match, "status": "finished",
                     "verdicts": ["REFAULTED"], "expected": [["REFAULTED"]], "results": str(cd),
                     "results_rel": str(cd.relative_to(d)), "reason": None if match else "missed"})
    doc = {"status": status, "kernels": sorted({c[1] for c in cells}), "planned_kernels": list(kernels),
           "entries": list(entries), "cells": recs}
    if shard:
        doc["shard"] = shard
    (d / "matrix.json").write_text(json.dumps(doc))
    return d


def test_two_shards_merge_into_one_matrix(tmp_path):
    a = _matrix(tmp_path / "a", [("calibration", "trixie", True)], shard="1/2")
    b = _matrix(tmp_path / "b", [("udmabuf-shmem", "trixie", True)], shard="2/2")
    out = tmp_path / "m"
    assert merge.merge([str(a), str(b)], str(out), print) == 0
    doc = json.loads((out / "matrix.json").read_text())
    assert doc["status"] == "finished" and doc["summary"]["cells"] == 2
    assert (out / "trixie" / "calibration" / "results.json").is_file()
    assert "calibration[trixie]" in (out / "junit.xml").read_text()
    assert "udmabuf-shmem" in (out / "report.html").read_text()


def test_moved_artifacts_are_found_beside_their_matrix(tmp_path):
    a = _matrix(tmp_path / "a", [("calibration", "trixie", True)], shard="1/1")
    moved = tmp_path / "elsewhere"
    shutil.move(str(a), str(moved))     # the absolute paths inside no longer exist
    assert merge.merge([str(moved)], str(tmp_path / "m"), print) == 0
    # another directory at the recorded absolute path is not taken for the cell's
    b = _matrix(tmp_path / "a", [("calibration", "trixie", True)], shard="1/1")
    (b / "trixie" / "lab" / "calibration" / "results.json").write_text('{"decoy": 1}')
    assert merge.merge([str(moved)], str(tmp_path / "m2"), print) == 0
    assert (tmp_path / "m2" / "trixie" / "calibration" / "results.json").read_text() == "{}"


def test_shards_of_different_cuts_do_not_complete_each_other(tmp_path):
    a = _matrix(tmp_path / "a", [("calibration", "trixie", True)], shard="1/2")
    b = _matrix(tmp_path / "b", [("dmaheap-order0", "trixie", True)], shard="2/2",
                entries=("dmaheap-order0", "pfnmap-compound"))
    assert merge.merge([str(a), str(b)], str(tmp_path / "m"), print) == 125


def test_a_missing_shard_is_125_and_a_missed_cell_is_1(tmp_path):
    a = _matrix(tmp_path / "a", [("calibration", "trixie", True)], shard="1/2")
    assert merge.merge([str(a)], str(tmp_path / "m1"), print) == 125
    doc = json.loads((tmp_path / "m1" / "matrix.json").read_text())
    assert doc["status"] == "incomplete" and \
        doc["missing_shards"] == ["2/2 of trixie x calibration,udmabuf-shmem"]
    b = _matrix(tmp_path / "b", [("calibration", "forky", False)], shard="1/1", kernels=("forky",))
    assert merge.merge([str(a), str(b)], str(tmp_path / "m2"), print) == 1


def test_bad_input_writes_nothing(tmp_path):
    a = _matrix(tmp_path / "a", [("calibration", "trixie", True)])
    b = _matrix(tmp_path / "b", [("calibration", "trixie", True)])
    with pytest.raises(UserError, match="also in"):
        merge.merge([str(a), str(b)], str(tmp_path / "m"), print)
    (tmp_path / "junk").mkdir()
    with pytest.raises(UserError, match="neither a matrix.json nor"):
        merge.merge([str(tmp_path / "junk")], str(tmp_path / "m"), print)
    with pytest.raises(UserError, match="no such results directory"):
        merge.merge([str(tmp_path / "nope")], str(tmp_path / "m"), print)
    assert not (tmp_path / "m").exists()
