"""Run.pre_move_batch: the quarantine release a judged move earned goes first in the
next batch, and its answer lands in that move's record (the agent faked at its
request boundary; the lab tests run it for real in every multi-move experiment)."""
from __future__ import annotations

import pytest

from vmlab.errors import WaitTimeout
from vmlab.exporter import AgentRequestFailed
from vmlab.experiment import Run


class FakeAgent:
    def __init__(self, answers):
        self.sent, self.answers, self.batch_elapsed = [], answers, []

    def batch(self, requests, timeout=120):
        self.sent.append(requests)
        if isinstance(self.answers, BaseException):
            raise self.answers
        return list(self.answers)


def run_with(answers, pending=True):
    r = Run.__new__(Run)
    r.buf = {"buf": 7}
    r.agent = FakeAgent(answers)
    rec = {"n": 1}
    r.pending_release = (rec, 3) if pending else None
    return r, rec


def test_the_release_goes_first_and_lands_in_its_moves_record():
    r, rec = run_with([{"freed_pages": 256}, {"generation": 5}])
    assert r.pre_move_batch([{"op": "move"}]) == [{"generation": 5}]
    first = r.agent.sent[0][0]
    assert first["op"] == "release_quarantine" and first["max_generation"] == 3
    assert first["may_fail"] == ["EBUSY"]          # any other failure stops the move
    assert rec["released_pages"] == 256 and r.pending_release is None


def test_ebusy_is_an_answer_and_the_move_goes_on():
    busy = AgentRequestFailed("release_quarantine", {"error": "a PTE may map it", "errname": "EBUSY"})
    r, rec = run_with([busy, {"generation": 5}])
    assert r.pre_move_batch([{"op": "move"}]) == [{"generation": 5}]
    assert rec["released_pages"] == 0 and "PTE" in rec["quarantine_busy"]


def test_another_failure_is_said_in_its_move_and_ends_the_run():
    bad = AgentRequestFailed("release_quarantine", {"error": "no such buffer", "errname": "ENOENT"})
    r, rec = run_with([bad, None])
    with pytest.raises(AgentRequestFailed):
        r.pre_move_batch([{"op": "move"}])
    assert "no such buffer" in rec["release_error"]


def test_a_batch_that_timed_out_leaves_the_release_unknown_in_its_record():
    r, rec = run_with(WaitTimeout("host agent op batch", 120, ""))
    with pytest.raises(WaitTimeout):
        r.pre_move_batch([{"op": "move"}])
    assert rec["release_error"].startswith("unknown")


def test_nothing_pending_nothing_sent_for_an_empty_batch():
    r, _ = run_with([], pending=False)
    assert r.pre_move_batch([]) == []
    assert r.agent.sent == [[]]
