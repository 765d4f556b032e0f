"""vmlab/hostagent.py pieces that need no lab: the ivshmem-doorbell server protocol and
the JSON-lines serve loop."""
from __future__ import annotations

import array
import json
import mmap
import os
import socket
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from vmlab import hostagent, stamp

ROOT = Path(__file__).resolve().parents[2]
AGENT = ROOT / "vmlab" / "hostagent.py"


def recv_msg(s: socket.socket):
    fds = array.array("i")
    data, anc, flags, _ = s.recvmsg(8, socket.CMSG_SPACE(4 * fds.itemsize))
    for level, typ, cdata in anc:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            fds.frombytes(cdata[: len(cdata) - (len(cdata) % fds.itemsize)])
    assert len(data) == 8, data
    return struct.unpack("<q", data)[0], list(fds)


@pytest.fixture
def memfd():
    fd = os.memfd_create("vmlab-test")
    os.ftruncate(fd, 8192)
    yield fd
    os.close(fd)


def test_ivshmem_server_protocol(tmp_path, memfd):
    path = str(tmp_path / "ivs.sock")
    srv = hostagent.IvshmemServer(path, memfd)
    try:
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        got_fds = []
        for peer in (1, 2):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.settimeout(10)
            c.connect(path)
            v, fds = recv_msg(c)
            assert (v, fds) == (0, [])
            v, fds = recv_msg(c)
            assert (v, fds) == (peer, [])
            v, fds = recv_msg(c)
            assert v == -1 and len(fds) == 1
            got_fds.append(fds[0])
            c.close()
        fd = got_fds[0]
        assert os.fstat(fd).st_size == 8192
        page = stamp.stamp_page(0x77, 3, 1)
        os.pwrite(memfd, page, 4096)
        with mmap.mmap(fd, 8192, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
            assert m[4096:8192] == page
            m[0:4] = b"ABCD"
        assert os.pread(memfd, 4, 0) == b"ABCD"
        recs = hostagent.read_stamps(memfd, 8192, first=1, full=True)
        assert recs == [[1, "ok", 0x77, 3, 1, stamp.LIVE, 0]]
        for f in got_fds:
            os.close(f)
    finally:
        srv.close()
    assert not os.path.exists(path)


def test_ivshmem_server_replaces_stale_socket(tmp_path, memfd):
    path = tmp_path / "ivs.sock"
    path.write_text("stale")
    srv = hostagent.IvshmemServer(str(path), memfd)
    try:
        assert stat.S_ISSOCK(os.stat(path).st_mode)
    finally:
        srv.close()


def test_read_stamps_header_mode(memfd):
    os.pwrite(memfd, stamp.stamp_page(5, 2, 0, guest_area=struct.pack("<Q", 99)), 0)
    recs = hostagent.read_stamps(memfd, 8192)
    assert recs[0] == [0, "ok", 5, 2, 0, stamp.LIVE, 99]
    assert recs[1][:2] == [1, "bad_magic"]


# --- serve loop ----------------------------------------------------------------------------
def test_serve_json_lines(tmp_path):
    p = subprocess.Popen([sys.executable, str(AGENT), "serve"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        def ask(line: str) -> dict:
            p.stdin.write(line + "\n")
            p.stdin.flush()
            return json.loads(p.stdout.readline())

        assert ask('{"op":"ping"}') == {"ok": True}
        r = ask('{"op":"frobnicate"}')
        assert r["ok"] is False and isinstance(r["error"], str) and "frobnicate" in r["error"]
        assert r["errname"] == "EINVAL"
        r = ask("{not json")
        assert r["ok"] is False and isinstance(r["error"], str) and r["error"]
        r = ask('{"op":"info","buf":42}')
        assert r["ok"] is False and r["errname"] == "ENOENT"
        r = ask('{"op":"hello"}')
        assert r["ok"] is True and r["pid"] == p.pid
        p.stdin.write("\n")  # blank lines are ignored, no response
        assert ask('{"op":"ping"}') == {"ok": True}
        p.stdin.close()
        assert p.wait(timeout=10) == 0
        assert p.stdout.read() == ""
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_serve_non_object_json(tmp_path):
    """A JSON value that is not an object must still get a one-line error response."""
    p = subprocess.Popen([sys.executable, str(AGENT), "serve"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        out, _ = p.communicate('[1,2]\n{"op":"ping"}\n', timeout=10)
        lines = [json.loads(ln) for ln in out.splitlines()]
        assert lines[0]["ok"] is False
        assert lines[1] == {"ok": True}
        assert p.returncode == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_usage_exit_2():
    r = subprocess.run([sys.executable, str(AGENT)], capture_output=True, text=True, timeout=10)
    assert r.returncode == 2 and "usage" in r.stderr


def test_ivshmem_server_close_stops_accept_thread(tmp_path, memfd):
    """close() must stop serving: the accept thread has to return, not stay blocked forever
    (one leaked thread per closed buffer in a long-lived agent)."""
    srv = hostagent.IvshmemServer(str(tmp_path / "ivs.sock"), memfd)
    import time
    time.sleep(0.1)  # let the thread block in accept()
    srv.close()
    srv.thread.join(3)
    assert not srv.thread.is_alive()
