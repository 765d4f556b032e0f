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
    j = oracle.judge(recs, buffer_id=BID, generation=GEN, npages=len(recs), expect_tag=TAG)
    assert j["verdict"] == "LOST_WRITE"
    assert j["pages"] == {"REFAULTED": 3, "STALE": 1, "LOST_WRITE": 1}
    assert set(j["examples"]) == {"STALE", "LOST_WRITE"}
    assert j["examples"]["STALE"]["page"] == 2
    assert j["examples"]["STALE"]["state"] == "LIVE"
    assert j["examples"]["LOST_WRITE"]["tag"] == 0


def test_judge_torn_wins():
    recs = [rec(0, state=RETIRED), rec(1, status="bad_magic"), rec(2, tag=1), rec(3)]
    j = oracle.judge(recs, buffer_id=BID, generation=GEN, npages=len(recs), expect_tag=TAG)
    assert j["verdict"] == "TORN"
    assert j["pages"] == {"STALE": 1, "TORN": 1, "LOST_WRITE": 1, "REFAULTED": 1}
    assert j["examples"]["STALE"]["state"] == "RETIRED"


def test_judge_all_refaulted():
    j = oracle.judge([rec(i) for i in range(8)], buffer_id=BID, generation=GEN, npages=8)
    assert j == {"verdict": "REFAULTED", "pages": {"REFAULTED": 8}, "examples": {},
                 "page_map": [["REFAULTED", 8]]}


def test_judge_stale_only():
    j = oracle.judge([rec(0), rec(1, gen=GEN - 1)], buffer_id=BID, generation=GEN, npages=2)
    assert j["verdict"] == "STALE"


def test_judge_empty_is_torn():
    j = oracle.judge([], buffer_id=BID, generation=GEN, npages=4)
    assert j["verdict"] == "TORN"
    assert j["pages"] == {}
    assert "0 page records for a 4-page buffer" in j["coverage_error"]


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
    j = oracle.judge(recs, buffer_id=BID, generation=GEN, npages=3)
    assert j["pages"] == {"REFAULTED": 1, "STALE": 2}
    assert j["verdict"] == "STALE"


# --- coverage: a read that misses pages must not pass (the stale ones may be the missing ones)
@pytest.mark.parametrize("indices,npages,why", [
    ([0, 1, 2], 4, "3 page records for a 4-page buffer"),
    ([0, 1, 2, 3, 3], 4, "5 page records"),
    ([0, 1, 1, 3], 4, "pages read twice: [1]"),
    ([0, 1, 2, 9], 4, "outside the buffer: [9]"),
])
def test_judge_checks_coverage(indices, npages, why):
    recs = [rec(i) for i in indices]
    j = oracle.judge(recs, buffer_id=BID, generation=GEN, npages=npages)
    assert j["verdict"] == "TORN"
    assert why in j["coverage_error"]


def test_judge_full_coverage_has_no_error():
    j = oracle.judge([rec(i) for i in range(4)], buffer_id=BID, generation=GEN, npages=4)
    assert j["verdict"] == "REFAULTED" and "coverage_error" not in j


# --- watch mode: stale observations decide the move
def ev(page, gen, state=LIVE, status="ok"):
    return {"page": page, "generation": gen, "state": state, "status": status, "t_ns": 1}


def test_watch_retired_page_is_stale():
    w = oracle.watch_stale([ev(0, 4), ev(0, 4, RETIRED), ev(0, 5)], generation=5)
    assert w["stale_observations"] == 1 and w["retired_seen"] == 1
    assert "page 0 at generation 4 state RETIRED" in w["detail"]


def test_watch_generation_regression_is_stale():
    w = oracle.watch_stale([ev(7, 5), ev(7, 4), ev(7, 5)], generation=5)
    assert w["generation_regressions"] == 1 and w["stale_observations"] == 1


def test_watch_old_live_before_the_zap_is_not_stale():
    # the previous generation LIVE may have been read before the zap: not evidence
    w = oracle.watch_stale([ev(0, 4), ev(255, 4), ev(0, 5), ev(255, 5)], generation=5)
    assert w["stale_observations"] == 0 and "detail" not in w


def test_watch_ignores_bad_reads_and_done_lines():
    w = oracle.watch_stale([ev(0, 5), {"done": True}, ev(0, 1, RETIRED, status="bad_magic")], generation=5)
    assert w["stale_observations"] == 0


# --- ZAP_ONLY: a zap that changed nothing is NOT_ZAPPED
def info(zaps, faults, refaulted):
    return {"zaps": zaps, "faults": faults, "refaulted_pages": refaulted}


@pytest.mark.parametrize("before,after,ok", [
    (info(3, 512, 0), info(4, 768, 256), True),
    (info(3, 512, 0), info(3, 512, 256), False),    # no zap at all
    (info(3, 512, 0), info(4, 512, 0), False),      # zapped, nothing refaulted
    (info(3, 512, 0), info(4, 700, 188), False),    # only part of the buffer refaulted
    (info(3, 512, 0), {"zaps": 4, "faults": 768}, False),  # exporter without refault evidence
])
def test_zap_evidence(before, after, ok):
    ev_ = oracle.zap_evidence(before, after, 256)
    assert ev_["ok"] is ok
    assert ("detail" in ev_) is (not ok)


def test_not_zapped_ranks_above_lost_write_below_torn():
    assert oracle.worst(["NOT_ZAPPED", "LOST_WRITE", "STALE"]) == "NOT_ZAPPED"
    assert oracle.worst(["NOT_ZAPPED", "TORN"]) == "TORN"


# --- kernel health: what the run provoked, not what was there before
def test_kernel_health_new_warn_and_taint():
    before = "[ 1.0] boot\n[ 2.0] WARNING: old one at boot\n"
    after = before + "[ 9.0] WARNING: CPU: 0 PID: 12 at mm/memory.c:123\n[ 9.1] ok line\n"
    h = oracle.kernel_health(before, after, taint_before=0x3000, taint_after=0x3000 | 0x200)
    assert h["ok"] is False and h["bad_line_count"] == 1 and "mm/memory.c" in h["bad_lines"][0]
    assert h["new_taint"] == "W"


def test_kernel_health_quiet_run():
    h = oracle.kernel_health("a\n", "a\nb\n", 0x3000, 0x3000)
    assert h["ok"] is True and h["new_taint"] == ""


def test_per_page_generations_after_a_page_range_move():
    # page 2 moved to generation 6, the others stay at 5
    gens = [GEN, GEN, GEN + 1, GEN]
    recs = [rec(0), rec(1), rec(2, gen=GEN + 1), rec(3)]
    j = oracle.judge(recs, buffer_id=BID, generation=gens, npages=4)
    assert j["verdict"] == "REFAULTED" and j["pages"] == {"REFAULTED": 4}
    # the moved page still old: STALE; an unmoved page at the new generation: TORN
    j = oracle.judge([rec(0), rec(1), rec(2), rec(3)], buffer_id=BID, generation=gens, npages=4)
    assert j["verdict"] == "STALE" and j["examples"]["STALE"]["page"] == 2
    j = oracle.judge([rec(0, gen=GEN + 1), rec(1), rec(2, gen=GEN + 1), rec(3)], buffer_id=BID,
                     generation=gens, npages=4)
    assert j["verdict"] == "TORN"
    # a record outside the per-page list is TORN, never an IndexError
    assert pv(rec(9), gen=gens) == "TORN" and pv(rec("x"), gen=gens) == "TORN"


def test_watch_holes_are_their_own_class_never_stale():
    # reads in a VMM's unmap window see no stamp: counted, and the move is not stale for it
    w = oracle.watch_stale([ev(0, 4), ev(0, 0, 0, status="hole"), ev(0, 0, 0, status="hole"),
                            ev(0, 5)], generation=5)
    assert w["holes"] == 2 and w["stale_observations"] == 0 and "detail" not in w


def test_page_map_is_the_buffer_in_page_order_run_length_encoded():
    recs = [rec(i) for i in range(6)]
    recs[3] = rec(3, gen=GEN - 1)          # one stale page in the middle
    del recs[5]                            # and the last page never read
    j = oracle.judge(recs, buffer_id=BID, generation=GEN, npages=6)
    assert j["page_map"] == [["REFAULTED", 3], ["STALE", 1], ["REFAULTED", 1], ["MISSING", 1]]


def test_runs_expand_to_the_records_they_stand_for():
    reply = {"pages": 5, "runs": [[0, 3, "ok", 7, 2, 10, 1, 0], [3, 2, "bad_csum", 7, 1, 13, 2, 5]]}
    assert oracle.records(reply) == [[0, "ok", 7, 2, 10, 1, 0], [1, "ok", 7, 2, 11, 1, 0],
                                     [2, "ok", 7, 2, 12, 1, 0], [3, "bad_csum", 7, 1, 13, 2, 5],
                                     [4, "bad_csum", 7, 1, 14, 2, 5]]
    assert oracle.records({"records": [[0, "ok", 7, 2, 0, 1, 0]]}) == [[0, "ok", 7, 2, 0, 1, 0]]


@pytest.mark.parametrize("runs", [[[0, 0, "ok", 7, 2, 0, 1, 0]], [[0, 1, "ok", 7, 2, 0, 1]],
                                  [[0, "1", "ok", 7, 2, 0, 1, 0]], [[0, True, "ok", 7, 2, 0, 1, 0]],
                                  [[0, 10**12, "ok", 7, 2, 0, 1, 0]], [[0, 1, 3, 7, 2, 0, 1, 0]], ["x"]])
def test_a_garbled_run_is_an_error_not_a_verdict(runs):
    with pytest.raises(ValueError):
        oracle.records({"pages": 4, "runs": runs})
