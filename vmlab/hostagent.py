#!/usr/bin/env python3
"""vmlab host agent: runs ON THE LAB HOST, stdlib only (shipped with stamp.py and
exporter_uapi.py through the lab's read-only share).

    hostagent.py relay SOCKET   pipe stdin/stdout to a unix socket (QMP of a lab-side QEMU)
    hostagent.py serve          JSON lines on stdin/stdout: one request, one response

It owns the buffers of a run: creates them (vmlab exporter, udmabuf, dma-heap), hands
their fd to the guest's QEMU as an ivshmem-doorbell server, moves them on command and
reports what the exporter and the lab kernel say. It lives exactly as long as the
controller's channel: EOF on stdin closes every buffer and socket it made.
"""
import errno
import fcntl
import json
import mmap
import os
import random
import select
import socket
import struct
import sys
import threading
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    import stamp  # shipped beside this file in the lab
    import exporter_uapi as U
except ImportError:  # running from the source tree (unit tests)
    from vmlab import stamp
    from vmlab import exporter_uapi as U

EXPORTER_DEV = "/dev/vmlab-exporter"
PAGE = 4096


def relay(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    fin, fout = sys.stdin.buffer.fileno(), sys.stdout.buffer.fileno()
    while True:
        r, _, _ = select.select([fin, s], [], [])
        if fin in r:
            data = os.read(fin, 65536)
            if not data:
                return 0
            s.sendall(data)
        if s in r:
            data = s.recv(65536)
            if not data:
                return 0
            os.write(fout, data)


class AgentError(Exception):
    def __init__(self, msg, err=None):
        super().__init__(msg)
        self.errno = err


def _ioctl(fd, req, buf):
    try:
        return fcntl.ioctl(fd, req, buf)
    except OSError as e:
        raise AgentError(f"ioctl {req:#x}: {os.strerror(e.errno)}", e.errno)


class Buffer:
    """One exported buffer and the fd the agent holds for it."""
    kind = "?"
    movable = False

    def __init__(self, size):
        self.size = size
        self.fd = -1
        self.generation = 1
        self.id = 0

    def info(self, pfns=False):
        return {"kind": self.kind, "size": self.size, "id": self.id, "generation": self.generation}

    def move(self, mode, caching):
        raise AgentError(f"{self.kind} buffers cannot be moved: the exporter has no move "
                         f"operation (reported as unsupported, not faked)", errno.EOPNOTSUPP)

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class VmlabBuffer(Buffer):
    kind = "vmlab"
    movable = True

    def __init__(self, ctl, size, caching, alloc):
        super().__init__(size)
        self.ctl = ctl
        req = bytearray(U.CREATE.pack(size, U.CACHING[caching], U.ALLOC[alloc], U.CREATE_CLOEXEC, -1, 0))
        _ioctl(ctl, U.IOC_CREATE, req)
        _, _, _, _, self.fd, self.id = U.CREATE.unpack(req)

    def info(self, pfns=False):
        n = self.size // PAGE
        arr = bytearray(8 * n) if pfns else None
        addr = 0
        if pfns:
            import ctypes
            cbuf = (ctypes.c_char * len(arr)).from_buffer(arr)
            addr = ctypes.addressof(cbuf)
        req = bytearray(U.INFO.pack(self.id, addr, n if pfns else 0, 0, 0, 0, 0, *([0] * 10)))
        _ioctl(self.ctl, U.IOC_INFO, req)
        vals = U.INFO.unpack(req)
        out = {"kind": self.kind, "id": self.id, "pages": vals[2],
               "caching": {v: k for k, v in U.CACHING.items()}.get(vals[4], vals[4]),
               "vm_prot": {v: k for k, v in U.VM_PROT.items()}.get(vals[5], vals[5]),
               "alloc": {v: k for k, v in U.ALLOC.items()}.get(vals[6], vals[6])}
        out.update(zip(U.INFO_FIELDS, vals[7:]))
        self.generation = out["generation"]
        if pfns:
            out["pfns"] = list(struct.unpack(f"<{n}Q", arr))
        return out

    def move(self, mode, caching):
        cach = U.CACHING_KEEP if caching in (None, "KEEP") else U.CACHING[caching]
        req = bytearray(U.MOVE_S.pack(self.id, U.MOVE[mode], cach, 0, 0, 0))
        _ioctl(self.ctl, U.IOC_MOVE, req)
        self.generation = U.MOVE_S.unpack(req)[5]
        return {"generation": self.generation, "what": f"{mode} done by the exporter"}

    def release_quarantine(self):
        req = bytearray(U.RELEASE.pack(self.id, 0))
        _ioctl(self.ctl, U.IOC_RELEASE_QUARANTINE, req)
        return {"freed_pages": U.RELEASE.unpack(req)[1]}


class UdmabufBuffer(Buffer):
    """udmabuf over a sealed memfd. Its "move" punches a hole in the memfd and rewrites
    the page contents with generation+1; what a mapping then sees is reported, not assumed
    (udmabuf pins the memfd's folios at create time)."""
    kind = "udmabuf"
    movable = True

    def __init__(self, size):
        super().__init__(size)
        self.id = 0x55444D41  # "UDMA": any stable id, stamped by us
        self.memfd = os.memfd_create("vmlab-udmabuf", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, size)
        fcntl.fcntl(self.memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        self._stamp_memfd()
        dev = os.open("/dev/udmabuf", os.O_RDWR | os.O_CLOEXEC)
        try:
            req = bytearray(U.UDMABUF_CREATE_S.pack(self.memfd, 0x01, 0, size))
            try:
                self.fd = fcntl.ioctl(dev, U.UDMABUF_CREATE, req)
            except OSError as e:
                raise AgentError(f"UDMABUF_CREATE: {os.strerror(e.errno)}", e.errno)
        finally:
            os.close(dev)

    def _stamp_memfd(self):
        for i in range(self.size // PAGE):
            os.pwrite(self.memfd, stamp.stamp_page(self.id, self.generation, i)[:stamp.GUEST_OFF], i * PAGE)

    def move(self, mode, caching):
        if mode != "MIGRATE":
            raise AgentError(f"udmabuf supports only MIGRATE (punch hole + rewrite), not {mode}",
                             errno.EOPNOTSUPP)
        FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.fallocate(self.memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                          ctypes.c_long(0), ctypes.c_long(self.size)) != 0:
            raise AgentError("fallocate(PUNCH_HOLE): " + os.strerror(ctypes.get_errno()), ctypes.get_errno())
        self.generation += 1
        self._stamp_memfd()
        return {"generation": self.generation,
                "what": "punched a hole in the memfd and rewrote it with generation+1"}

    def close(self):
        super().close()
        os.close(self.memfd)


class DmaHeapBuffer(Buffer):
    kind = "dmaheap"

    def __init__(self, size, heap="system"):
        super().__init__(size)
        self.id = 0x48454150  # "HEAP"
        dev = os.open(f"/dev/dma_heap/{heap}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            req = bytearray(U.DMA_HEAP_ALLOC_S.pack(size, 0, os.O_RDWR | os.O_CLOEXEC, 0))
            _ioctl(dev, U.DMA_HEAP_IOCTL_ALLOC, req)
            self.fd = U.DMA_HEAP_ALLOC_S.unpack(req)[1]
        finally:
            os.close(dev)
        with mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
            for i in range(size // PAGE):
                m[i * PAGE:i * PAGE + stamp.GUEST_OFF] = stamp.stamp_page(self.id, 1, i)[:stamp.GUEST_OFF]


class IvshmemServer:
    """The ivshmem-doorbell server side for one buffer: each client (a guest QEMU) gets,
    as little-endian int64 messages, protocol version 0, its peer id, then -1 carrying
    the buffer's fd (SCM_RIGHTS), which QEMU maps as BAR2."""

    def __init__(self, path, fd):
        self.path, self.fd = path, fd
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        old = os.umask(0o177)
        try:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.bind(path)
        finally:
            os.umask(old)
        self.sock.listen(4)
        self.clients = []
        self.next_id = 1
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            try:
                c.sendall(struct.pack("<q", 0))
                c.sendall(struct.pack("<q", self.next_id))
                c.sendmsg([struct.pack("<q", -1)],
                          [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", self.fd))])
                self.next_id += 1
                self.clients.append(c)  # keep open: closing would tell QEMU the server left
            except OSError as e:
                log(f"ivshmem client failed: {e}")
                c.close()

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        except OSError:
            pass
        self.sock.close()
        for c in self.clients:
            c.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def log(msg):
    sys.stderr.write(f"{time.strftime('%H:%M:%S')} hostagent: {msg}\n")
    sys.stderr.flush()


def read_stamps(fd, size, first=0, count=None, full=False, kept=None):
    """Read every page's header through ``kept`` or a fresh mapping of the buffer."""
    n = size // PAGE
    count = n - first if count is None else count
    recs = []
    import contextlib
    ctx = contextlib.nullcontext(kept) if kept is not None else mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
    with ctx as m:
        for i in range(first, first + count):
            page = m[i * PAGE:(i + 1) * PAGE] if full else m[i * PAGE:i * PAGE + stamp.GUEST_OFF + 8]
            if full:
                s = stamp.parse_page(page)
                status = "ok" if s.valid else ("bad_magic" if not s.magic_ok else "bad_csum")
            else:
                hdr = struct.unpack_from("<IHHQQQI", page)
                s = None
                status = "ok" if hdr[0] == stamp.MAGIC else "bad_magic"
            if s is None:
                magic, ver, state, bid, gen, idx, csum = hdr
                tag = struct.unpack_from("<Q", page, stamp.GUEST_OFF)[0]
            else:
                state, bid, gen, idx, tag = s.state, s.buffer_id, s.generation, s.index, s.tag
            recs.append([i, status, bid, gen, idx, state, tag])
    return recs


def mmap_address(m):
    """The address of an mmap object's mapping (for VMLAB_IOC_PTE), via the buffer protocol."""
    import ctypes

    class Py_buffer(ctypes.Structure):
        _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.py_object), ("len", ctypes.c_ssize_t),
                    ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                    ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                    ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]
    pb = Py_buffer()
    if ctypes.pythonapi.PyObject_GetBuffer(ctypes.py_object(m), ctypes.byref(pb), 0) != 0:
        raise AgentError("cannot get the mapping address", errno.EINVAL)
    addr = pb.buf
    ctypes.pythonapi.PyBuffer_Release(ctypes.byref(pb))
    return addr


def pat_memtype_list():
    try:
        with open("/sys/kernel/debug/x86/pat_memtype_list") as f:
            return [ln.rstrip() for ln in f if ln.startswith("PAT:")]
    except OSError as e:
        return [f"unavailable: {e}"]


def module_pages():
    try:
        with open("/sys/kernel/debug/vmlab-exporter/pages") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def meminfo():
    out = {}
    with open("/proc/meminfo") as f:
        for ln in f:
            k, v = ln.split(":", 1)
            if k in ("MemFree", "MemAvailable"):
                out[k] = int(v.split()[0])
    out["module_pages"] = module_pages()
    return out


def dmesg_bad_lines():
    import subprocess
    out = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
    bad = [ln for ln in out.splitlines()
           if any(w in ln for w in ("WARNING:", "BUG:", "Oops", "general protection", "Call Trace",
                                    "KASAN", "UBSAN", "kernel BUG"))]
    return bad


def fuzz(ctl, count, seed):
    """Random ioctls on the control device: random commands (ours and others), random
    struct contents, random and bad pointers. Returns errno counts; the kernel log is the
    verdict (checked by the caller)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
    rnd = random.Random(seed)
    cmds = [U.IOC_ABI, U.IOC_CREATE, U.IOC_INFO, U.IOC_MOVE, U.IOC_RELEASE_QUARANTINE, U.IOC_PTE]
    results = {}
    fds = []
    buf = ctypes.create_string_buffer(256)
    interesting = [0, 1, 2, 3, 4095, 4096, 8192, 1 << 20, (1 << 20) + 1, 3 << 20, 1 << 40,
                   (1 << 64) - 1, (1 << 63), 0xFFFFFFFF, 0x80000000]
    for i in range(count):
        r = rnd.random()
        if r < 0.7:
            cmd = rnd.choice(cmds)
        elif r < 0.85:
            cmd = (rnd.choice(cmds) & ~(0x3FFF << 16)) | (rnd.randrange(0, 0x3FFF) << 16)
        else:
            cmd = rnd.getrandbits(32)
        for off in range(0, 128, 8):
            v = rnd.choice(interesting) if rnd.random() < 0.5 else rnd.getrandbits(64)
            if rnd.random() < 0.3:
                v = rnd.randrange(0, 5)
            struct.pack_into("<Q", buf, off, v)
        if cmd in (U.IOC_CREATE,) and rnd.random() < 0.5:
            struct.pack_into("<QIII", buf, 0, rnd.choice([4096, 8192, 65536, 1 << 20]),
                             rnd.randrange(0, 4), rnd.randrange(0, 4), rnd.randrange(0, 3))
        if cmd in (U.IOC_INFO, U.IOC_MOVE, U.IOC_RELEASE_QUARANTINE) and rnd.random() < 0.5:
            struct.pack_into("<Q", buf, 0, rnd.randrange(0, 64))
            if cmd == U.IOC_MOVE:
                struct.pack_into("<II", buf, 8, rnd.randrange(0, 5), rnd.choice([0, 1, 2, 3, U.CACHING_KEEP]))
            if cmd == U.IOC_INFO and rnd.random() < 0.5:
                struct.pack_into("<QQ", buf, 8, rnd.choice([0, 1, 0xdead0000, (1 << 63)]), rnd.randrange(0, 1 << 20))
        ptr = ctypes.addressof(buf) if rnd.random() < 0.9 else rnd.choice([0, 1, 0xdead000, (1 << 47) - 8, (1 << 64) - 4096])
        rc = libc.ioctl(ctl, cmd, ptr)
        e = 0 if rc >= 0 else ctypes.get_errno()
        name = errno.errorcode.get(e, str(e)) if e else "ok"
        results[name] = results.get(name, 0) + 1
        if rc >= 0 and cmd == U.IOC_CREATE:
            fd = struct.unpack_from("<i", buf, 20)[0]
            if fd > 2:
                fds.append(fd)
        if len(fds) > 8:
            try:
                os.close(fds.pop(0))
            except OSError:
                pass
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    return results


class Agent:
    def __init__(self):
        self.ctl = None
        self.buffers = {}
        self.servers = {}
        self.maps = {}
        self.next = 1

    def control(self):
        if self.ctl is None:
            try:
                self.ctl = os.open(EXPORTER_DEV, os.O_RDWR | os.O_CLOEXEC)
            except OSError as e:
                raise AgentError(f"{EXPORTER_DEV}: {os.strerror(e.errno)} (is vmlab_exporter loaded?)", e.errno)
        return self.ctl

    def buf(self, req):
        try:
            return self.buffers[req["buf"]]
        except KeyError:
            raise AgentError(f"no buffer {req.get('buf')!r}", errno.ENOENT)

    # --- ops: each returns a dict merged into {"ok": true}
    def op_hello(self, req):
        return {"pid": os.getpid(), "kernel": os.uname().release,
                "exporter": os.path.exists(EXPORTER_DEV), "udmabuf": os.path.exists("/dev/udmabuf"),
                "dma_heaps": sorted(os.listdir("/dev/dma_heap")) if os.path.isdir("/dev/dma_heap") else []}

    def op_abi(self, req):
        b = bytearray(U.ABI.size)
        _ioctl(self.control(), U.IOC_ABI, b)
        v = U.ABI.unpack(b)
        return {"abi_version": v[0], "page_size": v[1], "max_buffer_bytes": v[2],
                "sizes": dict(zip(("create", "info", "move", "release", "pte", "abi"), v[3:]))}

    def op_create(self, req):
        kind, size = req.get("kind", "vmlab"), int(req["size"])
        if kind == "vmlab":
            b = VmlabBuffer(self.control(), size, req.get("caching", "WB"), req.get("alloc", "ORDER0"))
        elif kind == "udmabuf":
            b = UdmabufBuffer(size)
        elif kind == "dmaheap":
            b = DmaHeapBuffer(size, req.get("heap", "system"))
        else:
            raise AgentError(f"unknown exporter kind {kind!r}", errno.EINVAL)
        h = self.next
        self.next += 1
        self.buffers[h] = b
        log(f"created {kind} buffer {h}: size {size} id {b.id:#x}")
        return {"buf": h, "id": b.id, "size": size, "kind": kind, "movable": b.movable}

    def op_info(self, req):
        return self.buf(req).info(pfns=bool(req.get("pfns")))

    def op_serve_ivshmem(self, req):
        b = self.buf(req)
        path = req["socket"]
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        self.servers[req["buf"]] = IvshmemServer(path, b.fd)
        return {"socket": path}

    def op_move(self, req):
        b = self.buf(req)
        t0 = time.monotonic_ns()
        out = b.move(req["mode"], req.get("caching"))
        out["t_start_ns"], out["t_end_ns"] = t0, time.monotonic_ns()
        return out

    def op_host_map(self, req):
        """Keep a host mapping of the buffer open (as a VMM would) until host_unmap."""
        b = self.buf(req)
        self.maps[req["buf"]] = mmap.mmap(b.fd, b.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        return {}

    def op_host_unmap(self, req):
        m = self.maps.pop(req["buf"], None)
        if m is not None:
            m.close()
        return {}

    def op_host_read(self, req):
        """Stamps as a host process sees them: through the kept mapping if there is one
        (what a stale mapping shows), else through a fresh one."""
        b = self.buf(req)
        recs = read_stamps(b.fd, b.size, req.get("first", 0), req.get("count"), req.get("full", False),
                           self.maps.get(req["buf"]))
        return {"records": recs}

    def op_host_pte(self, req):
        b = self.buf(req)
        if not isinstance(b, VmlabBuffer):
            raise AgentError("host_pte needs a vmlab exporter buffer", errno.EINVAL)
        with mmap.mmap(b.fd, b.size, mmap.MAP_SHARED, mmap.PROT_READ) as m:
            page = int(req.get("page", 0))
            _ = m[page * PAGE]  # fault it in through the exporter
            addr = mmap_address(m) + page * PAGE
            q = bytearray(U.PTE.pack(addr, 0, 0, 0, 0, 0, 0))
            _ioctl(self.control(), U.IOC_PTE, q)
            _, _, memtype, pfn, pte, pat, page_mt = U.PTE.unpack(q)
        return {"memtype": U.MEMTYPE.get(memtype, str(memtype)), "pfn": pfn, "pte": hex(pte),
                "pat_msr": hex(pat), "page_memtype": U.MEMTYPE.get(page_mt & 0xFFFFFFFF, str(page_mt))}

    def op_release_quarantine(self, req):
        b = self.buf(req)
        if not isinstance(b, VmlabBuffer):
            raise AgentError("only vmlab buffers have a quarantine", errno.EINVAL)
        return b.release_quarantine()

    def op_close(self, req):
        self.op_host_unmap(req)
        b = self.buffers.pop(req["buf"], None)
        srv = self.servers.pop(req["buf"], None)
        if srv:
            srv.close()
        if b:
            b.close()
        return {}

    def op_pat(self, req):
        return {"lines": pat_memtype_list()}

    def op_meminfo(self, req):
        return meminfo()

    def op_dmesg_bad(self, req):
        return {"lines": dmesg_bad_lines()}

    def op_fuzz(self, req):
        return {"errnos": fuzz(self.control(), int(req.get("count", 10000)), int(req.get("seed", 1)))}

    def op_raw(self, req):
        """One ioctl with caller-chosen struct fields and pointer (negative tests):
        {"cmd": "CREATE"|"INFO"|"MOVE"|"RELEASE_QUARANTINE"|"PTE"|"ABI", "fields": [...],
         "ptr": null (a valid buffer) or an integer address}. Returns rc, errname, fields out."""
        import ctypes
        st = {"CREATE": U.CREATE, "INFO": U.INFO, "MOVE": U.MOVE_S, "RELEASE_QUARANTINE": U.RELEASE,
              "PTE": U.PTE, "ABI": U.ABI}[req["cmd"]]
        cmd = getattr(U, "IOC_" + req["cmd"])
        buf = ctypes.create_string_buffer(st.size)
        if req.get("fields"):
            st.pack_into(buf, 0, *req["fields"])
        libc = ctypes.CDLL(None, use_errno=True)
        libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
        ptr = req.get("ptr")
        rc = libc.ioctl(self.control(), cmd, ctypes.addressof(buf) if ptr is None else ptr)
        e = ctypes.get_errno() if rc < 0 else 0
        out = list(st.unpack_from(buf.raw))
        if rc >= 0 and req["cmd"] == "CREATE" and out[4] > 2:
            os.close(out[4])  # a negative test that unexpectedly succeeded must not leak
        return {"rc": rc, "errname": errno.errorcode.get(e, "") if e else "", "fields": out}

    def op_find_bytes(self, req):
        """Where a process's memory holds ``hex`` (e.g. what a guest wrote into a host-visible
        blob, looked up in the VMM): region, offset. Guest RAM (the memfd) is skipped."""
        pid, needle = int(req["pid"]), bytes.fromhex(req["hex"])
        skip = tuple(req.get("skip", ("vmlab-ram", "memory-backend-memfd")))
        hits = []
        with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
            for ln in maps:
                parts = ln.split()
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                name = parts[5] if len(parts) > 5 else ""
                if "r" not in parts[1] or any(k in name for k in skip) or hi - lo > (1 << 31):
                    continue
                try:
                    mem.seek(lo)
                    data = mem.read(hi - lo)
                except (OSError, ValueError, OverflowError):
                    continue
                off = data.find(needle)
                while off >= 0 and len(hits) < 8:
                    hits.append({"region": parts[0], "perms": parts[1], "name": name, "offset": off})
                    off = data.find(needle, off + 1)
        return {"hits": hits}

    def op_ping(self, req):
        return {}

    def close_all(self):
        for h in list(self.buffers):
            self.op_close({"buf": h})
        if self.ctl is not None:
            os.close(self.ctl)
            self.ctl = None


def serve():
    agent = Agent()
    log(f"serving (pid {os.getpid()})")
    out = sys.stdout
    try:
        for line in sys.stdin:
            line = line.strip()
            if not line:
                continue
            try:
                req = json.loads(line)
                fn = getattr(agent, "op_" + req.get("op", ""), None)
                if fn is None:
                    raise AgentError(f"unknown op {req.get('op')!r}", errno.EINVAL)
                resp = {"ok": True}
                resp.update(fn(req))
            except AgentError as e:
                resp = {"ok": False, "error": str(e), "errno": e.errno,
                        "errname": errno.errorcode.get(e.errno or 0, "")}
            except Exception as e:  # report, keep serving: the controller decides
                log(traceback.format_exc())
                resp = {"ok": False, "error": f"{type(e).__name__}: {e}", "errno": None}
            out.write(json.dumps(resp) + "\n")
            out.flush()
    finally:
        agent.close_all()
        log("stdin closed: buffers released, exiting")
    return 0


def main(argv):
    if len(argv) >= 3 and argv[1] == "relay":
        return relay(argv[2])
    if len(argv) >= 2 and argv[1] == "serve":
        return serve()
    print("usage: hostagent.py relay SOCKET | serve", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
