"""The verdict on what a guest read, page by page, against what the exporter says is current.

Per page: REFAULTED (current generation, LIVE, ours), STALE (older generation or RETIRED),
TORN (bad magic/checksum/pattern, wrong buffer or page index, or a generation from the
future), LOST_WRITE (current page but the tag the guest wrote before the move is gone).
Per move the worst page decides, in this order: VMM_FAULT and GUEST_FAULT (from the run,
not from pages) > TORN > LOST_WRITE > STALE > REFAULTED.
"""
from __future__ import annotations

from collections import Counter

from . import stamp

VERDICTS = ("REFAULTED", "STALE", "TORN", "LOST_WRITE", "VMM_FAULT", "GUEST_FAULT")
_RANK = {"REFAULTED": 0, "STALE": 1, "LOST_WRITE": 2, "TORN": 3, "GUEST_FAULT": 4, "VMM_FAULT": 5}


def page_verdict(rec: list, *, buffer_id: int, generation: int, expect_tag: int | None = None) -> str:
    index, status, bid, gen, idx, state, tag = rec[:7]
    if status != "ok" or bid != buffer_id or idx != index or gen > generation:
        return "TORN"
    if gen < generation or state == stamp.RETIRED:
        return "STALE"
    if state != stamp.LIVE:
        return "TORN"
    if expect_tag is not None and tag != expect_tag:
        return "LOST_WRITE"
    return "REFAULTED"


def judge(records: list, *, buffer_id: int, generation: int, expect_tag: int | None = None) -> dict:
    counts = Counter(page_verdict(r, buffer_id=buffer_id, generation=generation, expect_tag=expect_tag)
                     for r in records)
    verdict = max(counts, key=_RANK.__getitem__) if counts else "TORN"
    examples = {}
    for r in records:
        v = page_verdict(r, buffer_id=buffer_id, generation=generation, expect_tag=expect_tag)
        if v != "REFAULTED" and v not in examples:
            examples[v] = {"page": r[0], "status": r[1], "buffer_id": r[2], "generation": r[3],
                           "page_index": r[4], "state": stamp.STATE_NAMES.get(r[5], r[5]), "tag": r[6]}
    return {"verdict": verdict, "pages": dict(counts), "examples": examples}


def worst(verdicts: list[str]) -> str:
    return max(verdicts, key=_RANK.__getitem__)
