"""QemuMachine's own logic, with its runner faked at the boundary (where the process runs):
the shutdown ladder's order, and what a QEMU that exits at once is. Real launches are the
lab tests' (HostProcess for the lab, LabProcess for every guest)."""
from __future__ import annotations

import signal

import pytest

from vmlab.errors import BootFailure, QemuRefused
from vmlab.qemu import QemuMachine, VMSpec


class FakeHost:
    where = "a fake"

    def __init__(self, *, dies_on=None, starts=True, words=""):
        self.calls: list[str] = []
        self.running = False
        self.dies_on = dies_on          # "quit" | "TERM" | "KILL" | None (never)
        self.starts, self.words = starts, words

    def stderr_path(self, m):
        return "/fake/qemu.log"

    def prepare(self, m):
        self.calls.append("prepare")

    def spawn(self, m):
        self.calls.append("spawn")
        m.pid, self.running = 4242, self.starts

    def alive(self, m):
        return self.running

    def signal(self, m, sig):
        name = {signal.SIGTERM: "TERM", signal.SIGKILL: "KILL"}[sig]
        self.calls.append(name)
        if self.dies_on == name or name == "KILL":
            self.running = False

    def read_text(self, path):
        return self.words if path.endswith("qemu.log") else ""

    def exit_status(self, m):
        return 1

    def qmp_socket_ready(self, m):
        return self.running

    def open_qmp(self, m, timeout):
        host = self

        class Q:
            def settimeout(self, t):
                pass

            def quit_within(self, t):
                host.calls.append("quit")
                if host.dies_on == "quit":
                    host.running = False

            def get_events(self, wait=False):
                return []

            def close(self):
                host.calls.append("qmp-close")
        return Q()

    def cleanup(self, m):
        self.calls.append("cleanup")


def _machine(tmp_path, host):
    spec = VMSpec(name="vm", kernel="k", initrd="i", append="", console_log=str(tmp_path / "c.log"),
                  qmp_socket=str(tmp_path / "q.sock"))
    return QemuMachine(spec, tmp_path, host=host)


@pytest.mark.parametrize("dies_on, ladder", [
    ("quit", ["quit"]), ("TERM", ["quit", "TERM"]), (None, ["quit", "TERM", "KILL"])])
def test_shutdown_climbs_the_ladder_only_as_far_as_needed(tmp_path, monkeypatch, dies_on, ladder):
    monkeypatch.setattr("vmlab.qemu.time.sleep", lambda s: None)
    clock = iter(range(0, 10**6))
    monkeypatch.setattr("vmlab.qemu.time.monotonic", lambda: next(clock))
    host = FakeHost(dies_on=dies_on)
    m = _machine(tmp_path, host)
    m.launch(timeout=5)
    host.calls.clear()
    m.shutdown(timeout=3)
    assert [c for c in host.calls if c in ("quit", "TERM", "KILL")] == ladder
    assert host.calls[-1] == "cleanup" and not m.alive()
    m.shutdown()   # twice is safe
    assert [c for c in host.calls if c in ("quit", "TERM", "KILL")] == ladder


def test_a_qemu_that_exits_at_once_is_the_users_input_unless_it_names_the_kernel(tmp_path):
    m = _machine(tmp_path, FakeHost(starts=False, words="qemu: -device foo: not a valid device model"))
    with pytest.raises(QemuRefused, match="not a valid device model"):
        m.launch(timeout=5)
    m = _machine(tmp_path, FakeHost(starts=False, words="qemu: could not load kernel 'bzImage'"))
    with pytest.raises(BootFailure, match="could not load kernel"):
        m.launch(timeout=5)


def test_a_port_taken_before_qemu_bound_it_is_booted_again(tmp_path):
    """The words are this machine's QEMU's own for a hostfwd port another process holds
    (checked by hand: `-netdev user,hostfwd=...` on a bound port); no one's input, so a
    retryable boot failure (the lab's next attempt picks a new port), not exit 2."""
    words = ("qemu-system-x86_64: -netdev user,id=n0,hostfwd=tcp:127.0.0.1:54015-:22: "
             "Could not set up host forwarding rule 'tcp:127.0.0.1:54015-:22'")
    m = _machine(tmp_path, FakeHost(starts=False, words=words))
    with pytest.raises(BootFailure, match="host forwarding rule") as e:
        m.launch(timeout=5)
    assert e.value.retryable
    # a rule QEMU cannot parse is how it was asked to run: the user's input
    m = _machine(tmp_path, FakeHost(starts=False, words="qemu-system-x86_64: Invalid host "
                                    "forwarding rule 'tcp:x-:22' (Bad host port)"))
    with pytest.raises(QemuRefused, match="Invalid host forwarding rule"):
        m.launch(timeout=5)
