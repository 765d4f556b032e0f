"""`vmlab compare A B`: what changed between two results (yesterday and today, QEMU 10 and
11, kernel A and B).

A and B are each a `vmlab matrix` (or merged) results directory or a `vmlab run` results
directory. Cells are paired by (entry, lab kernel); for each: the verdicts on both sides,
whether each met its expectation, and the change. Timing: the per-move samples of a cell
(seconds from the move to the end of the guest's verified read) are compared with a
two-sided permutation test on the difference of medians (fixed seed, so the same inputs
give the same p; the A/B approach of Firecracker's performance tests), reported with the
medians; a change counts only at p < 0.01 with at least 5 samples a side.

Exit status: 1 when a cell that matched in A does not in B (a regression), else 0; 2 for
bad input. Writes compare.json and report.html into --out (default results/<UTC>-compare/).
"""
from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

from . import report
from .errors import UserError
from .merge import results_of
from .paths import read_json

ALPHA, MIN_SAMPLES, PERMUTATIONS = 0.01, 5, 4000


def _samples(res: dict | None) -> list[float]:
    return [m["seconds"] for m in (res or {}).get("moves") or []
            if isinstance(m.get("seconds"), (int, float)) and m.get("verdict") not in (None, "VMM_FAULT")]


def load_side(d: Path) -> dict[tuple[str, str], dict]:
    """(entry, kernel) -> {verdicts, match, samples, results} of one side."""
    doc = read_json(d / "matrix.json")
    out = {}
    if doc is not None and isinstance(doc.get("cells"), list):
        for c in doc["cells"]:
            if not isinstance(c, dict) or not isinstance(c.get("entry"), str) or \
                    not isinstance(c.get("kernel_suite"), str):
                raise UserError(f"{d / 'matrix.json'}: a cell without entry or kernel_suite")
            where = results_of(d, c)
            res = read_json(where / "results.json") if where else None
            out[(c["entry"], c["kernel_suite"])] = {
                "verdicts": c.get("verdicts") or [], "match": c.get("match"),
                "reason": c.get("reason"), "samples": _samples(res), "results": str(where or "")}
        return out
    res = read_json(d / "results.json")
    if res is None or "experiment" not in res:
        raise UserError(f"{d}: neither a matrix.json nor a vmlab run's results.json")
    checks = ([res["baseline"]] if "baseline" in res else []) + list(res.get("moves") or [])
    match = None if res.get("not_applicable") else bool(res.get("passed"))
    key = (res["experiment"], (res.get("options") or {}).get("kernel") or "?")
    out[key] = {"verdicts": [c.get("verdict") for c in checks], "match": match,
                "reason": res.get("not_applicable"), "samples": _samples(res), "results": str(d)}
    return out


def permutation_p(a: list[float], b: list[float], n: int = PERMUTATIONS, seed: int = 1) -> float:
    """Two-sided p of the difference of medians under random relabelling."""
    observed = abs(statistics.median(b) - statistics.median(a))
    pooled, k = a + b, len(a)
    rnd = random.Random(seed)
    hits = 0
    for _ in range(n):
        rnd.shuffle(pooled)
        if abs(statistics.median(pooled[k:]) - statistics.median(pooled[:k])) >= observed - 1e-12:
            hits += 1
    return (hits + 1) / (n + 1)


def timing(a: list[float], b: list[float]) -> dict:
    t = {"n_a": len(a), "n_b": len(b)}
    if a and b:
        t.update(median_a=round(statistics.median(a), 4), median_b=round(statistics.median(b), 4))
    if len(a) >= MIN_SAMPLES and len(b) >= MIN_SAMPLES:
        t["p"] = round(permutation_p(a, b), 4)
        t["changed"] = t["p"] < ALPHA
    else:
        t["changed"] = None   # too few samples to say
    return t


def compare(a: dict, b: dict) -> list[dict]:
    rows = []
    for key in list(a) + [k for k in b if k not in a]:
        ca, cb = a.get(key), b.get(key)
        row = {"entry": key[0], "kernel": key[1],
               "a": {k: ca[k] for k in ("verdicts", "match", "results")} if ca else None,
               "b": {k: cb[k] for k in ("verdicts", "match", "results")} if cb else None}
        if ca and cb:
            if ca["match"] is True and cb["match"] is not True:
                row["change"] = "REGRESSION"
            elif ca["match"] is not True and cb["match"] is True:
                row["change"] = "fixed"
            elif ca["verdicts"] != cb["verdicts"]:
                row["change"] = "verdicts changed"
            else:
                row["change"] = "same"
            row["timing"] = timing(ca["samples"], cb["samples"])
        elif ca:
            # a cell that matched and is gone is no better than one that stopped matching
            row["change"] = "REGRESSION" if ca["match"] is True else "only in A"
            row["why"] = "missing from B"
        else:
            row["change"] = "only in B"
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    def v(side):
        word = {True: "match", False: "MISMATCH", None: "n/a"}[side["match"]] if side else ""
        return " ".join(map(str, side["verdicts"])) + f" ({word})" if side else "-"
    lines = [f"{'cell':40} {'A':38} {'B':38} {'change':16} timing"]
    for r in rows:
        t = r.get("timing") or {}
        tm = (f"{t['median_a']}s -> {t['median_b']}s" if "median_a" in t else "-") + \
             (f" p={t['p']}" if "p" in t else "") + (" CHANGED" if t.get("changed") else "")
        lines.append(f"{r['entry'] + '[' + r['kernel'] + ']':40} {v(r['a']):38} {v(r['b']):38} "
                     f"{r['change']:16} {tm}")
    return "\n".join(lines)


def main(args, progress) -> int:
    from .run_dir import results_dir
    sides = []
    for name in (args.a, args.b):
        d = Path(name)
        if not d.is_dir():
            raise UserError(f"{name}: no such results directory")
        sides.append(load_side(d))
    rows = compare(*sides)
    out = results_dir("compare", args.out)
    (out / "compare.json").write_text(json.dumps({"a": args.a, "b": args.b, "cells": rows,
                                                  "alpha": ALPHA}, indent=2) + "\n")
    (out / "report.html").write_text(report.compare_html(rows, args.a, args.b))
    print(table(rows))
    bad = [r for r in rows if r["change"] == "REGRESSION"]
    progress(f"compare: {len(rows)} cells, {len(bad)} regressions; {out}/report.html")
    return 1 if bad else 0
