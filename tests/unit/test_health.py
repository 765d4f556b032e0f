"""health.kernel_state: from an agent when one answers, over an exec when none does (a
lab whose kernel died must still fail the check: then neither answers)."""
from __future__ import annotations

import pytest

from vmlab import health


class _VM:
    def __init__(self, out: str | None):
        self.out, self.calls = out, 0

    def run(self, command, **kw):
        self.calls += 1
        if self.out is None:
            raise OSError("SSH session is gone")
        assert command == "cat /proc/sys/kernel/tainted; dmesg"
        return 0, self.out, ""


class _Agent:
    def __init__(self, state=None, error=None):
        self.state, self.error = state, error

    def kernel_state(self):
        if self.error:
            raise self.error
        return self.state


def test_the_agent_answers_and_no_exec_is_made():
    vm = _VM("0\n[ 1.0] boot\n")
    st = health.kernel_state(vm, _Agent({"taint": 512, "dmesg": "[ 1.0] boot\n"}))
    assert st == {"taint": 512, "dmesg": "[ 1.0] boot\n"} and vm.calls == 0


def test_an_agent_that_cannot_answer_falls_back_to_the_exec():
    vm = _VM("4096\n[ 1.0] boot\n[ 2.0] WARNING: x\n")
    st = health.kernel_state(vm, _Agent(error=TimeoutError("no answer")))
    assert st == {"taint": 4096, "dmesg": "[ 1.0] boot\n[ 2.0] WARNING: x\n"} and vm.calls == 1


def test_a_dead_kernel_fails_the_health_check_with_or_without_an_agent(tmp_path):
    start = {"lab": {"taint": 0, "dmesg": "[ 1.0] boot\n"}}
    for agent in (None, _Agent(error=OSError("agent gone"))):
        vm = _VM(None)
        vm.session = object()
        h = health.kernel_health({"lab": vm}, start, vmm_fault=None, lab_console=tmp_path / "none",
                                 agents={"lab": agent})
        assert h["lab"]["ok"] is False and "SSH session is gone" in h["lab"]["error"]


def test_an_exec_that_gave_no_taint_mask_is_no_state():
    """A shell killed half-way answers nothing: that must not read as taint 0 and no lines
    (a pass), it is an error, and the health check says the kernel did not answer."""
    with pytest.raises(ValueError, match="no taint mask"):
        health.kernel_state(_VM(""))
    with pytest.raises(ValueError):
        health.parse_kernel_state("dmesg: klogctl: Operation not permitted\n")
    assert health.parse_kernel_state("0\n") == {"taint": 0, "dmesg": ""}


class _MarkingAgent:
    """The lab's host agent at its request boundary: a mark at the start, the lines since
    at the end."""

    def __init__(self, since=None, error=None):
        self.since, self.error, self.marked = since, error, 0

    def kernel_mark(self):
        self.marked += 1
        return {"taint": 0, "mark": True}

    def kernel_since_mark(self):
        if self.error:
            raise self.error
        return self.since


def _lab_health(agent, tmp_path):
    vm = _VM("0\n[ 1.0] boot\n[ 2.0] WARNING: old, from before the run\n")
    vm.session = object()
    start = {"lab": health.kernel_state(vm, agent)}
    assert start["lab"] == {"taint": 0, "mark": True} and vm.calls == 0
    return health.kernel_health({"lab": vm}, start, vmm_fault=None, lab_console=tmp_path / "none",
                                agents={"lab": agent})["lab"], vm


def test_after_a_mark_every_line_since_is_the_runs(tmp_path):
    h, vm = _lab_health(_MarkingAgent({"taint": 0, "dmesg": "[ 3.0] vmlab: moved\n", "overruns": 0}), tmp_path)
    assert h["ok"] is True and vm.calls == 0     # the old WARNING is not the run's
    h, _ = _lab_health(_MarkingAgent({"taint": 512, "dmesg": "[ 3.0] WARNING: CPU: 0 at x\n",
                                      "overruns": 0}), tmp_path)
    assert h["ok"] is False and h["bad_lines"] == ["[ 3.0] WARNING: CPU: 0 at x"] and h["new_taint"] == "W"


def test_lines_lost_to_the_ring_or_an_agent_gone_fail_the_check(tmp_path):
    """What the run logged cannot be vouched for: never a pass, and never the whole log
    over an exec instead (it holds lines from before the mark, with nothing to tell them
    from the run's)."""
    h, _ = _lab_health(_MarkingAgent({"taint": 0, "dmesg": "[ 9.0] fine\n", "overruns": 1}), tmp_path)
    assert h["ok"] is False and h["overruns"] == 1
    h, _ = _lab_health(_MarkingAgent({"taint": 0, "dmesg": "[ 9.0] fine\n", "overruns": 0,
                                      "truncated": True}), tmp_path)
    assert h["ok"] is False and h["truncated"] is True
    h, vm = _lab_health(_MarkingAgent(error=OSError("agent gone")), tmp_path)
    assert h["ok"] is False and "agent gone" in h["error"] and vm.calls == 0


def test_teardown_health_judges_only_what_came_after_the_check():
    end = {"taint": 0, "dmesg": "[ 1.0] boot\n[ 2.0] WARNING: old, judged by the check\n"}
    # the guest: its whole log after the unplug against the check's
    assert health.compare_states(end, {"taint": 0, "dmesg": end["dmesg"] + "[ 3.0] pci eject\n"})["ok"] is True
    h = health.compare_states(end, {"taint": 512, "dmesg": end["dmesg"] + "[ 3.0] WARNING: at close\n"})
    assert h["ok"] is False and h["bad_lines"] == ["[ 3.0] WARNING: at close"] and h["new_taint"] == "W"
    # the lab: only the lines since the check's read of the mark
    lab_end = {"taint": 0, "dmesg": "", "since_mark": True}
    assert health.compare_states(lab_end, {"taint": 0, "dmesg": "[ 4.0] freed\n", "since_mark": True})["ok"]
    h = health.compare_states(lab_end, {"taint": 0, "dmesg": "[ 4.0] BUG: bad page\n", "since_mark": True})
    assert h["ok"] is False and h["bad_line_count"] == 1
    h = health.compare_states(lab_end, {"taint": 0, "dmesg": "", "since_mark": True, "overruns": 2})
    assert h["ok"] is False and h["overruns"] == 2


def test_a_log_that_wrapped_between_two_whole_reads_is_not_vouched_for(tmp_path):
    """The guest's log is read whole at both ends: when the first read's last line is gone
    from the second, lines between may have gone too (a WARN among them)."""
    start = {"guest": {"taint": 0, "dmesg": "[ 1.0] boot\n[ 2.0] last before\n"}}
    for end, ok in (("[ 1.0] boot\n[ 2.0] last before\n[ 3.0] more\n", True),
                    ("[ 5.0] newer\n[ 6.0] newest\n", False)):
        vm = _VM("0\n" + end)
        vm.session = object()
        h = health.kernel_health({"guest": vm}, start, vmm_fault=None, lab_console=tmp_path / "none")
        assert h["guest"]["ok"] is ok and h["guest"].get("truncated", False) is (not ok)
    h = health.compare_states(start["guest"], {"taint": 0, "dmesg": "[ 7.0] after the wrap\n"})
    assert h["ok"] is False and h["truncated"] is True
