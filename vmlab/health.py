"""Kernel health around a run: the taint mask and dmesg of a VM at the start and at the
end, so what the run itself provoked (WARN, BUG, Oops, a new taint flag) is told apart
from what was there before."""
from __future__ import annotations

import logging
from pathlib import Path

from . import oracle

log = logging.getLogger("vmlab.health")


def kernel_state(vm, agent=None) -> dict:
    """The taint mask of a VM now and what tells later which kernel lines a run itself
    provoked. From ``agent`` when there is one: the lab's host agent marks the log's end
    and holds the mark ({"taint", "mark": True}; the end reads only the lines since);
    the guest's agent prints its dmesg (a request, where an exec in a TCG lab is ~0.25 s).
    Else (or when the agent cannot answer) dmesg over an exec: the same text as the
    guest's agent prints, so either may be taken at either end."""
    if agent is not None:
        try:
            return agent.kernel_mark() if hasattr(agent, "kernel_mark") else agent.kernel_state()
        except Exception as e:
            log.warning("kernel state from %s: %s; asking over an exec", type(agent).__name__, e)
    return _exec_state(vm)


def _exec_state(vm) -> dict:
    _, out, _ = vm.run("cat /proc/sys/kernel/tainted; dmesg", timeout=60, check=False)
    return parse_kernel_state(out)


def kernel_state_now(vm, start: dict, agent=None) -> dict:
    """The state at a run's end, taken as its start was: since the host agent's mark
    (only that agent can say what came after it: its failure is the health check's),
    else the whole log from the agent or an exec."""
    if start.get("mark"):
        return agent.kernel_since_mark()
    if agent is not None and not hasattr(agent, "kernel_mark"):
        try:
            return agent.kernel_state()
        except Exception as e:
            log.warning("kernel state from %s: %s; asking over an exec", type(agent).__name__, e)
    return _exec_state(vm)


def parse_kernel_state(out: str) -> dict:
    """The taint mask on the first line, dmesg after it. No taint mask is no state (a
    shell killed half-way, an empty answer): ValueError, never taint 0 with no lines,
    which would pass any check."""
    first, _, rest = out.partition("\n")
    try:
        taint = int(first.strip())
    except ValueError:
        raise ValueError(f"no taint mask where the kernel state begins: {first[:80]!r}") from None
    return {"taint": taint, "dmesg": rest}


def kernel_health(vms: dict, start: dict, *, vmm_fault: str | None, lab_console: Path,
                  agents: dict | None = None, ends: dict | None = None) -> dict:
    """name -> oracle.kernel_health of each VM (``vms``: name -> lab or guest) from its
    state at ``start[name]`` to now; ``ok`` None where it cannot be judged and that is
    excused (a guest whose VMM fault is the verdict), False where a kernel that should
    answer does not. ``agents``: name -> the host agent that may answer for that VM;
    ``ends``, when given, gets name -> the state read now (the teardown's ``before``)."""
    health = {}
    for name, vm in vms.items():
        st = start.get(name)
        if st is None or vm is None or getattr(vm, "session", None) is None:
            continue
        if name == "guest" and vmm_fault:
            # its vCPUs are stopped or its QEMU is gone (that is the verdict): asking
            # its kernel would only wait for SSH to give up
            health[name] = {"ok": None, "skipped": "the guest's VMM stopped: " + vmm_fault,
                            "new_taint": "?", "bad_line_count": 0, "bad_lines": []}
            continue
        try:
            now = kernel_state_now(vm, st, (agents or {}).get(name))
        except Exception as e:
            # A kernel that cannot answer at the end is no clean run: the lab runs with
            # oops=panic, so an oops after the last verdict shows up exactly like this.
            h = {"ok": False, "error": f"{type(e).__name__}: {e}",
                 "new_taint": "?", "bad_line_count": 0, "bad_lines": []}
            if name == "lab":
                tail = [ln for ln in _read_text(lab_console).splitlines()
                        if "Kernel panic" in ln or any(w in ln for w in oracle.BAD_KERNEL_WORDS)]
                h["bad_lines"], h["bad_line_count"] = tail[-20:], len(tail)
            health[name] = h
            continue
        if ends is not None:
            ends[name] = now
        health[name] = compare_states(st, now)
    return health


def compare_states(before: dict, after: dict) -> dict:
    """What a kernel said from state ``before`` to state ``after``: the run's (from its
    start to the health check) or its teardown's (from the check to the teardown's end:
    the unplug, the buffer's close, its quarantine's release). ``after`` holds the whole
    log (the guest's, or an exec's), or only the lines since the host agent's mark
    (``before`` is the mark, or ``after`` says "since_mark"), when all of them are new."""
    since = bool(before.get("mark") or after.get("since_mark"))
    h = oracle.kernel_health("" if since else before["dmesg"], after["dmesg"],
                             before["taint"], after["taint"])
    if not since and _wrapped(before["dmesg"], after["dmesg"]):
        after = dict(after, truncated=True)
    if after.get("overruns") or after.get("truncated"):
        # lines the kernel logged were overwritten before they were read, or more came
        # than could be read: a flood, and what it held cannot be vouched for
        h.update(ok=False, overruns=after.get("overruns", 0), truncated=bool(after.get("truncated")))
    return h


def _wrapped(before: str, after: str) -> bool:
    """A whole log read twice, whose first read's last line is gone from the second: the
    ring wrapped in between, and lines logged in between may have gone with it (the
    comparison could only miss them, never invent one)."""
    last = before.rstrip("\n").rpartition("\n")[2]
    return bool(last) and last not in after.splitlines()


def _read_text(p: Path) -> str:
    try:
        return p.read_text(errors="replace")
    except OSError:
        return ""
