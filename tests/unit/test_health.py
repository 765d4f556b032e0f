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
