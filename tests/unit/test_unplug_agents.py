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


def unplug(gagent_exited: bool, watch) -> list[str]:
    r = Run.__new__(Run)
    r.plug, r.stack, r.result = FakePlug(), FakeStack(), {}
    r.gagent_exited, r.watch = gagent_exited, watch
    assert r.unplug() is True
    return r.stack.guest.execs


@pytest.mark.parametrize("exited, watch, kills", [
    (True, None, False),       # every command answered by one serve, which exited
    (False, None, True),       # it did not exit (or never started): anything may be left
    (True, object(), True),    # a watcher runs for an hour unless killed
])
def test_the_kill_runs_unless_every_agent_is_known_gone(exited, watch, kills):
    execs = unplug(exited, watch)
    assert bool([c for c in execs if "pkill" in c and "mlab-guest-agent" in c]) == kills
