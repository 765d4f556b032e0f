"""Every wait has a bound: the one channel reader, QMP connect/accept, process groups,
locks and state files. Real sockets and processes; only the SSH channel is faked."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from vmlab import paths, proc
from vmlab.errors import RemoteError, WaitTimeout
from vmlab.qmp import QMP, QMPGone
from vmlab.ssh import ChannelReader


class FakeChannel:
    """The paramiko.Channel surface ChannelReader uses, over a socketpair (select works)."""

    def __init__(self, chunks=(), endless=False, rc=None, closed=False):
        self.a, self.b = socket.socketpair()
        self.chunks, self.endless, self.rc, self.closed = list(chunks), endless, rc, closed

    def fileno(self):
        return self.a.fileno()

    def recv_ready(self):
        return self.endless or bool(self.chunks)

    def recv(self, n):
        return b"y\n" * 512 if self.endless else self.chunks.pop(0)

    def recv_stderr_ready(self):
        return False

    def recv_stderr(self, n):
        return b""

    def exit_status_ready(self):
        return self.rc is not None and not self.chunks

    def recv_exit_status(self):
        return self.rc


def test_reader_times_out_on_a_stream_that_never_stops():
    """`vmlab lab exec --timeout 5 -- yes` never ended: data kept the deadline unchecked."""
    rd = ChannelReader(FakeChannel(endless=True), "yes")
    t = time.monotonic()
    with pytest.raises(WaitTimeout):
        rd.read_until_exit(time.monotonic() + 0.5)
    assert time.monotonic() - t < 2.0
    assert len(rd.out) > 0


def test_reader_times_out_on_silence():
    t = time.monotonic()
    with pytest.raises(WaitTimeout):
        ChannelReader(FakeChannel(), "silent").read_until_exit(time.monotonic() + 0.3)
    assert time.monotonic() - t < 1.5


def test_reader_collects_until_exit():
    rd = ChannelReader(FakeChannel([b"a", b"b"], rc=3), "cmd")
    assert rd.read_until_exit(time.monotonic() + 5) == 3
    assert bytes(rd.out) == b"ab"


def test_reader_stop_and_soft_deadline():
    rd = ChannelReader(FakeChannel([b"line\n"]), "agent")
    assert rd.pump(time.monotonic() + 5, stop=lambda: b"\n" in rd.out) == "stop"
    assert ChannelReader(FakeChannel(), "w").pump(time.monotonic() + 0.1, soft=True) == "deadline"


def test_reader_dead_session_raises_at_once():
    t = time.monotonic()
    with pytest.raises(RemoteError):
        ChannelReader(FakeChannel(closed=True), "gone").read_until_exit(time.monotonic() + 30)
    assert time.monotonic() - t < 1.0


def test_reader_tick_runs_while_waiting():
    ticks = []
    with pytest.raises(WaitTimeout):
        ChannelReader(FakeChannel(), "t").pump(time.monotonic() + 0.5, on_tick=lambda: ticks.append(1),
                                               tick=0.1)
    assert len(ticks) >= 2


# --- QMP: a server that accepts and never greets; a QEMU that never connects
def test_qmp_connect_is_bounded(tmp_path):
    path = str(tmp_path / "mute.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)
    conns = []
    threading.Thread(target=lambda: conns.append(srv.accept()), daemon=True).start()
    q = QMP(path)
    t = time.monotonic()
    with pytest.raises(WaitTimeout):
        q.connect_within(0.5, "mute QEMU")
    assert time.monotonic() - t < 3
    srv.close()


def test_qmp_accept_fails_fast_when_qemu_is_gone(tmp_path):
    q = QMP.serve(tmp_path / "qmp.sock")
    assert oct(os.stat(tmp_path / "qmp.sock").st_mode & 0o777) == "0o600"
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    t = time.monotonic()
    with pytest.raises(QMPGone):
        q.accept_while(lambda: p.poll() is None, 30, "probe")
    assert time.monotonic() - t < 5


def test_qmp_accept_is_bounded(tmp_path):
    q = QMP.serve(tmp_path / "qmp.sock")
    with pytest.raises(WaitTimeout):
        q.accept_while(lambda: True, 0.4, "never")


# --- process groups: TERM, then KILL, children included
def test_stop_group_takes_the_children(tmp_path):
    script = ("import os, signal, time, subprocess, sys\n"
              "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
              "c = subprocess.Popen([sys.executable, '-c', 'import signal,time; "
              "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'])\n"
              f"open({str(tmp_path / 'child')!r}, 'w').write(str(c.pid))\n"
              "time.sleep(60)\n")
    p = proc.popen([sys.executable, "-c", script], start_new_session=True)
    proc.wait_until(lambda: (tmp_path / "child").exists() and (tmp_path / "child").read_text(), 10, "child")
    child = int((tmp_path / "child").read_text())
    t = time.monotonic()
    proc.stop_group(p, grace=0.5)
    assert time.monotonic() - t < 15
    assert p.poll() is not None
    proc.wait_until(lambda: not proc.pid_alive(child), 5, "child gone")


def test_pid_start_time_names_one_process():
    me = proc.pid_start_time(os.getpid())
    assert isinstance(me, int) and me == proc.pid_start_time(os.getpid())
    assert proc.pid_start_time(2 ** 22 + 12345) is None


# --- shared state: atomic files, locks, private run directories
def test_write_atomic_and_read_json(tmp_path):
    f = tmp_path / "state.json"
    paths.write_atomic(f, json.dumps({"a": 1}))
    assert paths.read_json(f) == {"a": 1}
    assert oct(f.stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
    f.write_text("{corrupt")
    assert paths.read_json(f) is None
    f.write_text("[1, 2]")
    assert paths.read_json(f) is None
    assert paths.read_json(tmp_path / "missing") is None


def test_lock_excludes_and_times_out(tmp_path):
    lock = tmp_path / "lab.lock"
    held = threading.Event()
    release = threading.Event()

    def holder():
        with paths.locked(lock, "test"):
            held.set()
            release.wait(10)
    th = threading.Thread(target=holder)
    th.start()
    held.wait(5)
    # flock is per open file description: a second open in this process must wait too
    with pytest.raises(WaitTimeout):
        with paths.locked(lock, "test", timeout=0.3):
            pass
    release.set()
    th.join()
    with paths.locked(lock, "test", timeout=1):
        pass


def test_runtime_dirs_are_private_and_distinct(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    a, b = paths.runtime_dir(), paths.runtime_dir()
    assert a != b and a.parent == tmp_path
    assert oct(a.stat().st_mode & 0o777) == "0o700"


def test_lab_state_corrupt_or_stale_means_no_lab(tmp_path):
    from vmlab.lab import NestedLab
    st, why = NestedLab.read_state(tmp_path)
    assert st is None and "no lab is up" in why
    (tmp_path / "state.json").write_text("{half a file")
    st, why = NestedLab.read_state(tmp_path)
    assert st is None and "corrupt" in why and "\n" not in why
    rec = {"pid": os.getpid(), "start_time": 1, "ssh_port": 1, "accel": "tcg", "qmp": "x", "console": "c"}
    (tmp_path / "state.json").write_text(json.dumps(rec))
    st, why = NestedLab.read_state(tmp_path)  # our pid, another start time: a recycled pid
    assert st is None and "no longer running" in why
    assert NestedLab.stop_recorded(tmp_path, progress=lambda m: None) is False
    assert not (tmp_path / "state.json").exists()


def test_stop_recorded_stops_a_process_by_pid_and_start_time(tmp_path):
    from vmlab.lab import NestedLab
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        rec = {"pid": p.pid, "start_time": proc.pid_start_time(p.pid), "ssh_port": 1, "accel": "tcg",
               "qmp": str(tmp_path / "no-qmp.sock"), "console": "c"}
        (tmp_path / "state.json").write_text(json.dumps(rec))
        (tmp_path / "guest.json").write_text("{}")
        t = time.monotonic()
        assert NestedLab.stop_recorded(tmp_path, progress=lambda m: None) is True
        assert p.wait(timeout=20) == -signal.SIGTERM
        assert time.monotonic() - t < 20
        assert not (tmp_path / "state.json").exists() and not (tmp_path / "guest.json").exists()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_reader_exit_with_endless_pending_output_still_times_out():
    """After the exit status, output that keeps coming must not skip the deadline check."""
    t = time.monotonic()
    with pytest.raises(WaitTimeout):
        ChannelReader(FakeChannel(endless=True, rc=0), "exit+flood").read_until_exit(time.monotonic() + 0.5)
    assert time.monotonic() - t < 2.0


def test_mountinfo_paths_are_unescaped_exactly():
    from vmlab.images import _unescape_mountinfo
    assert _unescape_mountinfo("/root/.cache/jos\u00e9/a\\040b".encode()) == "/root/.cache/jos\u00e9/a b"
    assert _unescape_mountinfo(b"/x\\134y\\011z") == "/x\\y\tz"


def test_build_dir_removal_never_crosses_a_filesystem(tmp_path, monkeypatch):
    """A directory on another filesystem (here: /proc bound in by a fake st_dev) is kept."""
    from vmlab import images
    work = tmp_path / "build"
    (work / "root" / "dev").mkdir(parents=True)
    (work / "root" / "etc").mkdir()
    (work / "root" / "etc" / "f").write_text("x")
    (work / "root" / "dev" / "null-ish").write_text("host device stand-in")
    real_lstat = os.lstat

    class St:
        def __init__(self, st, dev):
            self._st, self.st_dev = st, dev

        def __getattr__(self, k):
            return getattr(self._st, k)

    def fake_lstat(p, *a, **kw):
        st = real_lstat(p, *a, **kw)
        return St(st, st.st_dev + 1) if str(p).startswith(str(work / "root" / "dev")) else st
    monkeypatch.setattr(images.os, "lstat", fake_lstat)
    monkeypatch.setattr(images, "mounts_under", lambda root: [])
    assert images.remove_build_dir(work) is False
    assert (work / "root" / "dev" / "null-ish").read_text() == "host device stand-in"
    assert not (work / "root" / "etc").exists()
