"""The host agent's vhost-user back-end (vmlab/vhost_user.py) against a fake front-end:
this test plays QEMU on both sockets (the boundary), the back-end is the real code. The
lab test tests/lab/test_virtio_shm.py runs it against QEMU 11.1."""
from __future__ import annotations

import os
import socket
import struct
import threading

import pytest

from vmlab import vhost_user as vu

SIZE = 64 * 1024


@pytest.fixture
def qemu(tmp_path):
    """(backend, main socket, back-end channel as QEMU holds it, the buffer's memfd)."""
    fd = os.memfd_create("buf")
    os.ftruncate(fd, SIZE)
    logs = []
    b = vu.Backend(str(tmp_path / "vu.sock"), fd, SIZE, log=logs.append)
    assert os.stat(tmp_path / "vu.sock").st_mode & 0o777 == 0o600
    main = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    main.settimeout(5)
    main.connect(str(tmp_path / "vu.sock"))
    ours, theirs = socket.socketpair()
    ours.settimeout(5)
    send(main, vu.SET_BACKEND_REQ_FD, b"", flags=vu.VERSION | vu.NEED_REPLY, fds=[theirs.fileno()])
    theirs.close()
    assert reply_u64(main, vu.SET_BACKEND_REQ_FD) == 0
    yield b, main, ours, fd
    b.close()
    main.close()
    ours.close()
    os.close(fd)
    assert not (tmp_path / "vu.sock").exists()


def send(sock, req, payload, flags=vu.VERSION, fds=()):
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
    sock.sendmsg([vu.HDR.pack(req, flags, len(payload)) + payload], anc)


def reply(sock, req):
    got = vu.read_message(sock)
    assert got is not None
    rreq, flags, payload, fds = got
    assert rreq == req and flags == vu.VERSION | vu.REPLY and not fds   # QEMU insists on 0x5
    return payload


def reply_u64(sock, req):
    return vu.U64.unpack(reply(sock, req))[0]


def start(main, on=True):
    send(main, vu.SET_VRING_ENABLE, vu.VRING_STATE.pack(0, 1 if on else 0))
    send(main, vu.GET_FEATURES, b"")      # a round trip: the back-end has handled the above
    reply(main, vu.GET_FEATURES)


def answer_map(chan, rc=0):
    """Play QEMU's side of one back-end request; (request, payload, fds)."""
    req, flags, payload, fds = vu.read_message(chan)
    assert flags & vu.NEED_REPLY
    chan.sendall(vu.HDR.pack(req, vu.VERSION | vu.REPLY, 8) + vu.U64.pack(rc))
    return req, payload, fds


def map_answered(b, chan) -> None:
    """b.map() with this test playing QEMU's acknowledging side."""
    t = threading.Thread(target=b.map)
    t.start()
    _, _, fds = answer_map(chan)
    for f in fds:
        os.close(f)
    t.join(5)


def test_negotiation(qemu):
    b, main, _, _ = qemu
    send(main, vu.GET_FEATURES, b"")
    assert reply_u64(main, vu.GET_FEATURES) == vu.F_PROTOCOL_FEATURES | vu.F_VERSION_1
    send(main, vu.GET_PROTOCOL_FEATURES, b"")
    pf = reply_u64(main, vu.GET_PROTOCOL_FEATURES)
    for bit in (3, 5, 10, 22):     # REPLY_ACK, BACKEND_REQ, BACKEND_SEND_FD, SHMEM (not 20)
        assert pf >> bit & 1
    assert not pf & (1 | 1 << 9 | 1 << 15)   # no MQ, CONFIG, CONFIGURE_MEM_SLOTS
    send(main, vu.GET_SHMEM_CONFIG, b"")
    cfg = reply(main, vu.GET_SHMEM_CONFIG)
    assert len(cfg) == 2056 and struct.unpack_from("<IIQQ", cfg) == (1, 0, SIZE, 0)
    # a set with NEED_REPLY is acked; its eventfd is closed, not leaked
    r, w = os.pipe()
    send(main, vu.SET_VRING_CALL, vu.U64.pack(0), flags=vu.VERSION | vu.NEED_REPLY, fds=[r])
    assert reply_u64(main, vu.SET_VRING_CALL) == 0
    os.close(r)
    os.close(w)
    send(main, vu.GET_VRING_BASE, vu.VRING_STATE.pack(0, 0))
    assert vu.VRING_STATE.unpack(reply(main, vu.GET_VRING_BASE)) == (0, 0)


def test_no_mapping_before_the_device_started(qemu):
    b, main, chan, _ = qemu
    with pytest.raises(vu.VhostUserError, match="not started"):
        b.map()
    chan.settimeout(0.2)
    with pytest.raises(socket.timeout):      # nothing was sent: QEMU would have crashed
        chan.recv(1)
    with pytest.raises(vu.VhostUserError, match="did not start"):
        b.wait_started(0.2)


def test_map_unmap_and_a_refused_map(qemu):
    b, main, chan, fd = qemu
    start(main)
    b.wait_started(1)
    t = threading.Thread(target=b.map)
    t.start()
    req, payload, fds = answer_map(chan)
    t.join(5)
    assert req == vu.BACKEND_SHMEM_MAP and len(payload) == 40
    assert vu.MMAP.unpack(payload) == (0, 0, 0, SIZE, vu.MAP_RW)
    assert len(fds) == 1 and os.fstat(fds[0]).st_ino == os.fstat(fd).st_ino   # the buffer itself
    os.close(fds[0])
    assert b.state()["mapped"]
    t = threading.Thread(target=b.unmap)
    t.start()
    req, payload, fds = answer_map(chan)
    t.join(5)
    assert req == vu.BACKEND_SHMEM_UNMAP and not fds and vu.MMAP.unpack(payload)[3] == SIZE
    assert not b.state()["mapped"]
    errs = []

    def refused():
        try:
            b.map()
        except vu.VhostUserError as e:
            errs.append(str(e))
    t = threading.Thread(target=refused)
    t.start()
    _, _, fds = answer_map(chan, rc=1)
    for f in fds:
        os.close(f)
    t.join(5)
    assert errs and "refused SHMEM_MAP" in errs[0]
    st = b.state()
    assert not st["mapped"] and st["counts"]["map_failures"] == 1 and st["counts"]["maps"] == 1


def test_a_stop_drops_the_mapping_and_the_next_start_maps_again(qemu):
    b, main, chan, _ = qemu
    start(main)
    map_answered(b, chan)
    start(main, on=False)                      # a reset: QEMU dropped it without a word
    st = b.state()
    assert not st["started"] and not st["mapped"] and st["counts"]["stops"] == 1
    start(main)                                # the guest starts the device again
    req, _, fds = answer_map(chan)             # and the back-end maps by itself
    [os.close(f) for f in fds]
    assert req == vu.BACKEND_SHMEM_MAP
    for _ in range(100):
        if b.state()["counts"]["remaps_after_restart"] == 1:
            break
        threading.Event().wait(0.02)
    assert b.state()["mapped"] and b.state()["counts"]["remaps_after_restart"] == 1


def test_an_unanswered_map_times_out(qemu):
    b, main, chan, _ = qemu
    start(main)
    b.channel.acquire()
    try:
        with pytest.raises(vu.VhostUserError, match="did not answer"):
            b._request(vu.BACKEND_SHMEM_MAP, vu.MMAP.pack(0, 0, 0, SIZE, 1), timeout=0.3)
    finally:
        b.channel.release()


def test_region_must_be_a_power_of_two(tmp_path):
    with pytest.raises(ValueError, match="power of two"):
        vu.Backend(str(tmp_path / "x.sock"), 0, 3 * 4096)


def test_a_failing_main_socket_closes_the_connection(qemu):
    """QEMU waits for replies with its big lock held: a back-end that cannot go on must
    hang up, never leave QEMU waiting."""
    b, main, _, _ = qemu
    send(main, vu.GET_FEATURES, b"")
    reply(main, vu.GET_FEATURES)
    main.sendall(vu.HDR.pack(vu.GET_FEATURES, vu.VERSION, vu.MAX_PAYLOAD + 1))
    assert main.recv(1) == b""                      # EOF, not silence
    for _ in range(100):
        if b.state()["connected"] is False or b.disconnected:
            break
        threading.Event().wait(0.02)
    assert b.disconnected
    with pytest.raises(vu.VhostUserError, match="closed the vhost-user connection"):
        b.wait_started(5)


def test_a_restart_does_not_map_what_was_unmapped_meanwhile(qemu):
    b, main, chan, _ = qemu
    start(main)
    map_answered(b, chan)
    start(main, on=False)
    b.unmap()                                       # stopped: nothing to send, not wanted any more
    start(main)
    chan.settimeout(0.3)
    with pytest.raises(socket.timeout):             # no MAP came after the restart
        chan.recv(1)
    assert not b.state()["mapped"]
