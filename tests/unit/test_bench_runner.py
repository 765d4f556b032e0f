"""The benches' runner of vmlab as its own process, and the cold bench's account of a log."""
from __future__ import annotations

import os

import pytest

from vmlab import bench
from vmlab.errors import VmlabError


def test_a_vmlab_process_is_timed_logged_and_echoed(tmp_path):
    said = []
    secs = bench._vmlab_process(("bench", "--what", "nonsense"), dict(os.environ), "t", ok=(2,),
                                log=tmp_path / "log", echo=said.append)
    assert secs > 0 and "not a benchmark" in (tmp_path / "log").read_text()
    with pytest.raises(VmlabError, match="exited 2"):
        bench._vmlab_process(("bench", "--what", "nonsense"), dict(os.environ), "t")


def test_a_cold_runs_milestones_come_from_its_progress_lines():
    log = ("[vmlab 13:44:50Z    1.0s] building lab image lab-trixie-1 (mmdebstrap)\n"
           "[vmlab 13:46:10Z   81.2s] lab image built in 80.1s\n"
           "noise\n"
           "[vmlab 13:46:40Z  111.0s] baseline read: {'REFAULTED': 256} -> REFAULTED\n"
           "[vmlab 13:46:55Z  126.4s] PASSED: results in /tmp/x\n")
    assert bench._milestones(log) == [
        {"at_s": 81.2, "line": "lab image built in 80.1s"},
        {"at_s": 111.0, "line": "baseline read: {'REFAULTED': 256} -> REFAULTED"},
        {"at_s": 126.4, "line": "PASSED: results in /tmp/x"}]
