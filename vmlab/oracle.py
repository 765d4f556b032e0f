"""The verdict on what a guest read, page by page, against what the exporter says is current.

Per page: REFAULTED (current generation, LIVE, ours), STALE (older generation or RETIRED),
TORN (bad magic/checksum/pattern, wrong buffer or page index, or a generation from the
future), LOST_WRITE (current page but the tag the guest wrote before the move is gone).
Per move the worst page decides, in this order: VMM_FAULT and GUEST_FAULT (from the run,
not from pages) > TORN > NOT_ZAPPED > LOST_WRITE > STALE > REFAULTED.

A read that does not cover the buffer exactly (a page missing, a page twice, a record
outside the buffer) is TORN: a verdict over part of the buffer would let stale pages pass
unseen. Evidence from outside the full read can only make a move worse, never better:
the watcher's stale observations (``watch_stale``) and the exporter's counters around a
ZAP_ONLY (``zap_evidence``).
"""
from __future__ import annotations

from collections import Counter

from . import stamp

VERDICTS = ("REFAULTED", "STALE", "TORN", "LOST_WRITE", "NOT_ZAPPED", "VMM_FAULT", "GUEST_FAULT",
            "HW_STALE")
# HW_STALE: the stamps saw nothing wrong, the hardware oracle saw a retired page hit
_RANK = {"REFAULTED": 0, "HW_STALE": 1, "STALE": 1, "LOST_WRITE": 2, "NOT_ZAPPED": 3, "TORN": 4,
         "GUEST_FAULT": 5, "VMM_FAULT": 6}


def page_verdict(rec: list, *, buffer_id: int, generation: int | list[int],
                 expect_tag: int | None = None) -> str:
    """``generation``: the one every page must show, or one per page (after a page-range
    move only the range carries the new generation)."""
    index, status, bid, gen, idx, state, tag = rec[:7]
    if isinstance(generation, list):
        if not (isinstance(index, int) and 0 <= index < len(generation)):
            return "TORN"
        generation = generation[index]
    if status != "ok" or bid != buffer_id or idx != index or gen > generation:
        return "TORN"
    if gen < generation or state == stamp.RETIRED:
        return "STALE"
    if state != stamp.LIVE:
        return "TORN"
    if expect_tag is not None and tag != expect_tag:
        return "LOST_WRITE"
    return "REFAULTED"


def records(reply: dict) -> list[list]:
    """The guest agent's read as one record per page, [index, status, buffer_id,
    generation, page_index, state, tag]: its "runs" expanded ([index, count, status,
    buffer_id, generation, page_index, state, tag], page_index counting up), or the
    "records" of an agent that sends them whole. A run that is no run, or more pages than
    the read's "pages", is a garbled reply: ValueError, never a verdict."""
    if "runs" not in reply:
        return reply["records"]
    out: list[list] = []
    limit = reply.get("pages")
    for run in reply["runs"]:
        if not (isinstance(run, list) and len(run) == 8 and isinstance(run[2], str) and
                all(isinstance(run[k], int) and not isinstance(run[k], bool) for k in (0, 1, 3, 4, 5, 6, 7))
                and run[1] >= 1):
            raise ValueError(f"guest agent: not a run of pages: {str(run)[:80]}")
        index, count, status, bid, gen, page_index, state, tag = run
        if not isinstance(limit, int) or len(out) + count > limit:
            raise ValueError(f"guest agent: runs of more pages than the {limit} it read")
        out.extend([index + k, status, bid, gen, page_index + k, state, tag] for k in range(count))
    return out


def coverage_error(records: list, npages: int) -> str | None:
    """None when ``records`` hold each page 0..npages-1 exactly once, else what is wrong."""
    if len(records) != npages:
        return f"{len(records)} page records for a {npages}-page buffer"
    seen = Counter(r[0] for r in records)
    dup = sorted(i for i, n in seen.items() if n > 1)
    out = sorted(i for i in seen if not (isinstance(i, int) and 0 <= i < npages))
    if dup or out:
        return f"pages read twice: {dup[:8]}; outside the buffer: {out[:8]}"
    return None


def judge(records: list, *, buffer_id: int, generation: int | list[int], npages: int,
          expect_tag: int | None = None) -> dict:
    verdicts = [page_verdict(r, buffer_id=buffer_id, generation=generation, expect_tag=expect_tag)
                for r in records]
    counts = Counter(verdicts)
    examples = {}
    for r, v in zip(records, verdicts):
        if v != "REFAULTED" and v not in examples:
            examples[v] = {"page": r[0], "status": r[1], "buffer_id": r[2], "generation": r[3],
                           "page_index": r[4], "state": stamp.STATE_NAMES.get(r[5], r[5]), "tag": r[6]}
    out = {"pages": dict(counts), "examples": examples,
           "page_map": page_map(records, verdicts, npages)}
    cov = coverage_error(records, npages)
    if cov:
        out.update(verdict="TORN", coverage_error=cov)
    else:
        out["verdict"] = max(counts, key=_RANK.__getitem__)
    return out


def page_map(records: list, verdicts: list[str], npages: int) -> list[list]:
    """Each page's verdict in page order, run-length encoded ([[verdict, pages], ...]): the
    report's grid of the buffer. A page not read (or read twice) shows as MISSING (or the
    worse of its verdicts)."""
    by_page: list[str | None] = [None] * npages
    for r, v in zip(records, verdicts):
        i = r[0]
        if isinstance(i, int) and 0 <= i < npages:
            by_page[i] = v if by_page[i] is None else worst([by_page[i], v])
    runs: list[list] = []
    for v in by_page:
        v = v or "MISSING"
        if runs and runs[-1][0] == v:
            runs[-1][1] += 1
        else:
            runs.append([v, 1])
    return runs


def worst(verdicts: list[str]) -> str:
    return max(verdicts, key=_RANK.__getitem__)


def watch_stale(events: list[dict], *, generation: int) -> dict:
    """Stale observations among the watcher's lines received during one move window.

    Certain evidence only: a page seen RETIRED (the exporter stamps RETIRED after its zap,
    so a reader that sees it went through a mapping the zap should have removed), or a
    page whose generation went back after the watcher had seen a newer one. A line that
    shows the previous generation LIVE is not stale: it may have been read before the zap.
    A HOLE (status "hole": no stamp, all zeros or all ones) is a read that fell into a
    VMM's unmap window: counted as its own class, never as stale.
    """
    retired, regressed, newest = [], [], {}
    holes = sum(1 for ev in events if ev.get("status") == "hole")
    for ev in events:
        if ev.get("status") != "ok" or "generation" not in ev:
            continue
        page, gen = ev.get("page"), ev["generation"]
        if ev.get("state") == stamp.RETIRED:
            retired.append(ev)
        elif gen < newest.get(page, 0):
            regressed.append(ev)
        newest[page] = max(newest.get(page, 0), gen)
    n = len(retired) + len(regressed)
    res = {"stale_observations": n, "retired_seen": len(retired), "generation_regressions": len(regressed),
           "holes": holes}
    if n:
        ex = (retired or regressed)[0]
        res["example"] = {k: ex.get(k) for k in ("page", "generation", "state", "t_ns")}
        res["detail"] = (f"the guest watcher saw page {ex.get('page')} at generation "
                         f"{ex.get('generation')} state {stamp.STATE_NAMES.get(ex.get('state'), ex.get('state'))} "
                         f"during the move to generation {generation}")
    return res


def zap_evidence(before: dict, after: dict, npages: int) -> dict:
    """A ZAP_ONLY keeps pages and generation, so stamps alone call it REFAULTED whatever
    happened. It counts only if the exporter zapped (zaps +1) and every page was faulted
    in again afterwards (refaulted_pages == npages): otherwise NOT_ZAPPED."""
    zaps = after.get("zaps", 0) - before.get("zaps", 0)
    faults = after.get("faults", 0) - before.get("faults", 0)
    refaulted = after.get("refaulted_pages")
    ok = zaps >= 1 and refaulted == npages and faults >= npages
    res = {"zaps": zaps, "faults": faults, "refaulted_pages": refaulted, "npages": npages, "ok": ok}
    if not ok:
        res["detail"] = (f"zap changed nothing: zaps +{zaps}, faults +{faults}, "
                         f"{refaulted}/{npages} pages faulted in again after the zap")
    return res


BAD_KERNEL_WORDS = ("WARNING:", "BUG:", "Oops", "general protection fault", "kernel BUG",
                    "KASAN", "UBSAN", "Call Trace", "list_del corruption", "refcount_t:")

TAINT_FLAGS = "PFSRMBUDAWCIOELKXTN"  # bit i -> letter, as in kernel/panic.c taint_flags


def taint_letters(mask: int) -> str:
    return "".join(ch for i, ch in enumerate(TAINT_FLAGS) if mask >> i & 1)


def kernel_health(dmesg_before: str, dmesg_after: str, taint_before: int, taint_after: int) -> dict:
    """What the kernel said during the run: WARN/BUG/Oops lines that are new since the run
    started, and taint flags that appeared (W after a WARN, D after an oops...)."""
    old = set(dmesg_before.splitlines())
    new_lines = [ln for ln in dmesg_after.splitlines() if ln not in old]
    bad = [ln for ln in new_lines if any(w in ln for w in BAD_KERNEL_WORDS)]
    new_taint = taint_after & ~taint_before
    return {"bad_lines": bad[:50], "bad_line_count": len(bad), "taint_before": taint_before,
            "taint_after": taint_after, "new_taint": taint_letters(new_taint),
            "ok": not bad and not new_taint}
