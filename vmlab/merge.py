"""`vmlab report merge DIR... --out DIR`: one matrix from the results of many machines.

Each DIR is a `vmlab matrix` results directory (a shard's, or a whole matrix) or a single
`vmlab run` results directory. The merge copies every cell's results directory under
``<out>/<kernel>/<entry>/`` (so the merged directory is one self-contained artifact), and
writes ``matrix.json``, ``junit.xml`` and ``report.html`` as `vmlab matrix` does. A cell
that two inputs both hold, or an input that is not a results directory, is bad input
(exit 2, nothing written). Shards are checked for completeness: when the inputs say
"shard K/N", every K of 1..N must be there, else the merge says which are missing and
exits 125 (the matrix could not be judged whole) unless a cell missed (1).
"""
from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

from . import config as cfgmod
from . import report
from .errors import UserError
from .matrix import cell_record, exit_status, write_junit
from .paths import read_json


def results_of(d: Path, c: dict) -> Path | None:
    """A cell's results directory: beside its matrix.json first (``results_rel``, also after
    the directory moved from another machine), the recorded absolute path only for an older
    matrix.json without it."""
    rel = c.get("results_rel")
    if isinstance(rel, str) and rel and not Path(rel).is_absolute() and ".." not in Path(rel).parts:
        return d / rel if (d / rel).is_dir() else None
    where = Path(c.get("results") or "")
    return where if where.is_absolute() and where.is_dir() else None


def _cells_of(d: Path) -> tuple[dict, list[tuple[dict, Path]]]:
    """(input summary, [(cell, its results directory)]) of one input directory."""
    doc = read_json(d / "matrix.json")
    if doc is not None:
        if not isinstance(doc.get("cells"), list):
            raise UserError(f"{d / 'matrix.json'}: no 'cells' list (not a vmlab matrix.json)")
        out = []
        for c in doc["cells"]:
            if not isinstance(c, dict) or not isinstance(c.get("entry"), str) or \
                    not isinstance(c.get("kernel_suite"), str) or "match" not in c:
                raise UserError(f"{d / 'matrix.json'}: a cell without entry, kernel_suite or match")
            where = results_of(d, c)
            if where is None:
                raise UserError(f"{d / 'matrix.json'}: the results of cell {c.get('entry')}"
                                f"[{c.get('kernel_suite')}] are in neither {c.get('results')} nor "
                                f"{d / (c.get('results_rel') or '?')}")
            out.append((c, where))
        return ({"dir": str(d), "shard": doc.get("shard"), "status": doc.get("status"),
                 "planned_kernels": doc.get("planned_kernels") or doc.get("kernels") or [],
                 "kernels": doc.get("kernels") or [], "entries": doc.get("entries") or []}, out)
    res = read_json(d / "results.json")
    if res is None or "experiment" not in res or not isinstance(res.get("config"), dict):
        raise UserError(f"{d}: neither a matrix.json nor a vmlab run's results.json")
    exp = cfgmod.Experiment(str(d / "results.json"), res["config"])
    kernel = (res.get("options") or {}).get("kernel") or "?"
    cell = cell_record(exp, kernel, res, d, 0.0)
    return ({"dir": str(d), "shard": None, "status": res.get("status"), "kernels": [kernel],
             "entries": [exp.name]}, [(cell, d)])


def merge(dirs: list[str], out_arg: str | None, progress) -> int:
    from .run_dir import results_dir
    inputs, cells, seen = [], [], {}
    for name in dirs:
        d = Path(name)
        if not d.is_dir():
            raise UserError(f"{name}: no such results directory")
        summary, got = _cells_of(d)
        for c, where in got:
            key = (c["entry"], c["kernel_suite"])
            if key in seen:
                raise UserError(f"{d}: cell {key[0]}[{key[1]}] is also in {seen[key]}: "
                                f"merge each cell once")
            seen[key] = str(d)
            cells.append((c, where))
        inputs.append(summary)
    kernels, entries = [], []
    for s in inputs:
        kernels += [k for k in s["kernels"] if k not in kernels]
        entries += [e for e in s["entries"] if e not in entries]
    # one cut per --kernels list: every K of 1..N of it must be there
    cuts: dict = {}
    for s in inputs:
        if s["shard"]:
            try:
                k, n = (int(x) for x in str(s["shard"]).split("/"))
            except ValueError:
                raise UserError(f"{s['dir']}/matrix.json: shard {s['shard']!r} is not K/N")
            # one cut: the same kernels and entries (--kernels, --only, the catalog)
            cut = f"{','.join(s['planned_kernels'])} x {','.join(s['entries'])}"
            cuts.setdefault(cut, {}).setdefault(n, set()).add(k)
    missing = []
    for kernels_cut, by_n in cuts.items():
        if len(by_n) > 1:
            raise UserError(f"shards of {kernels_cut} cut into "
                            f"{' and '.join(map(str, sorted(by_n)))}: merge shards of one cut")
        [(n, have)] = by_n.items()
        missing += [f"{k}/{n} of {kernels_cut}" for k in range(1, n + 1) if k not in have]

    out = results_dir("merged", out_arg)
    merged = []
    for c, where in cells:
        dst = out / c["kernel_suite"] / c["entry"]
        shutil.copytree(where, dst, symlinks=True)
        merged.append(dict(c, results=str(dst), results_rel=str(dst.relative_to(out)),
                           reproduce=str(dst / "reproduce.sh")))
    unfinished = [s["dir"] for s in inputs if s["status"] not in ("finished", "not_applicable")]
    m = [c["match"] for c in merged]
    result = {"merged_at": datetime.now(timezone.utc).isoformat(), "merged_from": inputs,
              "status": "finished" if not (missing or unfinished) else "incomplete",
              "missing_shards": missing, "unfinished_inputs": unfinished,
              "kernels": kernels, "entries": entries, "cells": merged,
              "summary": {"cells": len(m), "match": m.count(True), "mismatch": m.count(False),
                          "not_applicable": m.count(None)}}
    (out / "matrix.json").write_text(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
    write_junit(out / "junit.xml", merged)
    (out / "report.html").write_text(report.matrix_html(result, base=out))
    rc = exit_status(merged) if merged else 125
    if rc == 0 and (missing or unfinished):
        rc = 125
    if missing:
        progress(f"merge: shards {', '.join(missing)} are missing")
    if unfinished:
        progress(f"merge: not finished: {', '.join(unfinished)}")
    progress(f"merge: {len(inputs)} inputs, {result['summary']}; {out}/report.html")
    return rc
