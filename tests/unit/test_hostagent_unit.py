"""vmlab/hostagent.py pieces that need no lab: the ivshmem-doorbell server protocol, the
JSON-lines serve loop, the exporter requests (against a fake exporter) and the fuzzers'
bookkeeping (against /dev/null)."""
from __future__ import annotations

import array
import errno
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

from tests.prereq import missing
from vmlab import exporter_uapi as U
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


# --- vmlab exporter requests (ABI 2: buffers by dma-buf fd), against a fake exporter ------


class FakeExporter:
    """Plays the kernel side of the vmlab ioctls on the request buffers the agent builds,
    and records every decoded request."""

    def __init__(self):
        self.calls = []
        self.generation = 1

    def __call__(self, fd, req, buf):
        import ctypes
        for cname, (st, names) in U.STRUCTS.items():
            if req == getattr(U, "IOC_" + {"vmlab_create": "CREATE", "vmlab_info": "INFO",
                                           "vmlab_move": "MOVE", "vmlab_pte": "PTE", "vmlab_abi": "ABI",
                                           "vmlab_release_quarantine": "RELEASE_QUARANTINE"}[cname]):
                break
        else:
            raise AssertionError(f"unknown ioctl {req:#x}")
        assert len(buf) == st.size
        v = U.unpack(st, names, buf)
        self.calls.append((cname, dict(v)))
        if cname == "vmlab_create":
            v.update(fd=777, id=41)
        elif cname == "vmlab_info":
            if v["pfns_ptr"]:
                data = struct.pack(f"<{v['pfns_count']}Q", *range(1000, 1000 + v["pfns_count"]))
                ctypes.memmove(v["pfns_ptr"], data, len(data))
            v.update(id=41, pfns_count=4, caching=1, vm_prot=0, alloc=2, size=16384,
                     generation=self.generation, faults=5, zaps=2, moves=3, mmaps=1, live_mappings=1,
                     quarantined_pages=8, stale_mapped=0, module_pages=12, refaulted_pages=4,
                     module_quarantined_pages=20, leaked_pages=0)
        elif cname == "vmlab_move":
            self.generation += 1
            v.update(generation=self.generation)
        elif cname == "vmlab_release_quarantine":
            v.update(freed_pages=8)
        buf[:] = U.pack(st, names, **v)
        return 0


@pytest.fixture
def fake_exporter(monkeypatch):
    fake = FakeExporter()
    monkeypatch.setattr(hostagent, "_ioctl", fake)
    return fake


def test_vmlab_buffer_addresses_the_exporter_by_fd(fake_exporter):
    b = hostagent.VmlabBuffer(99, 16384, "WC", "NONCOMPOUND")
    assert (b.fd, b.id) == (777, 41)
    name, create = fake_exporter.calls[-1]
    assert name == "vmlab_create"
    assert create == {"size": 16384, "caching": U.CACHING["WC"], "alloc": U.ALLOC["NONCOMPOUND"],
                      "flags": U.CREATE_CLOEXEC, "fd": -1, "id": 0}

    info = b.info()
    name, req = fake_exporter.calls[-1]
    assert name == "vmlab_info" and req["fd"] == 777 and req["flags"] == 0 and req["pad"] == 0
    assert req["pfns_ptr"] == 0
    for k in ("generation", "faults", "zaps", "moves", "mmaps", "live_mappings", "quarantined_pages",
              "stale_mapped", "module_pages", "caching", "vm_prot", "alloc", "id",
              "refaulted_pages", "module_quarantined_pages", "leaked_pages"):
        assert k in info, k
    assert info["caching"] == "WC" and info["vm_prot"] == "WC" and info["alloc"] == "NONCOMPOUND"
    assert info["refaulted_pages"] == 4 and info["module_quarantined_pages"] == 20
    assert "pfns" not in info
    assert b.info(pfns=True)["pfns"] == [1000, 1001, 1002, 1003]

    assert b.move("MIGRATE", "UC") == {"generation": 2,
                                       "what": "MIGRATE of the whole buffer done by the exporter"}
    name, req = fake_exporter.calls[-1]
    assert name == "vmlab_move"
    assert req == {"fd": 777, "mode": U.MOVE["MIGRATE"], "caching": U.CACHING["UC"], "flags": 0,
                   "generation": 0, "first_page": 0, "page_count": 0}
    b.move("ZAP_ONLY", None)
    assert fake_exporter.calls[-1][1]["caching"] == U.CACHING_KEEP
    # a page range: only that range moves
    assert "pages 3..3" in b.move("MIGRATE", "KEEP", {"first": 3, "count": 1})["what"]
    req = fake_exporter.calls[-1][1]
    assert (req["first_page"], req["page_count"], req["caching"]) == (3, 1, U.CACHING_KEEP)

    assert b.release_quarantine(max_generation=3, force=True) == {"id": 41, "freed_pages": 8}
    name, req = fake_exporter.calls[-1]
    assert name == "vmlab_release_quarantine"
    assert req == {"id": 41, "max_generation": 3, "flags": U.RELEASE_FORCE, "pad": 0, "freed_pages": 0}
    b.fd = -1  # nothing to close: the fd is the fake's


def test_op_release_quarantine_by_id_or_handle(fake_exporter):
    agent = hostagent.Agent()
    agent.ctl = 99  # never opened: the fake plays the device
    with pytest.raises(hostagent.AgentError) as e:
        agent.op_release_quarantine({})
    assert e.value.errno == errno.EINVAL
    with pytest.raises(hostagent.AgentError) as e:
        agent.op_release_quarantine({"buf": 5})
    assert e.value.errno == errno.ENOENT
    # a closed buffer's quarantine, by its id
    assert agent.op_release_quarantine({"id": 7, "max_generation": 2}) == {"id": 7, "freed_pages": 8}
    assert fake_exporter.calls[-1][1] == {"id": 7, "max_generation": 2, "flags": 0, "pad": 0,
                                          "freed_pages": 0}
    agent.op_release_quarantine({"id": 0, "force": True})
    assert fake_exporter.calls[-1][1]["flags"] == U.RELEASE_FORCE
    # a live one, by handle; close reports the id its quarantine stays under
    h = agent.op_create({"kind": "vmlab", "size": 16384})["buf"]
    agent.op_release_quarantine({"buf": h})
    assert fake_exporter.calls[-1][1]["id"] == 41
    agent.buffers[h].fd = -1
    assert agent.op_close({"buf": h}) == {"id": 41}
    agent.ctl = None


@pytest.fixture
def devnull_agent():
    """An agent whose "control device" is /dev/null: every ioctl fails with ENOTTY, which
    is enough to drive the request plumbing and the fuzzers' bookkeeping without a module."""
    agent = hostagent.Agent()
    agent.ctl = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    yield agent
    agent.close_all()


def test_op_raw_builds_structs_by_name(devnull_agent):
    r = devnull_agent.op_raw({"cmd": "MOVE", "fields": {"mode": 1, "caching": U.CACHING_KEEP},
                              "fd_of": "closed"})
    assert r["rc"] == -1 and r["errname"] == "ENOTTY"
    assert r["named"]["mode"] == 1 and r["named"]["caching"] == U.CACHING_KEEP
    assert r["named"]["fd"] >= 0 and r["fields"][0] == r["named"]["fd"]
    r = devnull_agent.op_raw({"cmd": "RELEASE_QUARANTINE", "fields": [5, 2, 1, 0, 0]})
    assert r["named"] == {"id": 5, "max_generation": 2, "flags": 1, "pad": 0, "freed_pages": 0}
    r = devnull_agent.op_raw({"cmd": "INFO", "fields": {"pad": 1}, "fd_of": "devnull"})
    assert r["named"]["pad"] == 1 and r["errname"] == "ENOTTY"
    with pytest.raises(KeyError):
        devnull_agent.op_raw({"cmd": "MOVE", "fields": {"id": 1}})


def test_fuzz_is_bounded_by_count(devnull_agent):
    out = devnull_agent.op_fuzz({"count": 300, "seed": 3})
    assert sum(out["errnos"].values()) == out["ioctls"] == 300
    assert sum(sum(d.values()) for d in out["per_cmd"].values()) == 300
    assert out["release_errors"] == {}
    assert "module_pages" in out and "leaked_pages" in out


def test_fuzz_is_bounded_by_seconds(devnull_agent):
    import time
    t0 = time.monotonic()
    out = devnull_agent.op_fuzz({"count": 10 ** 9, "seed": 4, "seconds": 1})
    assert time.monotonic() - t0 < 20
    assert 0 < out["ioctls"] < 10 ** 9


def test_concurrent_fuzz_is_bounded_and_joins(devnull_agent):
    import time
    t0 = time.monotonic()
    out = devnull_agent.op_fuzz({"concurrent": True, "count": 500, "seed": 5, "seconds": 20,
                                 "threads": 5})
    assert time.monotonic() - t0 < 60
    assert out["stuck_threads"] == 0 and out["thread_errors"] == []
    assert out["threads"] == 5
    # every budgeted op is at most one ioctl, plus the three initial creates
    assert 0 < out["ioctls"] <= 503
    assert sum(out["errnos"].values()) == out["ioctls"]
    assert set(out["per_cmd"]) <= {"CREATE", "INFO", "MOVE", "RELEASE_QUARANTINE"}


def test_quarantine_state_without_the_module(monkeypatch, tmp_path):
    monkeypatch.setattr(hostagent, "DEBUGFS", str(tmp_path / "absent"))
    assert hostagent.quarantine_state() == {"sets": None, "quarantined_pages": None,
                                            "module_pages": None, "leaked_pages": None}
    d = tmp_path / "dbg"
    d.mkdir()
    (d / "quarantine").write_text("3 1 256 0 0\n3 2 256 1 1\n9 1 16 0 2\n")
    (d / "pages").write_text("800\n")
    (d / "leaked").write_text("0\n")
    monkeypatch.setattr(hostagent, "DEBUGFS", str(d))
    q = hostagent.quarantine_state()
    assert q["sets"][1] == [3, 2, 256, 1, 1] and q["quarantined_pages"] == 528
    assert q["module_pages"] == 800 and q["leaked_pages"] == 0


def test_move_under_writes_stops_its_writer_on_error(devnull_agent, memfd):
    """The writer thread runs while the MOVE is issued; when the MOVE fails (here: the
    "device" is /dev/null) the thread is stopped and the mapping dropped, never left behind."""
    import threading
    b = object.__new__(hostagent.VmlabBuffer)
    b.size, b.fd, b.id, b.generation, b.ctl = 8192, memfd, 1, 1, devnull_agent.ctl
    devnull_agent.buffers[1] = b
    before = threading.active_count()
    with pytest.raises(hostagent.AgentError) as e:
        devnull_agent.op_move_under_writes({"buf": 1, "mode": "MIGRATE", "page": 1, "after_ms": 1})
    assert e.value.errno == errno.ENOTTY
    assert threading.active_count() == before
    assert struct.unpack("<Q", os.pread(memfd, 8, 4096 + stamp.GUEST_OFF + 8))[0] > 1000
    with pytest.raises(hostagent.AgentError):
        devnull_agent.op_move_under_writes({"buf": 1, "mode": "MIGRATE", "page": 2})
    del devnull_agent.buffers[1]


def test_move_under_writes_refuses_bad_requests_before_writing(devnull_agent, memfd):
    """A mode or caching the exporter has no number for is EINVAL before anything is
    mapped or written (it was a KeyError after the writer started, whose munmap under
    the still-running writer killed the agent with SIGSEGV)."""
    import threading
    b = object.__new__(hostagent.VmlabBuffer)
    b.size, b.fd, b.id, b.generation, b.ctl = 8192, memfd, 1, 1, devnull_agent.ctl
    devnull_agent.buffers[1] = b
    before = threading.active_count()
    try:
        for bad in ({"mode": "BOGUS"}, {"mode": "MIGRATE", "caching": "WT"},
                    {"mode": "MIGRATE", "pace_us": -5}):
            with pytest.raises(hostagent.AgentError) as e:
                devnull_agent.op_move_under_writes({"buf": 1, "page": 1, **bad})
            assert e.value.errno == errno.EINVAL
        assert threading.active_count() == before
        assert os.pread(memfd, 8, 4096 + stamp.GUEST_OFF + 8) == bytes(8)   # nothing written
    finally:
        del devnull_agent.buffers[1]


def test_move_under_writes_stops_its_writer_before_unmapping(devnull_agent, memfd, monkeypatch):
    """An error after the writer started (here: no control device) stops the writer,
    then unmaps: the agent lives on and answers with the error."""
    import threading
    b = object.__new__(hostagent.VmlabBuffer)
    b.size, b.fd, b.id, b.generation, b.ctl = 8192, memfd, 1, 1, devnull_agent.ctl
    devnull_agent.buffers[1] = b

    def no_control():
        raise hostagent.AgentError("no control device", errno.ENODEV)
    monkeypatch.setattr(devnull_agent, "control", no_control)
    before = threading.active_count()
    try:
        with pytest.raises(hostagent.AgentError) as e:
            devnull_agent.op_move_under_writes({"buf": 1, "mode": "MIGRATE", "page": 1,
                                                "pace_us": 20000})
        assert e.value.errno == errno.ENODEV
        assert threading.active_count() == before
        # stopped early: at a 20 ms pace the writer is far from its last slot
        nslots = (4096 - stamp.GUEST_OFF - 8) // 8
        last = struct.unpack("<Q", os.pread(memfd, 8, 4096 + stamp.GUEST_OFF + 8 * nslots))[0]
        assert last == 0
    finally:
        del devnull_agent.buffers[1]


def test_the_read_since_the_mark_is_bounded(monkeypatch):
    """A kernel that logs as fast as the agent reads must not hold its answer past the
    controller's timeout: the read stops at its deadline and says so."""
    if not os.access("/dev/kmsg", os.R_OK | os.W_OK):
        missing("/dev/kmsg is not readable: the kernel log needs root (CI runs as root)")
    agent = hostagent.Agent()
    try:
        agent.op_kernel_state({"mark": True})
        with open("/dev/kmsg", "w") as k:
            k.write(f"vmlab-test-{os.getpid()} a line to read\n")
        monkeypatch.setattr(hostagent, "KMSG_READ_SECONDS", -1)
        st = agent.op_kernel_state({"since_mark": True})
        assert st["truncated"] is True and st["text"] == ""
        monkeypatch.setattr(hostagent, "KMSG_READ_SECONDS", 20)
        st = agent.op_kernel_state({"since_mark": True})
        assert st["truncated"] is False and f"vmlab-test-{os.getpid()} a line to read" in st["text"]
    finally:
        agent.close_all()
    assert agent.kmsg_mark is None


def test_the_whole_log_read_is_bounded_too(monkeypatch):
    """op_kmsg (the shutdown's lab-dmesg.log) stops at the same deadline and says so."""
    if not os.access("/dev/kmsg", os.R_OK):
        missing("/dev/kmsg is not readable: the kernel log needs root (CI runs as root)")
    agent = hostagent.Agent()
    monkeypatch.setattr(hostagent, "KMSG_READ_SECONDS", -1)
    out = agent.op_kmsg({})
    assert out["truncated"] is True and out["text"].startswith("[vmlab: the log grew faster")
    monkeypatch.setattr(hostagent, "KMSG_READ_SECONDS", 20)
    out = agent.op_kmsg({})
    assert out["truncated"] is False and out["text"] and "[vmlab:" not in out["text"]
