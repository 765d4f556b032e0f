"""`vmlab bench`: measured numbers, as JSON. Nothing here asserts a time; the numbers are
for people and for nightly trend lines (and the lab flake rate: a flaky lab poisons every
verdict, so boots are repeated and failures counted, not retried away)."""
from __future__ import annotations

import os
import statistics
import tempfile
import time
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


def _workdir(what: str) -> Path:
    """Every bench run its own directory (two benches at once must not share one)."""
    base = state_dir() / "bench"
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{what}-", dir=base))


def bench_boot(args, progress, repeat: int) -> dict:
    from . import config as cfgmod
    from .stack import Stack, lab_options
    o = cfgmod.resolve(None, args)
    lab_s, guest_s, failures = [], [], []
    for i in range(repeat):
        try:
            with Stack(_workdir(f"boot-{i}"), progress, lab_options(o), guest_kernel=o["guest_kernel"],
                       build=not o["no_build"]) as s:
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
        r = Run(exp, cfgmod.resolve(exp, args), d, progress)
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


def bench_hwtrace(args, progress, repeat: int, moves: int = 20) -> dict:
    """The hardware oracle's cost: the same TCG lab, guest and move loop (1 MiB, ``moves``
    MIGRATEs, each with a full verified read) without and with the plugin, alternating so
    that drift in the machine hits both sides alike."""
    from . import config as cfgmod
    from .experiment import Run
    sides: dict = {"stamps": [], "stamps+hw": []}
    base = _workdir("hwtrace")
    for i in range(repeat):
        for name, oracle in (("stamps", "[stamps]"), ("stamps+hw", "[stamps, hw]")):
            d = base / f"{name}-{i}"
            d.mkdir()
            cfg = d.parent / f"{name}-{i}.yaml"
            cfg.write_text(f"version: 1\nname: bench-hwtrace\noracle: {oracle}\nlab: {{accel: tcg}}\n"
                           f"exporter: {{kind: vmlab, size: 1M}}\n"
                           f"moves:\n  - {{mode: MIGRATE, count: {moves}, expect: REFAULTED}}\n")
            exp = cfgmod.load(cfg)
            t = time.monotonic()
            r = Run(exp, cfgmod.resolve(exp, args), d, progress)
            r.run()
            res = r.result
            secs = [m["seconds"] for m in res["moves"] if m.get("seconds") is not None]
            sides[name].append({"passed": res["passed"], "wall": time.monotonic() - t,
                                "lab_boot": res.get("lab", {}).get("boot_seconds"),
                                "guest_boot": res.get("guest", {}).get("boot_seconds"),
                                "move_seconds": secs, "results": str(d)})
    out: dict = {"moves_per_run": moves, "runs_per_side": repeat, "results": str(base)}
    for name, runs in sides.items():
        out[name] = {"passed": all(r["passed"] for r in runs),
                     "wall_seconds": _stats([r["wall"] for r in runs]),
                     "lab_boot_seconds": _stats([r["lab_boot"] for r in runs if r["lab_boot"]]),
                     "guest_boot_seconds": _stats([r["guest_boot"] for r in runs if r["guest_boot"]]),
                     "move_plus_verified_read_seconds": _stats([s for r in runs for s in r["move_seconds"]])}
    def ratio(key):
        a, b = out["stamps"][key].get("median"), out["stamps+hw"][key].get("median")
        return round(b / a, 2) if a and b else None
    out["slowdown_with_plugin"] = {k: ratio(k) for k in ("wall_seconds", "lab_boot_seconds",
                                                         "guest_boot_seconds",
                                                         "move_plus_verified_read_seconds")}
    return out


def _tail(path: Path, n: int = 6) -> list[str]:
    from .qemu import console_tail
    return console_tail(path, n).splitlines() if path.exists() else []


def bench_soak(args, progress, repeat: int) -> dict:
    """``repeat`` default experiments back to back, each with a fresh lab and guest. A run
    that fails is a flake of the lab or a finding; either way its console evidence is
    kept. A lab that does not boot is counted apart (a boot failure, not a verdict)."""
    from . import config as cfgmod
    from .errors import BootFailure
    from .experiment import DEFAULT_CONFIG, Run
    exp = cfgmod.load(DEFAULT_CONFIG)
    o = cfgmod.resolve(exp, args)
    passes, flakes, boot_failures, walls = 0, [], [], []
    base = _workdir("soak")
    for i in range(repeat):
        d = base / f"run-{i:03d}"
        d.mkdir()
        t = time.monotonic()
        r = Run(exp, o, d, lambda m: None)
        try:
            r.run()
        except BootFailure as e:
            boot_failures.append({"run": i, "error": str(e)[:300], "lab_console": _tail(d / "lab-console.log"),
                                  "results": str(d)})
            progress(f"soak {i + 1}/{repeat}: lab/guest did not boot: {e}")
            continue
        except VmlabError as e:
            r.result.setdefault("error", str(e))
        walls.append(time.monotonic() - t)
        if r.result.get("passed"):
            passes += 1
        else:
            flakes.append({"run": i, "error": r.result.get("error"), "results": str(d),
                           "verdicts": [m.get("verdict") for m in r.result.get("moves", [])],
                           "baseline": r.result.get("baseline", {}).get("verdict"),
                           "kernel_health": r.result.get("kernel_health_failed"),
                           "lab_console": _tail(d / "lab-console.log"),
                           "guest_console": _tail(d / "guest-console.log")})
        progress(f"soak {i + 1}/{repeat}: {'pass' if r.result.get('passed') else 'FAIL'} "
                 f"({time.monotonic() - t:.1f}s); {passes} passed so far")
    return {"runs": repeat, "passed": passes, "flakes": flakes, "lab_boot_failures": boot_failures,
            "flake_rate": round((len(flakes) + len(boot_failures)) / max(1, repeat), 4),
            "wall_seconds_per_run": _stats(walls), "results": str(base)}


KINDS = ("boot", "build", "move", "soak", "fuzz", "hwtrace")


def run(args, progress) -> dict:
    what = [w.strip() for w in args.what.split(",") if w.strip()]
    unknown = [w for w in what if w not in KINDS]
    if unknown or not what:
        from .errors import UserError
        raise UserError(f"--what: {', '.join(unknown) or '(nothing)'}: not a benchmark "
                        f"(choose from {', '.join(KINDS)})")
    res: dict = {"what": what, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if "build" in what:
        res["image_build"] = bench_build(progress)
    if "boot" in what:
        res["boot"] = bench_boot(args, progress, max(1, args.repeat))
    if "move" in what:
        res["move"] = bench_move(args, progress)
    if "soak" in what:
        res["soak"] = bench_soak(args, progress, max(1, args.repeat))
    if "hwtrace" in what:
        res["hwtrace"] = bench_hwtrace(args, progress, max(1, args.repeat))
    if "fuzz" in what:
        from .fuzz import bench_fuzz
        res["fuzz"] = bench_fuzz(args, progress, _workdir("fuzz"))
    return res


def render(res: dict) -> str:
    import json
    return json.dumps(res, indent=2)
