"""vmlab/oracle.py: per-page and per-move verdicts."""
from __future__ import annotations

import pytest

from vmlab import oracle, stamp

BID, GEN, TAG = 0xB0F, 5, 0x766D6C6100000001
LIVE, RETIRED = stamp.LIVE, stamp.RETIRED


def rec(i=0, status="ok", bid=BID, gen=GEN, idx=None, state=LIVE, tag=TAG):
    return [i, status, bid, gen, i if idx is None else idx, state, tag]


def pv(r, expect_tag=None, gen=GEN):
    return oracle.page_verdict(r, buffer_id=BID, generation=gen, expect_tag=expect_tag)


@pytest.mark.parametrize("r,tag,want", [
    (rec(), None, "REFAULTED"),
    (rec(), TAG, "REFAULTED"),
    (rec(3), TAG, "REFAULTED"),
    (rec(gen=GEN - 1), None, "STALE"),
    (rec(gen=1), TAG, "STALE"),
    (rec(state=RETIRED), None, "STALE"),
    (rec(state=RETIRED, tag=0), TAG, "STALE"),
    (rec(status="bad_magic"), None, "TORN"),
    (rec(status="bad_csum"), None, "TORN"),
    (rec(bid=BID + 1), None, "TORN"),
    (rec(2, idx=3), None, "TORN"),
    (rec(gen=GEN + 1), None, "TORN"),
    (rec(state=0), None, "TORN"),
    (rec(state=7), None, "TORN"),
    (rec(tag=0), TAG, "LOST_WRITE"),
    (rec(tag=TAG + 1), TAG, "LOST_WRITE"),
    (rec(tag=0), None, "REFAULTED"),
])
def test_page_verdict(r, tag, want):
    assert pv(r, tag) == want


def test_torn_beats_old_generation():
    # wrong buffer id with an old generation: not ours, so TORN, not STALE
    assert pv(rec(bid=1, gen=1)) == "TORN"
    assert pv(rec(status="bad_csum", gen=1)) == "TORN"


def test_judge_worst_and_counts():
    recs = [rec(0), rec(1), rec(2, gen=GEN - 1), rec(3, tag=0), rec(4)]
    j = oracle.judge(recs, buffer_id=BID, generation=GEN, expect_tag=TAG)
    assert j["verdict"] == "LOST_WRITE"
    assert j["pages"] == {"REFAULTED": 3, "STALE": 1, "LOST_WRITE": 1}
    assert set(j["examples"]) == {"STALE", "LOST_WRITE"}
    assert j["examples"]["STALE"]["page"] == 2
    assert j["examples"]["STALE"]["state"] == "LIVE"
    assert j["examples"]["LOST_WRITE"]["tag"] == 0


def test_judge_torn_wins():
    recs = [rec(0, state=RETIRED), rec(1, status="bad_magic"), rec(2, tag=1), rec(3)]
    j = oracle.judge(recs, buffer_id=BID, generation=GEN, expect_tag=TAG)
    assert j["verdict"] == "TORN"
    assert j["pages"] == {"STALE": 1, "TORN": 1, "LOST_WRITE": 1, "REFAULTED": 1}
    assert j["examples"]["STALE"]["state"] == "RETIRED"


def test_judge_all_refaulted():
    j = oracle.judge([rec(i) for i in range(8)], buffer_id=BID, generation=GEN)
    assert j == {"verdict": "REFAULTED", "pages": {"REFAULTED": 8}, "examples": {}}


def test_judge_stale_only():
    j = oracle.judge([rec(0), rec(1, gen=GEN - 1)], buffer_id=BID, generation=GEN)
    assert j["verdict"] == "STALE"


def test_judge_empty_is_torn():
    j = oracle.judge([], buffer_id=BID, generation=GEN)
    assert j["verdict"] == "TORN"
    assert j["pages"] == {}


def test_worst():
    assert oracle.worst(["REFAULTED", "STALE"]) == "STALE"
    assert oracle.worst(["TORN", "GUEST_FAULT", "LOST_WRITE"]) == "GUEST_FAULT"
    assert oracle.worst(["GUEST_FAULT", "VMM_FAULT"]) == "VMM_FAULT"
    assert oracle.worst(["STALE", "LOST_WRITE", "REFAULTED"]) == "LOST_WRITE"


def test_judge_on_parsed_stamps():
    """Records built from real pages the way the host agent builds them."""
    pages = [stamp.stamp_page(BID, GEN, 0), stamp.stamp_page(BID, GEN - 1, 1),
             stamp.stamp_page(BID, GEN, 2, stamp.RETIRED)]
    recs = []
    for i, p in enumerate(pages):
        s = stamp.parse_page(p)
        recs.append([i, "ok" if s.valid else "bad", s.buffer_id, s.generation, s.index, s.state, s.tag])
    j = oracle.judge(recs, buffer_id=BID, generation=GEN)
    assert j["pages"] == {"REFAULTED": 1, "STALE": 2}
    assert j["verdict"] == "STALE"
