"""The host agent's fork server (hostagent.py zygote) and vmlab-attach, run here as real
processes (the lab test is tests/lab/test_exporter.py's): each attach gets an agent of its
own that holds the caller's pipes and ends with them; no server means exit 75 and not a
byte written; a killed agent is 137; the relay copies both ways."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmlab import exporter, hostagent
from vmlab.exporter import HOSTAGENT_FILES

ROOT = Path(__file__).resolve().parents[2]
AGENT = ROOT / "vmlab" / "hostagent.py"
SRC = ROOT / "host-tools" / "vmlab-attach" / "vmlab_attach.c"


@pytest.fixture(scope="module")
def attach(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("attach") / "vmlab-attach"
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out), str(SRC)],
                   check=True, timeout=120)
    return out


@pytest.fixture
def server(tmp_path):
    sock = tmp_path / "zygote.sock"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-S", "-u", str(AGENT), "zygote", str(sock)], env=env,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=open(tmp_path / "zygote.log", "wb"))
    deadline = time.monotonic() + 30
    while not sock.exists():
        assert p.poll() is None and time.monotonic() < deadline, (tmp_path / "zygote.log").read_text()
        time.sleep(0.05)
    yield p, sock
    p.kill()
    p.wait()


def _attached(attach, sock, env=None):
    return subprocess.Popen([str(attach), "agent", str(sock)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, **(env or {})})


def _exited(pid: int) -> bool:
    """gone, or past exit and only waiting to be reaped (its files and memory released)"""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def _ask(p, op):
    p.stdin.write((json.dumps({"op": op}) + "\n").encode())
    p.stdin.flush()
    return json.loads(p.stdout.readline())


def test_each_attach_gets_an_agent_of_its_own_that_ends_with_its_pipes(attach, server):
    z, sock = server
    a = _attached(attach, sock, {"VMLAB_HUGEPAGES_LEDGER": "/tmp/ledger-a", "OTHER": "x"})
    b = _attached(attach, sock)
    ha, hb = _ask(a, "hello"), _ask(b, "hello")
    assert ha["ok"] and hb["ok"]
    assert ha["forked_from"] == hb["forked_from"] == z.pid
    assert len({ha["pid"], hb["pid"], z.pid}) == 3
    # the caller's VMLAB_* environment, nothing of another caller's
    assert ha["env"] == {"VMLAB_HUGEPAGES_LEDGER": "/tmp/ledger-a"}
    assert hb["env"] == {}
    # named for cleanups that look for agents (matrix.clean_lab_script)
    assert Path(f"/proc/{ha['pid']}/comm").read_text().strip() == hostagent.FORKED_AGENT_NAME.decode()
    a.stdin.close()                     # the controller's EOF
    assert a.wait(timeout=30) == 0
    # attach ended only once the agent had exited: its files and mappings are gone
    assert _exited(ha["pid"])
    assert b"stdin closed: buffers released, exiting" in a.stderr.read()
    assert _ask(b, "ping") == {"ok": True}          # the other agent goes on
    b.stdin.close()
    assert b.wait(timeout=30) == 0
    assert z.poll() is None


def test_a_killed_agent_is_137_and_the_server_forks_the_next(attach, server):
    z, sock = server
    a = _attached(attach, sock)
    pid = _ask(a, "hello")["pid"]
    os.kill(pid, signal.SIGKILL)
    assert a.wait(timeout=30) == 137
    assert _exited(pid)
    assert b"without a status" in a.stderr.read()
    c = _attached(attach, sock)
    assert _ask(c, "ping") == {"ok": True}
    c.stdin.close()
    assert c.wait(timeout=30) == 0


def test_no_server_is_75_and_nothing_written(attach, tmp_path):
    p = subprocess.run([str(attach), "agent", str(tmp_path / "none.sock")], input=b'{"op": "ping"}\n',
                       capture_output=True, timeout=30)
    assert p.returncode == exporter.EX_NO_AGENT and p.stdout == b""
    # a socket nobody forks from (accepts and hangs up, the message unread: an EOF or a
    # reset, by timing; both are "no agent")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp_path / "mute.sock"))
        s.listen(1)
        for _ in range(20):
            q = subprocess.Popen([str(attach), "agent", str(tmp_path / "mute.sock")],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            s.accept()[0].close()
            assert q.wait(timeout=30) == exporter.EX_NO_AGENT, q.stderr.read()
            assert q.stdout.read() == b""


def test_relay_copies_both_ways(attach, tmp_path):
    path = str(tmp_path / "echo.sock")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(path)
        s.listen(1)
        p = subprocess.Popen([str(attach), "relay", path], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        c, _ = s.accept()
        c.sendall(b"greeting\n")
        assert p.stdout.readline() == b"greeting\n"
        p.stdin.write(b"x" * 200000)
        p.stdin.flush()
        got = b""
        while len(got) < 200000:
            got += c.recv(65536)
        assert got == b"x" * 200000
        c.close()                       # the socket's end is the relay's
        assert p.wait(timeout=30) == 0


def test_the_lab_gets_the_attach_source_with_the_agent():
    assert SRC in HOSTAGENT_FILES
    class Nested:
        share_dir, agent_cache = "/mnt/vmlab", True
    cmd = exporter.agent_command(Nested())
    # the fork server when it answers, the agent's own start otherwise: never both
    assert "$d/vmlab-attach agent $d/zygote.sock; rc=$?; [ $rc = 75 ] || exit $rc; fi; exec python3" in cmd
    class Box:
        share_dir, agent_cache = "/tmp/vmlab-run.x", False
    assert "attach" not in exporter.agent_command(Box())


def test_a_silent_client_holds_the_server_for_seconds_only(attach, server):
    z, sock = server
    with socket.socket(socket.AF_UNIX) as silent:
        silent.connect(str(sock))          # says nothing: the server gives up on it
        a = _attached(attach, sock)
        assert _ask(a, "ping") == {"ok": True}
        a.stdin.close()
        assert a.wait(timeout=30) == 0


def test_an_agent_outlives_its_server_and_keeps_its_name(attach, server):
    """A server killed under a running agent: the agent serves on until its EOF, and is
    still found by its name (its command line is the dead server's)."""
    z, sock = server
    a = _attached(attach, sock)
    pid = _ask(a, "hello")["pid"]
    z.kill()
    z.wait()
    assert _ask(a, "ping") == {"ok": True}
    assert Path(f"/proc/{pid}/comm").read_text().strip() == hostagent.FORKED_AGENT_NAME.decode()
    a.stdin.close()
    assert a.wait(timeout=30) == 0 and _exited(pid)


def test_a_failed_start_writes_nothing_and_falls_back(attach, tmp_path):
    """A server that takes the fds and hangs up before its agent said "S" (here: a
    stand-in that only receives) leaves the channel untouched: 75."""
    path = str(tmp_path / "taker.sock")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(path)
        s.listen(1)
        q = subprocess.Popen([str(attach), "agent", path], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        c, _ = s.accept()
        msg, fds, _, _ = socket.recv_fds(c, 8192, 3)
        assert msg.startswith(b"A") and len(fds) == 3
        for fd in fds:
            os.close(fd)
        c.close()
        assert q.wait(timeout=30) == exporter.EX_NO_AGENT
        assert q.stdout.read() == b""


def test_the_attach_binary_is_built_once_per_source(monkeypatch, tmp_path):
    monkeypatch.setenv("VMLAB_CACHE_DIR", str(tmp_path))
    b = exporter.attach_binary()
    assert b.parent == tmp_path / "tools" and os.access(b, os.X_OK)
    stamp = b.stat().st_mtime_ns
    assert exporter.attach_binary() == b and b.stat().st_mtime_ns == stamp
    r = subprocess.run([str(b)], capture_output=True, timeout=30)
    assert r.returncode == 2 and b"usage" in r.stderr


@pytest.mark.parametrize("with_binary", [False, True])
def test_a_share_without_a_server_or_binary_starts_the_agent_itself(attach, tmp_path, with_binary):
    """The nested lab's agent command, run here with its /run copy moved under tmp_path:
    the agent starts as Python when the share has no vmlab-attach, and when vmlab-attach
    finds no server (75)."""
    share = tmp_path / "share"
    share.mkdir()
    for f in HOSTAGENT_FILES:
        (share / f.name).write_bytes(f.read_bytes())
    if with_binary:
        (share / exporter.ATTACH_BIN).write_bytes(attach.read_bytes())
        (share / exporter.ATTACH_BIN).chmod(0o755)

    class Nested:
        share_dir, agent_cache = str(share), True
    cmd = exporter.agent_command(Nested()).replace(exporter.AGENT_COPY_PREFIX, f"{tmp_path}/run-agent-")
    p = subprocess.Popen(["sh", "-c", cmd], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    h = _ask(p, "hello")
    assert h["ok"] and h["forked_from"] is None
    copy = next(tmp_path.glob("run-agent-*"))
    assert (copy / exporter.ATTACH_BIN).exists() == with_binary
    p.stdin.close()
    assert p.wait(timeout=60) == 0


def test_an_interrupted_request_leaves_the_agent_unusable_not_out_of_step(tmp_path):
    """Ctrl-C while a request waits for its answer: that answer arrives later, and the
    teardown's next request must not read it as its own (it got the move's answer for a
    close). A real agent, started here the way a box starts it."""
    from vmlab.errors import RemoteError
    from vmlab.local_session import LocalSession
    share = tmp_path / "share"
    share.mkdir()
    for f in HOSTAGENT_FILES:
        (share / f.name).write_bytes(f.read_bytes())

    class Lab:
        session, share_dir, hugepages_ledger = LocalSession(), str(share), None
    a = exporter.HostAgent(Lab(), tmp_path / "agent.log")
    try:
        real = a._reader.pump

        def interrupted(*args, **kw):
            raise KeyboardInterrupt
        a._reader.pump = interrupted
        with pytest.raises(KeyboardInterrupt):
            a.request("hello")
        a._reader.pump = real
        assert not a.answering
        with pytest.raises(RemoteError, match="the answer to hello is still outstanding"):
            a.request("ping")
    finally:
        a.close()
