"""`vmlab bench`: measured numbers, as JSON. Nothing here asserts a time; the numbers are
for people and for nightly trend lines (and the lab flake rate: a flaky lab poisons every
verdict, so boots are repeated and failures counted, not retried away)."""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from argparse import Namespace
from pathlib import Path

from . import images
from .errors import VmlabError
from .paths import state_dir


def _stats(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0}
    s = sorted(xs)
    return {"n": len(s), "min": round(s[0], 3), "median": round(statistics.median(s), 3),
            "max": round(s[-1], 3), "p99": round(s[min(len(s) - 1, int(len(s) * 0.99))], 3)}


def bench_build(progress) -> dict:
    """Cold builds into a throw-away cache (never touches the user's), then warm lookups."""
    out = {}
    old = os.environ.get("VMLAB_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="vmlab-bench-") as tmp:
        os.environ["VMLAB_CACHE_DIR"] = tmp
        try:
            for kind in ("guest", "lab"):
                r = images.recipe(kind)
                t = time.monotonic()
                images.build(r, progress)
                cold = time.monotonic() - t
                t = time.monotonic()
                _, built = images.ensure(r, progress)
                warm = time.monotonic() - t
                out[kind] = {"cold_seconds": round(cold, 1), "warm_seconds": round(warm, 3),
                             "warm_rebuilt": built}
        finally:
            if old is None:
                os.environ.pop("VMLAB_CACHE_DIR", None)
            else:
                os.environ["VMLAB_CACHE_DIR"] = old
    return out


def bench_boot(args, progress, repeat: int) -> dict:
    from .stack import Stack
    lab_s, guest_s, failures = [], [], []
    for i in range(repeat):
        try:
            with Stack(args, state_dir() / "bench" / f"boot-{i}", progress) as s:
                s.up()
                lab_s.append(s.lab.boot_seconds)
                guest_s.append(s.guest.boot_seconds)
                accel = s.lab.accel
        except VmlabError as e:
            failures.append(str(e)[:300])
    return {"lab_boot_seconds": _stats(lab_s), "guest_boot_seconds_to_ssh": _stats(guest_s),
            "runs": repeat, "failures": failures, "flake_rate": round(len(failures) / repeat, 3),
            "lab_accel": locals().get("accel")}


def bench_move(args, progress, sizes=("1M", "64M"), moves: int = 20) -> dict:
    from . import config as cfgmod
    from .experiment import Run
    out = {}
    for size in sizes:
        d = Path(tempfile.mkdtemp(prefix=f"vmlab-bench-move-{size}-"))
        cfg = d / "bench.yaml"
        cfg.write_text(f"version: 1\nname: bench-{size}\nexporter: {{kind: vmlab, size: {size}}}\n"
                       f"moves:\n  - {{mode: MIGRATE, count: {moves}, concurrent: true, expect: REFAULTED}}\n")
        exp = cfgmod.load(cfg)
        r = Run(exp, Namespace(**{**vars(args), "accel": args.accel, "kernel": args.kernel}), d, progress)
        r.run()
        res = r.result
        secs = [m["seconds"] for m in res["moves"] if m.get("seconds") is not None]
        lat = [m["watch"]["latency_s"] for m in res["moves"]
               if m.get("watch", {}).get("latency_s") is not None]
        out[size] = {"passed": res["passed"], "moves": len(res["moves"]),
                     "verified_moves_per_second": round(len(secs) / sum(secs), 3) if secs else None,
                     "move_plus_verified_read_seconds": _stats(secs),
                     "move_to_guest_latency_seconds": _stats(lat),
                     "latency_note": "controller clock from sending MOVE to receiving the guest "
                                     "agent's watch line: an upper bound including SSH transport",
                     "results": str(d)}
    return out


def run(args, progress) -> dict:
    what = [w.strip() for w in args.what.split(",") if w.strip()]
    res: dict = {"what": what, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if "build" in what:
        res["image_build"] = bench_build(progress)
    if "boot" in what:
        res["boot"] = bench_boot(args, progress, max(1, args.repeat))
    if "move" in what:
        res["move"] = bench_move(args, progress)
    return res


def render(res: dict) -> str:
    import json
    return json.dumps(res, indent=2)
