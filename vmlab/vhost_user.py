"""A vhost-user back-end that serves one dma-buf as a VIRTIO shared memory region: the
VMM's own path for host-visible blobs (QEMU >= 11.1, ``-device vhost-user-test-device-pci``).

Runs ON THE LAB HOST inside the host agent (stdlib only, shipped beside hostagent.py).
No virtqueue work: it negotiates features, answers GET_SHMEM_CONFIG with one region the
size of the buffer (QEMU makes it BAR 4, which must be a power of two), and maps the
buffer's fd into the region with BACKEND_SHMEM_MAP on the back-end channel QEMU gave it.

What QEMU 11.1.3 does, read from its binary and docs/interop/vhost-user.rst (DESIGN.md):
- SHMEM_MAP/UNMAP read ``dev->vdev``, which only a started device has: sent to a device
  no driver started, they crash QEMU. So nothing is mapped before QEMU has enabled the
  rings (SET_VRING_ENABLE 1, the end of vhost_dev_start), and nothing after it disabled
  them (SET_VRING_ENABLE 0, vhost_dev_stop) or reset the owner.
- A device reset drops every mapping without telling the back-end. A stop comes first
  (the rings' disable), so a mapping wanted across a reset is sent again at the next start.
- QEMU does not serve the back-end channel while it waits for a reply on the main
  socket; the main socket has a thread of its own here, so a MAP awaiting its ack never
  blocks QEMU's next request (its commit after a MAP sends SET_MEM_TABLE).
- What the back-end cannot prevent: a MAP already in QEMU's back-end socket when the
  guest stops the device is read after the stop and crashes QEMU 11.1.3 (a VMM_FAULT,
  never a verdict vmlab hides). The window is one request long; vmlab's guests only stop
  the device by resetting or shutting down.
- If the main-socket thread fails, it closes the connection: QEMU then sees the back-end
  gone instead of waiting forever for a reply (it waits with the BQL held).
"""
import os
import socket
import struct
import threading
import time

# front-end -> back-end requests (the subset QEMU sends to this device)
GET_FEATURES, SET_FEATURES, SET_OWNER, RESET_OWNER, SET_MEM_TABLE = 1, 2, 3, 4, 5
GET_VRING_BASE, SET_VRING_CALL, SET_VRING_ERR = 11, 13, 14
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_VRING_ENABLE = 15, 16, 17, 18
SET_BACKEND_REQ_FD, RESET_DEVICE, SET_STATUS, GET_STATUS, GET_SHMEM_CONFIG = 21, 34, 39, 40, 44
NAMES = {v: k for k, v in list(globals().items()) if k.isupper() and isinstance(v, int)}
# back-end -> front-end requests
BACKEND_SHMEM_MAP, BACKEND_SHMEM_UNMAP = 9, 10

F_PROTOCOL_FEATURES = 1 << 30
F_VERSION_1 = 1 << 32
PF_REPLY_ACK, PF_BACKEND_REQ, PF_BACKEND_SEND_FD, PF_STATUS, PF_SHMEM = 1 << 3, 1 << 5, 1 << 10, 1 << 16, 1 << 22
PROTOCOL_FEATURES = PF_REPLY_ACK | PF_BACKEND_REQ | PF_BACKEND_SEND_FD | PF_STATUS | PF_SHMEM

VERSION, REPLY, NEED_REPLY = 0x1, 0x4, 0x8
HDR = struct.Struct("<III")                # request, flags, size
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")         # index, num
MMAP = struct.Struct("<B7xQQQQ")          # shmid, fd_offset, shm_offset, len, flags
MAP_RW = 1
MAX_SHMEM_REGIONS = 256
MAX_PAYLOAD = 8 + 8 * MAX_SHMEM_REGIONS    # VhostUserShMemConfig, QEMU's largest payload
DRIVER_OK = 4
SHMID = 0


class VhostUserError(Exception):
    pass


class Refused(VhostUserError):
    """QEMU answered a request with an error: the VMM's decision, a verdict."""


def _recv_exact(sock, n, fds_out=None):
    """n bytes from a stream socket (and the fds that came with them), or None at EOF."""
    data = b""
    while len(data) < n:
        if fds_out is not None:
            chunk, fds, _, _ = socket.recv_fds(sock, n - len(data), 8)
            fds_out.extend(fds)
        else:
            chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def read_message(sock):
    """(request, flags, payload, fds) or None at EOF."""
    fds = []
    head = _recv_exact(sock, HDR.size, fds)
    if head is None:
        for fd in fds:
            os.close(fd)
        return None
    req, flags, size = HDR.unpack(head)
    if size > MAX_PAYLOAD:
        for fd in fds:
            os.close(fd)
        raise VhostUserError(f"request {req}: payload of {size} bytes (at most {MAX_PAYLOAD})")
    payload = _recv_exact(sock, size, fds) if size else b""
    if payload is None:
        for fd in fds:
            os.close(fd)
        return None
    return req, flags, payload, fds


def shmem_config(size):
    """The GET_SHMEM_CONFIG reply payload: one region (shmid 0) of ``size`` bytes."""
    return struct.pack("<II", 1, 0) + U64.pack(size) + bytes(8 * (MAX_SHMEM_REGIONS - 1))


class Backend:
    """One buffer's back-end: listens on ``path`` (0600) for one QEMU; ``map()`` and
    ``unmap()`` change what the guest sees in the region; ``wait_started()`` waits until
    the guest has started the device (only then can anything be mapped)."""

    def __init__(self, path, fd, size, log=lambda m: None):
        if size < 4096 or size & (size - 1):
            raise ValueError(f"region size {size}: QEMU's BAR needs a power of two >= 4096")
        self.path, self.fd, self.size, self.log = path, fd, size, log
        # the state below; never held while waiting for QEMU (its main-socket thread
        # takes it to record a start or a stop while a MAP may await its ack)
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.channel = threading.Lock()      # one request at a time on the back-end channel
        self.started = False                 # QEMU said DRIVER_OK, and no stop since
        self.mapped = False                  # QEMU acked our MAP and no UNMAP/stop since
        self.want_mapped = False             # map again at the next start
        self.backend_sock = None
        self.conn = None
        self.disconnected = False            # QEMU's main socket is gone
        self.epoch = 0                       # +1 at every start and stop
        self.closed = False
        self.status = 0
        self.counts = {"maps": 0, "unmaps": 0, "map_failures": 0, "starts": 0, "stops": 0,
                       "remaps_after_restart": 0}
        self.messages = []                   # (monotonic s, request name) as QEMU sent them
        self.sock, self.ino = listen_private(path, 1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    # --- the main socket: QEMU's requests, one thread -------------------------------------
    def _serve(self):
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        self.conn = conn
        self.log(f"vhost-user: QEMU connected to {self.path}")
        try:
            while not self.closed:
                msg = read_message(conn)
                if msg is None:
                    break
                self._handle(conn, *msg)
        except Exception as e:   # a dead thread would leave QEMU waiting for a reply: say why
            if not self.closed:
                self.log(f"vhost-user: main socket: {type(e).__name__}: {e}")
        finally:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
            with self.cond:
                self.started = self.mapped = False
                self.disconnected = True
                self.epoch += 1
                self.cond.notify_all()
            self.log("vhost-user: the connection to QEMU is closed")

    def _reply(self, conn, req, payload):
        conn.sendall(HDR.pack(req, VERSION | REPLY, len(payload)) + payload)

    def _handle(self, conn, req, flags, payload, fds):
        keep = []
        try:
            keep = self._dispatch(conn, req, flags, payload, fds)
        finally:
            for fd in fds:
                if fd not in keep:
                    os.close(fd)

    def _dispatch(self, conn, req, flags, payload, fds) -> list:
        """Answer one request; the fds it keeps (the rest are closed by the caller)."""
        self.messages.append((round(time.monotonic(), 6), NAMES.get(req, str(req))))
        del self.messages[:-200]
        keep_fd = False
        answered = False
        if req == GET_FEATURES:
            self._reply(conn, req, U64.pack(F_PROTOCOL_FEATURES | F_VERSION_1))
            answered = True
        elif req == GET_PROTOCOL_FEATURES:
            self._reply(conn, req, U64.pack(PROTOCOL_FEATURES))
            answered = True
        elif req == GET_QUEUE_NUM:
            self._reply(conn, req, U64.pack(1))
            answered = True
        elif req == GET_SHMEM_CONFIG:
            self._reply(conn, req, shmem_config(self.size))
            answered = True
        elif req == GET_STATUS:
            self._reply(conn, req, U64.pack(self.status))
            answered = True
        elif req == GET_VRING_BASE:
            index = VRING_STATE.unpack_from(payload)[0] if len(payload) >= VRING_STATE.size else 0
            self._reply(conn, req, VRING_STATE.pack(index, 0))
            answered = True
            self._stopped("GET_VRING_BASE")
        elif req == SET_BACKEND_REQ_FD and fds:
            with self.lock:
                old, self.backend_sock = self.backend_sock, socket.socket(fileno=fds[0])
            keep_fd = True
            if old is not None:
                _shut(old)
        elif req == SET_VRING_ENABLE and len(payload) >= VRING_STATE.size:
            if VRING_STATE.unpack_from(payload)[1]:
                self._started()
            else:
                self._stopped("SET_VRING_ENABLE 0")
        elif req == SET_STATUS and len(payload) >= 8:
            # QEMU 11.1's vhost-user-base sends only FEATURES_OK here (its vq_index_end
            # is 0, so vhost_user_dev_start skips DRIVER_OK and 0): the rings' enable
            # is what marks start and stop; a DRIVER_OK or a 0 is taken all the same
            self.status = U64.unpack_from(payload)[0]
            if self.status & DRIVER_OK:
                self._started()
            elif self.status == 0:
                self._stopped("SET_STATUS 0")
        elif req in (RESET_OWNER, RESET_DEVICE):
            self.status = 0
            self._stopped(NAMES[req])
        if flags & NEED_REPLY and not answered:
            self._reply(conn, req, U64.pack(0))
        return fds[:1] if keep_fd else []

    def _started(self):
        with self.cond:
            if self.started:
                return
            self.started = True
            self.epoch += 1
            self.counts["starts"] += 1
            again = self.want_mapped and not self.mapped
            self.cond.notify_all()
        self.log("vhost-user: the device started (its rings enabled)")
        if again:
            # not from this thread: QEMU answers our MAP only after this request's reply
            def remap():
                try:
                    if self._map(restart=True):
                        self.counts["remaps_after_restart"] += 1
                except VhostUserError as e:
                    self.log(f"vhost-user: map after restart failed: {e}")
            threading.Thread(target=remap, daemon=True).start()

    def _stopped(self, why):
        with self.cond:
            if self.started:
                self.counts["stops"] += 1
                self.epoch += 1
                self.log(f"vhost-user: the device stopped ({why}); its mappings are gone")
            self.started = self.mapped = False
            self.cond.notify_all()

    # --- the back-end channel: our requests ------------------------------------------------
    def wait_started(self, timeout):
        deadline = time.monotonic() + timeout
        with self.cond:
            while not self.started:
                if self.disconnected:
                    raise VhostUserError("QEMU closed the vhost-user connection (its log says why)")
                left = deadline - time.monotonic()
                if left <= 0 or self.closed:
                    raise VhostUserError(
                        f"the guest did not start the device within {timeout:.0f}s "
                        f"(QEMU crashes on a mapping sent to a device that is not started)")
                self.cond.wait(left)

    def _request(self, req, body, fd=None, timeout=10.0):
        """One back-end request with NEED_REPLY; QEMU's u64 answer (0 = done). Called with
        self.channel held."""
        s = self.backend_sock
        if s is None:
            raise VhostUserError("QEMU gave no back-end channel (SET_BACKEND_REQ_FD)")
        msg = HDR.pack(req, VERSION | NEED_REPLY, len(body)) + body
        fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))] if fd is not None else []
        s.settimeout(timeout)
        try:
            s.sendmsg([msg], fds)
            got = read_message(s)
        except (OSError, VhostUserError) as e:
            # a late answer must never be taken for the next request's: the channel is done
            with self.lock:
                if self.backend_sock is s:    # not a newer one QEMU gave meanwhile
                    self.backend_sock = None
            _shut(s)
            if isinstance(e, socket.timeout):
                raise VhostUserError(f"QEMU did not answer {('SHMEM_MAP', 'SHMEM_UNMAP')[req - 9]} "
                                     f"within {timeout:.0f}s (back-end channel closed)")
            raise VhostUserError(f"back-end channel: {e}")
        if got is None:
            raise VhostUserError("QEMU closed the back-end channel")
        rreq, rflags, payload, rfds = got
        for f in rfds:
            os.close(f)
        if rreq != req or not rflags & REPLY or len(payload) < 8:
            raise VhostUserError(f"unexpected answer to request {req}: request {rreq} flags {rflags:#x}")
        return U64.unpack_from(payload)[0]

    def map(self, length=None):
        """Map the whole buffer at offset 0 of the region (read-write). Refused when QEMU
        answers with an error (its reason is in QEMU's log); VhostUserError when the
        device is not started or the channel failed. ``length``: another length than the
        buffer's (a negative control)."""
        self._map(length=length)

    def _map(self, length=None, restart=False) -> bool:
        """True when a MAP was sent and taken. ``restart``: the map a start owes a mapping
        that a stop dropped, and only if it is still wanted then."""
        with self.channel:
            with self.lock:
                if restart and not self.want_mapped:
                    return False       # an unmap came first: the VMM wants it gone
                self.want_mapped = True
                if not self.started:
                    raise VhostUserError("the device is not started: a mapping now would crash QEMU")
                if self.mapped:
                    return False
                epoch = self.epoch
            n = length or self.size
            rc = self._request(BACKEND_SHMEM_MAP, MMAP.pack(SHMID, 0, 0, n, MAP_RW), fd=self.fd)
            with self.lock:
                if rc != 0:
                    self.counts["map_failures"] += 1
                    raise Refused(f"QEMU refused SHMEM_MAP of {n} bytes (answer {rc}; "
                                  f"its reason is in the guest's qemu.log)")
                # a stop (and maybe a start) that came meanwhile dropped it already
                self.mapped = self.started and self.epoch == epoch
                self.counts["maps"] += 1
                return True

    def unmap(self):
        with self.channel:
            with self.lock:
                self.want_mapped = False
                if not self.mapped or not self.started:   # a stop dropped it already
                    self.mapped = False
                    return
            rc = self._request(BACKEND_SHMEM_UNMAP, MMAP.pack(SHMID, 0, 0, self.size, 0))
            with self.lock:
                self.mapped = False
                if rc != 0:
                    raise Refused(f"QEMU refused SHMEM_UNMAP (answer {rc})")
                self.counts["unmaps"] += 1

    def state(self):
        with self.lock:
            return {"started": self.started, "mapped": self.mapped, "status": self.status,
                    "connected": self.conn is not None and not self.disconnected,
                    "region_bytes": self.size,
                    "counts": dict(self.counts), "last_messages": [m for _, m in self.messages[-12:]]}

    def close(self):
        self.closed = True
        for s in (self.sock, self.conn, self.backend_sock):
            if s is not None:
                _shut(s)
        with self.cond:
            self.cond.notify_all()
        remove_if_ours(self.path, self.ino)


def listen_private(path, backlog):
    """(a listening unix socket at ``path``, mode 0600 from its creation, its inode). A
    stale socket file there is replaced."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    old = os.umask(0o177)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(backlog)
    return sock, os.stat(path).st_ino


def remove_if_ours(path, ino) -> None:
    """Remove the socket file we made, never a later one another server put there."""
    try:
        if os.stat(path).st_ino == ino:
            os.unlink(path)
    except FileNotFoundError:
        pass


def _shut(s) -> None:
    """Shut a socket down before closing it: a thread blocked in recv on it wakes up, and
    never reads from a reused fd number."""
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()
