"""Processes vmlab starts: one way to run a command, one way to wait, one registry to reap.

Every child is started with PR_SET_PDEATHSIG(SIGKILL) unless it is meant to outlive
vmlab (``vmlab lab up``), so even a SIGKILLed controller leaves nothing running; the
registry stops the rest in order on normal exit, SIGINT and SIGTERM.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import threading
import time
from typing import Callable, Sequence

from .errors import CommandFailed, WaitTimeout

log = logging.getLogger("vmlab.proc")
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # The child should not get the terminal's SIGINT before vmlab decides how to stop it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


_DEFAULT = object()


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGINT and SIGTERM until the block ends: teardown runs whole, and an interrupt
    that arrives meanwhile is delivered (and acted on) right after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def popen(argv: Sequence[str], *, detach: bool = False, **kw) -> subprocess.Popen:
    """Start a child: tied to vmlab's life unless ``detach`` (then in its own session).
    The child starts with no signal blocked, even when vmlab defers its own."""
    if detach:
        kw.setdefault("start_new_session", True)
    pre = kw.pop("preexec_fn", _DEFAULT)
    if pre is _DEFAULT:
        pre = None if detach else _die_with_parent

    def child_setup():
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        if pre is not None:
            pre()
    kw["preexec_fn"] = child_setup
    log.debug("exec: %s", " ".join(map(str, argv)))
    return subprocess.Popen(list(map(str, argv)), **kw)


def run_cmd(argv: Sequence[str], *, timeout: float, check: bool = True, input: str | None = None,
            env: dict | None = None, cwd: str | None = None) -> tuple[int, str, str]:
    """Run to completion; on timeout kill the whole process group and raise WaitTimeout."""
    p = popen(argv, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
              start_new_session=True, preexec_fn=None)
    try:
        out, err = p.communicate(input=input, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(p)
        try:
            out, err = p.communicate(timeout=10)
        except subprocess.TimeoutExpired:  # a grandchild holds the pipes open
            out, err = "", ""
        log.error("timeout after %ss: %s\n%s\n%s", timeout, argv, out[-2000:], err[-2000:])
        raise WaitTimeout(f"command {argv[0]}", timeout, (err or out).strip()[-300:])
    except BaseException:
        _kill_group(p)
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        raise
    if check and p.returncode != 0:
        raise CommandFailed(argv, p.returncode, out, err)
    return p.returncode, out, err


def _kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop_group(p: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop a child that leads its own process group and everything in it (mmdebstrap's
    apt and dpkg): SIGTERM to the group, wait ``grace``, SIGKILL, wait. Bounded."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            break
        end = time.monotonic() + wait
        while time.monotonic() < end and _group_alive(p.pid):
            if p.poll() is None:
                try:
                    p.wait(timeout=0.1)
                except subprocess.TimeoutExpired:
                    pass
            else:
                time.sleep(0.1)
        if not _group_alive(p.pid):
            break
    try:
        p.wait(timeout=5)
    except subprocess.TimeoutExpired:
        log.error("pid %s survived SIGKILL", p.pid)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # only zombies left (our own unreaped leader) counts as gone
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = _stat(int(d))
            if st is not None and int(st[2]) == pgid and st[0] != "Z":
                return True
    return False


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat from field 3 (state) on, or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def pid_start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot, /proc/PID/stat field 22): with the
    pid it names one process for good, so a recycled pid is never signalled."""
    st = _stat(pid)
    try:
        return int(st[19]) if st is not None else None
    except (ValueError, IndexError):
        return None


def wait_until(predicate: Callable[[], object], timeout: float, what: str, *,
               interval: float = 0.2, detail: Callable[[], str] | None = None):
    """Poll ``predicate`` until truthy (returned) or ``timeout`` (WaitTimeout, with detail)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise WaitTimeout(what, timeout, detail() if detail else "")
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still answers kill(0); treat it as gone.
    st = _stat(pid)
    return st is not None and st[0] != "Z"
