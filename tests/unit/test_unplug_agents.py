"""Run.unplug: the guest-wide kill of vmlab-guest-agent processes is skipped only when
no agent of the run can be left in the shared guest (QMP and the guest faked at their
boundary; the lab tests unplug for real)."""
from __future__ import annotations

import pytest

from vmlab.experiment import Run


class FakeGuest:
    def __init__(self):
        self.execs = []

    def cmd(self, command, **kw):
        assert command == "query-status"
        return {"status": "running"}

    def run(self, command, **kw):
        self.execs.append(command)
        return 0, "", ""


class FakePlug:
    device = "vmlab-buf-r1"

    def close(self):
        self.closed = True

    def gone(self):
        return True


class FakeStack:
    def __init__(self):
        self.guest = FakeGuest()


class FakeAgent:
    def __init__(self, idle):
        self.idle, self.closed = idle, False

    def close(self, wait=10):
        self.closed = True


def unplug(gagent, watch):
    r = Run.__new__(Run)
    r.plug, r.stack, r.result = FakePlug(), FakeStack(), {}
    r.gagent, r.watch_tried = gagent, watch
    assert r.unplug() is True
    return r


@pytest.mark.parametrize("idle, watch, kills", [
    (True, False, False),       # every command went to one serve, which answered them all
    (False, False, True),       # a command failed or timed out: its child may be left
    (None, False, True),        # no serve process: commands (if any) were execs
    (True, True, True),        # a watcher (even one whose Watch() failed) runs for an hour
])
def test_the_kill_runs_unless_every_agent_is_known_gone(idle, watch, kills):
    agent = None if idle is None else FakeAgent(idle)
    r = unplug(agent, watch)
    assert bool([c for c in r.stack.guest.execs if "pkill" in c and "mlab-guest-agent" in c]) == kills
    if agent is not None:
        # the kill takes the serve process: it is closed first, so the log that follows
        # the unplug is asked over an exec, not of an agent that is gone
        assert agent.closed == kills and (r.gagent is None) == kills


class _Exp:
    def __init__(self, expect_warnings=False):
        self.raw = {"expect_kernel_warnings": expect_warnings}


def _judged(after, expect_warnings=False):
    r = Run.__new__(Run)
    r.exp, r.result, said = _Exp(expect_warnings), {"passed": True, "kernel_health": {"guest": {"ok": True}}}, []
    r.progress = said.append
    r.judge_teardown("guest", {"taint": 0, "dmesg": "[ 1.0] boot\n"}, after)
    return r.result, said


def test_a_warn_at_teardown_fails_the_run_unless_expected():
    res, said = _judged({"taint": 0, "dmesg": "[ 1.0] boot\n[ 2.0] pciehp eject\n"})
    assert res["passed"] is True and res["kernel_health"]["guest"]["teardown"]["ok"] is True and not said
    res, said = _judged({"taint": 0, "dmesg": "[ 1.0] boot\n[ 2.0] WARNING: CPU: 0 at release\n"})
    assert res["passed"] is False and res["kernel_health_failed"] == ["guest"]
    assert res["kernel_health"]["guest"]["ok"] is False and "tore down" in said[0]
    res, _ = _judged({"taint": 0, "dmesg": "[ 2.0] WARNING: expected\n"}, expect_warnings=True)
    assert res["passed"] is True and res["kernel_health"]["guest"]["teardown"]["ok"] is False


class _TeardownAgent:
    answering = True

    def close(self):
        self.closed = True


class _LabStack:
    """Stack at the teardown's boundary: no guest, the host agent's shutdown answer."""

    def __init__(self, shutdown):
        self.guest, self.shutdown, self.downed = None, shutdown, False

    def save_lab_dmesg(self, agent):
        return self.shutdown

    def down(self):
        self.downed = True


def _torn_down(shutdown, marked=True, answering=True):
    r = Run.__new__(Run)
    r.hw = r.gagent = r.buf = None
    r.exp, r.result, said = _Exp(), {"passed": True, "kernel_health": {"lab": {"ok": True}}}, []
    r.progress = said.append
    r.stack, r.shared_guest, r.agent = _LabStack(shutdown), None, _TeardownAgent()
    r.agent.answering = answering
    r.health_start = {"lab": {"taint": 0, "mark": True} if marked else {"taint": 0, "dmesg": "x\n"}}
    r.health_end = {"lab": {"taint": 0, "dmesg": "", "overruns": 0}}
    r.teardown()
    assert r.agent.closed and r.stack.downed
    return r.result


def _since(text, **kw):
    return {"text": "...", "since_mark": dict({"taint": 0, "text": text, "overruns": 0, "truncated": False}, **kw)}


def test_the_teardown_judges_the_labs_lines_since_the_check():
    assert _torn_down(_since("[ 9.0] vmlab-exporter: freed\n"))["passed"] is True
    res = _torn_down(_since("[ 9.0] BUG: Bad page state in process hostagent\n"))
    assert res["passed"] is False and res["kernel_health_failed"] == ["lab"]
    assert res["kernel_health"]["lab"]["teardown_failed"] is True
    assert _torn_down(_since("", overruns=3))["passed"] is False


def test_a_marked_lab_that_gives_no_lines_back_fails_the_run():
    """oops=panic: a BUG at the buffer's close looks like an agent that stopped answering."""
    for shutdown, answering in ((None, True), ({"text": "..."}, True), (_since(""), False)):
        res = _torn_down(shutdown, answering=answering)
        assert res["passed"] is False and "error" in res["kernel_health"]["lab"]["teardown"]
    # no mark (the start was read over an exec): nothing since it to judge
    assert _torn_down(None, marked=False)["passed"] is True


def test_a_health_check_that_raises_fails_the_run():
    """No judgement of either kernel is no pass (it left the run passed before)."""
    r = object.__new__(Run)
    r.result, r.aborted, said = {"passed": True}, None, []
    r.progress = said.append

    def broken():
        raise KeyError("lab")
    r.check_health = broken
    r.judge_health()
    assert r.result["passed"] is False and r.result["kernel_health_error"] == "KeyError: 'lab'"
    assert said == ["the kernels' health could not be checked: 'lab'"]
