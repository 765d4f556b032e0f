"""`vmlab bench --what fuzz`: >= 100,000 random exporter ioctls in a fresh lab, then the
racing fuzzer (MOVE vs fault vs close from several threads), judged by the lab kernel's
log (WARN/BUG/KASAN, new taint) and by the module's page counter (no leak once every
buffer is closed and its quarantine released)."""
from __future__ import annotations

import time
from pathlib import Path

from . import oracle

RANDOM_IOCTLS = 100_000
CHUNK = 10_000


def bench_fuzz(args, progress, workdir: Path, count: int = RANDOM_IOCTLS,
               race_seconds: float = 120, threads: int = 4) -> dict:
    from . import config as cfgmod
    from .health import kernel_state
    from .exporter import HostAgent
    from .stack import Stack, lab_options
    o = cfgmod.resolve(None, args)
    res: dict = {"count": count, "race_seconds": race_seconds, "threads": threads}
    with Stack(workdir, progress, lab_options(o), guest_kernel=o["guest_kernel"],
               build=not o["no_build"]) as s:
        lab = s.up_lab()
        res["lab_kernel"] = lab.kernel_release()
        res["lab_vcpus"] = 1 if lab.accel == "tcg" else 2
        start = kernel_state(lab)
        agent = HostAgent(lab, workdir / "hostagent-fuzz.log")
        try:
            t = time.monotonic()
            errnos: dict = {}
            done = 0
            for seed in range(1, count // CHUNK + 1):
                r = agent.request("fuzz", count=CHUNK, seed=seed, seconds=1800, timeout=1900)
                done += r["ioctls"]
                for k, v in r["errnos"].items():
                    errnos[k] = errnos.get(k, 0) + v
                progress(f"fuzz: {done}/{count} random ioctls, module pages after cleanup "
                         f"{r.get('module_pages')}")
                res["random_after_cleanup"] = {k: r.get(k) for k in ("module_pages", "quarantined_pages",
                                                                     "leaked_pages", "release_errors")}
            res["random"] = {"ioctls": done, "errnos": errnos, "seconds": round(time.monotonic() - t, 1)}
            t = time.monotonic()
            r = agent.request("fuzz", concurrent=True, count=10 ** 7, seed=99, seconds=race_seconds,
                              threads=threads, timeout=race_seconds + 300)
            res["race"] = {k: r.get(k) for k in ("ioctls", "touches", "errnos", "per_cmd", "module_pages",
                                                 "quarantined_pages", "leaked_pages", "release_errors")}
            res["race"]["seconds"] = round(time.monotonic() - t, 1)
            res["race"]["note"] = ("one lab vCPU under TCG: the threads interleave on one CPU "
                                   "rather than run in parallel" if lab.accel == "tcg" else
                                   "threads run in parallel on the lab's vCPUs")
            progress(f"fuzz: race done, {r.get('ioctls')} ioctls and {r.get('touches')} page touches")
        finally:
            agent.close()
        end = kernel_state(lab)
        res["kernel_health"] = oracle.kernel_health(start["dmesg"], end["dmesg"], start["taint"], end["taint"])
        _, pages, _ = lab.run("cat /sys/kernel/debug/vmlab-exporter/pages", timeout=30, check=False)
        res["module_pages_at_end"] = int(pages.strip()) if pages.strip().isdigit() else None
    res["passed"] = bool(res["kernel_health"]["ok"] and res["module_pages_at_end"] == 0
                         and res.get("random", {}).get("ioctls") == count
                         and not (res.get("race") or {}).get("leaked_pages"))
    res["results"] = str(workdir)
    return res
