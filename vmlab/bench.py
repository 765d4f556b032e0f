"""`vmlab bench`: measured numbers, as JSON. Nothing here asserts a time; the numbers are
for people and for nightly trend lines (and the lab flake rate: a flaky lab poisons every
verdict, so boots are repeated and failures counted, not retried away)."""
from __future__ import annotations

import math
import os
import re
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
            # nearest rank: of 100 the 99th (int(n * 0.99) took the 100th, the max)
            "max": round(s[-1], 3), "p99": round(s[math.ceil(len(s) * 0.99) - 1], 3)}


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
            # one attempt: this bench counts flakes, a retry would hide them
            with Stack(_workdir(f"boot-{i}"), progress, lab_options(o), guest_kernel=o["guest_kernel"],
                       build=not o["no_build"], lab_boot_attempts=1, guest_boot_attempts=1) as s:
                s.up()
                lab_s.append(s.lab.boot_seconds)
                guest_s.append(s.guest.boot_seconds)
                accel = s.lab.accel
        except VmlabError as e:
            failures.append(str(e)[:300])
    return {"lab_boot_seconds": _stats(lab_s), "guest_boot_seconds_to_ssh": _stats(guest_s),
            "runs": repeat, "failures": failures, "flake_rate": round(len(failures) / repeat, 3),
            "lab_accel": locals().get("accel")}


def _move_run(args, progress, size: str, moves: int, watcher: bool, huge: bool = False) -> dict:
    """One experiment of ``moves`` MIGRATEs of a ``size`` buffer, each with a full verified
    read; with ``watcher`` the guest's live watcher polls pages 0 and last meanwhile; with
    ``huge`` the exporter's 2 MiB blocks, mapped 2 MiB-aligned by the guest's QEMU, so
    KVM can map them with 2 MiB nested entries."""
    from . import config as cfgmod
    from .experiment import Run
    label = size + ("-huge-pmd" if huge else "")
    d = Path(tempfile.mkdtemp(prefix=f"vmlab-bench-move-{label}-"))
    cfg = d / "bench.yaml"
    cfg.write_text(f"version: 1\nname: bench-{label}\n"
                   f"exporter: {{kind: vmlab, size: {size}, alloc: {'HUGE_PMD' if huge else 'ORDER0'}}}\n"
                   + ("guest: {align_mappings: 2M}\n" if huge else "") +
                   f"moves:\n  - {{mode: MIGRATE, count: {moves}, concurrent: {str(watcher).lower()}, "
                   f"expect: REFAULTED}}\n")
    exp = cfgmod.load(cfg)
    o = cfgmod.resolve(exp, args)
    o["kvm_evidence"] = False   # the move machinery's own cost, comparable across versions
    r = Run(exp, o, d, progress)
    r.run()
    res = r.result
    done = [m for m in res["moves"] if m.get("seconds") is not None]
    secs = [m["seconds"] for m in done]
    out = {"passed": res["passed"], "moves": len(res["moves"]), "watcher": watcher,
           "alloc": "HUGE_PMD" if huge else "ORDER0",
           "verified_moves_per_second": round(len(secs) / sum(secs), 3) if secs else None,
           "move_plus_verified_read_seconds": _stats(secs),
           # the VMM check is made while the guest reads (before: a phase of its own)
           "phases_seconds": {k: _stats([m["phases_s"][k] for m in done if k in m.get("phases_s", {})])
                              for k in ("move", "move_in_lab", "watch", "vmm_check", "read")},
           "guest_read_seconds": _stats([m["read_ns"] / 1e9 for m in done if m.get("read_ns")]),
           # whether 2 MiB mappings were there to be had: the exporter's PMD faults, and
           # QEMU's mapping of the BAR 2 MiB-aligned
           "exporter_pmd_faults": (done[-1].get("exporter_info") or {}).get("pmd_faults") if done else None,
           "vmm_aligned_2m": (res.get("vmm_mapping") or {}).get("aligned_2m"),
           "results": str(d)}
    if watcher:
        out["move_to_guest_latency_seconds"] = _stats(
            [m["watch"]["latency_s"] for m in done if m.get("watch", {}).get("latency_s") is not None])
        out["latency_note"] = ("controller clock from sending MOVE to receiving the guest agent's "
                               "watch line: an upper bound including SSH transport")
    return out


def bench_move(args, progress, sizes=(("1M", 20, 100), ("64M", 10, 10))) -> dict:
    """Moves per second with nothing else running in the guest, and then again with the
    live watcher (whose polling shares the guest's and the lab's CPUs with the verified
    reads), which gives the move -> observed latency: over 100 moves at 1 MiB, so that
    its p99 is not simply the largest of 20. Then 64 MiB of 2 MiB blocks: what the same
    read costs when KVM takes one nested fault per 2 MiB instead of per page."""
    out = {}
    for size, moves, watched_moves in sizes:
        quiet = _move_run(args, progress, size, moves, watcher=False)
        watched = _move_run(args, progress, size, watched_moves, watcher=True)
        out[size] = {"verified_moves_per_second": quiet["verified_moves_per_second"],
                     "verified_moves_per_second_with_watcher": watched["verified_moves_per_second"],
                     "move_to_guest_latency_seconds": watched["move_to_guest_latency_seconds"],
                     "without_watcher": quiet, "with_watcher": watched}
    huge = _move_run(args, progress, "64M", 10, watcher=False, huge=True)
    out["64M-huge-pmd"] = {"verified_moves_per_second": huge["verified_moves_per_second"],
                           "without_watcher": huge}
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


# SVM exit codes (AMD APM vol. 2, appendix C) that a nested guest boot produces most
SVM_EXITS = {0x60: "INTR", 0x61: "NMI", 0x64: "VINTR", 0x72: "CPUID", 0x78: "HLT",
             0x7b: "IOIO", 0x7c: "MSR", 0x7f: "SHUTDOWN", 0x81: "VMMCALL", 0x400: "NPF",
             0x6e: "RDTSC", 0x87: "RDTSCP", 0x88: "ICEBP", 0x7d: "TASK_SWITCH", 0x4e: "EXCP_PF",
             0x401: "AVIC_INCOMPLETE_IPI", 0x402: "AVIC_NOACCEL"}
_EVENTS = "/sys/kernel/tracing/events/kvm"
# (event, key): exits by reason, and the I/O-port exits by port
_HISTS = (("kvm_exit", "exit_reason"), ("kvm_pio", "port"))


def _svm_exit_name(code: int) -> str:
    if code in SVM_EXITS:
        return SVM_EXITS[code]
    for lo, name in ((0x00, "CR_READ"), (0x10, "CR_WRITE"), (0x20, "DR_READ"), (0x30, "DR_WRITE"),
                     (0x40, "EXCP")):
        if lo <= code < lo + (0x20 if name == "EXCP" else 0x10):
            return f"{name}_{code - lo}"
    return hex(code)


def _histogram(lab, event: str, key: str) -> dict:
    """Counts of a kvm tracepoint by one field since its hist trigger was set."""
    rc, out, _ = lab.run(f"cat {_EVENTS}/{event}/hist", timeout=30, check=False)
    counts: dict = {}
    for line in out.splitlines():
        m = re.match(r"\{\s*" + key + r":\s*(\d+)\s*\}\s*hitcount:\s*(\d+)", line.strip())
        if m:
            v = int(m.group(1))
            name = _svm_exit_name(v) if key == "exit_reason" else hex(v)
            counts[name] = counts.get(name, 0) + int(m.group(2))
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def _set_hists(lab, on: bool) -> tuple[int, str]:
    bang = "" if on else "!"
    cmd = "; ".join(f"echo '{bang}hist:keys={k}' > {_EVENTS}/{e}/trigger" for e, k in _HISTS)
    rc, _, err = lab.run("mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev "
                         f"/sys/kernel/tracing; {cmd}", timeout=30, check=False)
    return rc, err


def _round_trips(fn, n: int = 5) -> dict:
    xs = []
    for _ in range(n):
        t = time.monotonic()
        fn()
        xs.append(time.monotonic() - t)
    return _stats(xs)


def bench_profile(args, progress, repeat: int) -> dict:
    """Where the seconds of a run go: image check, lab boot, the guest's boot in phases
    (QEMU launch in the lab; until the guest's init says ready, split by the guest's own
    uptime into before-its-kernel and its kernel and init; SSH connect), the guest boot's
    VM exits by reason (every one an emulated #VMEXIT under TCG), and the round trips a
    move is made of (lab exec, guest exec, host agent request)."""
    from . import config as cfgmod
    from .exporter import HostAgent
    from .guest import Guest, GuestOptions
    from .guest_agent import GuestAgent
    from .stack import Stack, lab_images, lab_options
    o = cfgmod.resolve(None, args)
    out: dict = {"runs": []}
    for i in range(repeat):
        t = time.monotonic()
        lab_images(o["kernel"], o["guest_kernel"], build=not o["no_build"], progress=progress,
                   base=o["lab_base"],
                   qemu=o["qemu"])
        run: dict = {"image_check_s": round(time.monotonic() - t, 3)}
        work = _workdir(f"profile-{i}")
        with Stack(work, progress, lab_options(o), guest_kernel=o["guest_kernel"],
                   build=not o["no_build"]) as s:
            lab = s.up_lab()
            run["lab_boot_s"] = lab.boot_seconds
            run["lab_accel"] = lab.accel
            rc, err = _set_hists(lab, True)
            g = Guest(lab, GuestOptions(), work)
            s.guest = g
            g.up(progress)
            run["guest_boot_s"] = g.boot_seconds
            up = g.uptime_marks()
            run["guest_phases"] = dict(g.phases, guest_uptime_s=up)
            ready_at = up.get("VMLAB-GUEST-READY")
            if ready_at is not None:
                # the guest's clock starts with its kernel: what came before is QEMU, the
                # firmware, loading and decompressing the kernel (an upper bound: to_ready
                # also holds up to one readiness poll)
                run["guest_phases"]["before_guest_kernel_s"] = max(
                    0.0, round(g.phases["to_ready_s"] - ready_at, 3))
            if rc == 0:
                run["guest_boot_exits"] = _histogram(lab, "kvm_exit", "exit_reason")
                run["guest_boot_io_exits_by_port"] = dict(list(_histogram(lab, "kvm_pio", "port").items())[:12])
            else:
                run["guest_boot_exits"] = {"error": err.strip()[:200]}
            _set_hists(lab, False)
            agent = HostAgent(lab, work / "hostagent.log")
            gagent = GuestAgent(g.session)
            try:
                run["round_trips_s"] = {
                    "lab_exec": _round_trips(lambda: lab.run("true", timeout=30)),
                    "guest_exec": _round_trips(lambda: g.run("true", timeout=30)),
                    "guest_agent_request": _round_trips(lambda: gagent.run("version", timeout=30)),
                    "host_agent_request": _round_trips(lambda: agent.request("hello"))}
            finally:
                gagent.close()
                agent.close()
        out["runs"].append(run)
        progress(f"profile {i + 1}/{repeat}: lab {run['lab_boot_s']}s, guest {run['guest_boot_s']}s "
                 f"{run['guest_phases']}")
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
    o["lab_boot_attempts"] = 1   # the soak counts lab flakes: no retry may hide one
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


KINDS = ("boot", "build", "move", "soak", "fuzz", "hwtrace", "profile", "matrix", "reuse", "snapshot",
         "cold")


def bench_snapshot(args, progress, repeat: int) -> dict:
    """The lab booted (snapshots off) against the lab restored from its snapshot, in
    turns on one machine; the first lab makes the snapshot when there is none."""
    from . import config as cfgmod
    from . import lab_snapshot
    from .stack import Stack, lab_options
    o = cfgmod.resolve(None, args)

    def lab_up(snapshots: bool) -> tuple[float, dict | None]:
        old = os.environ.get(lab_snapshot.DISABLE_ENV)
        os.environ[lab_snapshot.DISABLE_ENV] = "1" if snapshots else "0"
        try:
            with Stack(_workdir("snapshot"), progress, lab_options(o), guest_kernel=o["guest_kernel"],
                       build=not o["no_build"], lab_boot_attempts=1) as s:
                s.up_lab()
                return s.lab.boot_seconds, s.lab.snapshot
        finally:
            if old is None:
                os.environ.pop(lab_snapshot.DISABLE_ENV, None)
            else:
                os.environ[lab_snapshot.DISABLE_ENV] = old

    first = lab_up(True)
    boots, restores, other = [], [], []
    for _ in range(repeat):
        boots.append(lab_up(False)[0])
        seconds, snap = lab_up(True)
        (restores if snap and "restored" in snap else other).append({"seconds": seconds, "snapshot": snap})
    res = {"lab_boot_seconds": _stats(boots),
           "lab_restore_seconds": _stats([r["seconds"] for r in restores]),
           "first_lab": {"seconds": first[0], "snapshot": first[1]},
           "not_restored": other, "runs": repeat}
    res["warm_run"] = _warm_runs(args, progress, repeat)
    return res


def _vmlab_process(argv, env: dict, what: str, *, ok=(0,), timeout: float = 1800,
                   log_to: Path | None = None, echo=None) -> float:
    """Seconds ``vmlab ARGV`` took as its own process (as a user runs it, no stdin);
    VmlabError when it exits with a status not in ``ok``, WaitTimeout after ``timeout``.
    ``log_to`` keeps its stderr; ``echo`` (a progress function) is handed each of its
    progress lines as it comes, for a run of minutes. Stopped as a user stops vmlab:
    SIGINT (its teardown stops what it started), SIGKILL only if that takes a minute."""
    import signal
    import subprocess
    import sys
    import threading
    from .errors import WaitTimeout
    t = time.monotonic()
    p = subprocess.Popen([sys.executable, "-m", "vmlab.cli", *argv], env=env, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         encoding="utf-8", errors="replace")
    lines: list[str] = []

    def read() -> None:
        for line in p.stderr:
            lines.append(line)
            if echo is not None and line.startswith("[vmlab "):
                try:
                    echo(f"{what}: {line.rstrip()}")
                except Exception:
                    pass     # the pipe must be drained whatever the echo does
    reader = threading.Thread(target=read, name="vmlab-process-stderr", daemon=True)
    reader.start()

    def stop() -> None:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)   # a Ctrl-C may have reached it already: a second is safe
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    try:
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop()
        raise WaitTimeout(f"{what}: vmlab {' '.join(argv)}", timeout)
    except BaseException:
        stop()
        raise
    finally:
        reader.join(timeout=10)
        if log_to is not None:
            log_to.write_text("".join(lines))
    if rc not in ok:
        raise VmlabError(f"{what}: vmlab {' '.join(argv)} exited {rc}: "
                         f"{''.join(lines).strip().splitlines()[-1:]}")
    return time.monotonic() - t


def _milestones(log: str) -> list[dict]:
    """The steps of a run worth a line in a cold start's account, with the run's own clock
    from its progress lines ("[vmlab HH:MM:SSZ  12.3s] ...")."""
    out = []
    for line in log.splitlines():
        m = re.match(r"\[vmlab \S+\s+([\d.]+)s\] (.*)", line)
        if m and re.search(r"built|probe|lab host (booted|restored|saved)|guest up|baseline|PASSED|FAILED",
                           m.group(2)):
            out.append({"at_s": float(m.group(1)), "line": m.group(2)[:160]})
    return out


def bench_cold(args, progress) -> dict:
    """Fresh machine -> first verdict, vmlab's part of it: the README's main job (``vmlab
    run``, a process of its own, the default experiment and accel) with an empty cache
    directory, so the kernel packages are fetched, both images built with mmdebstrap, the
    KVM probe run and the lab booted and saved. The apt and pip installs of
    host-tools/install-deps are not in it. The cache is thrown away afterwards; the log of
    the run is kept."""
    import json
    import shutil
    work = _workdir("cold")
    cache = work / "cache"
    env = dict(os.environ, VMLAB_CACHE_DIR=str(cache))
    env.pop("VMLAB_STATE_DIR", None)
    progress(f"bench cold: vmlab run with an empty cache ({cache}); this builds everything")
    try:
        wall = _vmlab_process(("run", "--out", str(work / "run")), env, "bench cold",
                              log_to=work / "vmlab-run.log", timeout=3600, echo=progress)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    res = json.loads((work / "run" / "results.json").read_text())
    milestones = _milestones((work / "vmlab-run.log").read_text())
    return {"first_verdict_seconds": round(wall, 1), "passed": res.get("passed"),
            "lab_accel": res.get("lab", {}).get("accel"),
            "lab_boot_seconds": res.get("lab", {}).get("boot_seconds"),
            "guest_boot_seconds": res.get("guest", {}).get("boot_seconds"),
            "milestones": milestones, "log": str(work / "vmlab-run.log"), "results": str(work / "run")}


def _warm_runs(args, progress, repeat: int) -> dict:
    """The default experiment as a user runs it (``vmlab run``, a process each, a state
    directory of the bench's own), its lab and guest booted (snapshots off) and restored
    with the guest saved in the lab's snapshot, in turns; the first run saves that
    snapshot when there is none."""
    import json
    from . import lab_snapshot
    work = _workdir("warm-run")
    kernel = getattr(args, "kernel", None) or "trixie"

    def one(name: str, snapshots: bool) -> dict:
        env = dict(os.environ, VMLAB_STATE_DIR=str(work / "state"),
                   **{lab_snapshot.DISABLE_ENV: "1" if snapshots else "0"})
        progress(f"bench snapshot: vmlab run ({name})")
        wall = _vmlab_process(("run", "--kernel", kernel, "--accel", "tcg", "--out", str(work / name)),
                              env, "bench snapshot", ok=(0,))
        res = json.loads((work / name / "results.json").read_text())
        return {"wall": round(wall, 2), "lab_s": res["lab"].get("boot_seconds"),
                "guest_s": res["guest"].get("boot_seconds"), "snapshot": res["lab"].get("snapshot"),
                "guest_from_snapshot": bool(res["guest"].get("with_lab_snapshot")),
                "verdicts": [res["baseline"]["verdict"]] + [m["verdict"] for m in res["moves"]]}

    first = one("first", True)
    booted, restored = [], []
    for i in range(repeat):
        booted.append(one(f"booted{i}", False))
        restored.append(one(f"restored{i}", True))
    return {"kernel": kernel, "first": first,
            "booted_run_seconds": _stats([r["wall"] for r in booted]),
            "restored_run_seconds": _stats([r["wall"] for r in restored]),
            "guest_boot_seconds": _stats([r["guest_s"] for r in booted]),
            "guest_restore_seconds": _stats([r["guest_s"] for r in restored if r["guest_from_snapshot"]]),
            "every_restore_took_the_guest": all(r["guest_from_snapshot"] for r in restored),
            "same_verdicts": len({json.dumps(r["verdicts"]) for r in booted + restored}) == 1,
            "runs": {"booted": booted, "restored": restored}, "results": str(work)}


def bench_reuse(args, progress, repeat: int) -> dict:
    """The default experiment as a user runs it (``vmlab run``, a process each), in a state
    directory of the bench's own (the user's running lab is not touched): with a lab of
    its own (``--fresh``) and in the lab that ``vmlab lab up`` left running, alternating;
    then, after ``vmlab guest up``, in that running guest (the buffer hot-plugged)."""
    import json
    work = _workdir("reuse")
    env = dict(os.environ, VMLAB_STATE_DIR=str(work / "state"))
    kernel = getattr(args, "kernel", None) or "trixie"

    def vmlab(*a, timeout=1800):
        return _vmlab_process(a, env, "bench reuse", ok=(0, 1), timeout=timeout)

    def verdicts(d):
        res = json.loads((d / "results.json").read_text())
        return ([res.get("baseline", {}).get("verdict")] + [m.get("verdict") for m in res["moves"]],
                res["lab"].get("reused_from"), (res.get("guest") or {}).get("reused_from"))

    secs: dict[str, list[float]] = {"fresh": [], "reused_lab": [], "reused_guest": []}
    lab_up = guest_up = None
    runs = []

    def one(mode, i):
        d = work / f"{mode}{i}"
        progress(f"bench reuse: vmlab run ({mode.replace('_', ' ')}) {i + 1}/{repeat}")
        t = vmlab("run", "--kernel", kernel, "--out", str(d), *(["--fresh"] if mode == "fresh" else []))
        secs[mode].append(t)
        v, lab_from, guest_from = verdicts(d)
        runs.append({"mode": mode, "seconds": round(t, 1), "verdicts": v,
                     "reused_lab": lab_from is not None, "reused_guest": guest_from is not None})

    try:
        lab_up = vmlab("lab", "up", "--kernel", kernel)
        for i in range(repeat):
            one("fresh", i)
            one("reused_lab", i)
        guest_up = vmlab("guest", "up")
        for i in range(repeat):
            one("reused_guest", i)
    finally:
        vmlab("lab", "down", timeout=300)
    return {"kernel": kernel, "lab_up_seconds": round(lab_up, 1) if lab_up else None,
            "guest_up_seconds": round(guest_up, 1) if guest_up else None,
            "fresh_run_seconds": _stats(secs["fresh"]), "reused_run_seconds": _stats(secs["reused_lab"]),
            "reused_guest_run_seconds": _stats(secs["reused_guest"]),
            "every_run_where_meant": all(r["reused_lab"] == (r["mode"] != "fresh") and
                                         r["reused_guest"] == (r["mode"] == "reused_guest") for r in runs),
            "same_verdicts": len({json.dumps(r["verdicts"]) for r in runs}) == 1, "runs": runs,
            "results": str(work)}


def bench_matrix(args, progress, entries=("calibration", "dmaheap-order0", "pfnmap-compound")) -> dict:
    """The matrix's cost per cell on one lab kernel (--kernel; default trixie), once with a
    guest boot per cell (--own-guests) and once with the cells sharing the lab's hot-plug
    guest (the default), in that order, each with a lab boot of its own."""
    import argparse
    from . import catalog
    from . import matrix as mx
    kernel = getattr(args, "kernel", None) or "trixie"
    res: dict = {"kernel": kernel, "entries": list(entries)}
    for mode in ("own_guests", "shared_guest"):
        ns = argparse.Namespace(**{**vars(args), "kernels": kernel, "only": ",".join(entries),
                                   "own_guests": mode == "own_guests"})
        planned = mx.plan(catalog.load(only=list(entries)), [kernel], ns)
        out = _workdir(f"matrix-{mode}")
        progress(f"bench matrix: {mode.replace('_', ' ')}")
        m = mx.Matrix(planned, out, progress, ns)
        t = time.monotonic()
        rc = m.run()
        wall = time.monotonic() - t
        cells = m.result["cells"]
        secs = [c["seconds"] for c in cells]
        res[mode] = {"cells": len(cells), "exit_status": rc, "wall_seconds": round(wall, 1),
                     "lab_and_build_seconds": round(wall - sum(secs), 1),
                     "seconds_per_cell": _stats(secs),
                     "per_cell": {c["entry"]: {"seconds": c["seconds"], "match": c["match"],
                                               "verdicts": c["verdicts"]} for c in cells},
                     "results": str(out)}
    own, shared = res["own_guests"]["per_cell"], res["shared_guest"]["per_cell"]
    res["same_verdicts"] = (set(own) == set(shared) == set(entries) and
                            all(own[e]["verdicts"] == shared[e]["verdicts"] for e in entries))
    return res


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
    if "profile" in what:
        res["profile"] = bench_profile(args, progress, max(1, args.repeat))
    if "hwtrace" in what:
        res["hwtrace"] = bench_hwtrace(args, progress, max(1, args.repeat))
    if "matrix" in what:
        res["matrix"] = bench_matrix(args, progress)
    if "reuse" in what:
        res["reuse"] = bench_reuse(args, progress, max(1, args.repeat))
    if "snapshot" in what:
        res["snapshot"] = bench_snapshot(args, progress, max(1, args.repeat))
    if "cold" in what:
        res["cold"] = bench_cold(args, progress)
    if "fuzz" in what:
        from .fuzz import bench_fuzz
        res["fuzz"] = bench_fuzz(args, progress, _workdir("fuzz"))
    return res


def render(res: dict) -> str:
    import json
    return json.dumps(res, indent=2)
