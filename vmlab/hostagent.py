#!/usr/bin/env python3
"""vmlab host agent: runs ON THE LAB HOST, stdlib only (shipped with stamp.py and
exporter_uapi.py through the lab's read-only share).

    hostagent.py serve          JSON lines on stdin/stdout: one request, one response
    hostagent.py zygote SOCK    fork one "serve" per vmlab-attach connection at SOCK

It owns the buffers of a run: creates them (vmlab exporter, udmabuf, dma-heap), hands
their fd to the guest's QEMU (as an ivshmem-doorbell server, or as a vhost-user back-end
that maps it into a VIRTIO shared memory region), moves them on command and
reports what the exporter and the lab kernel say. It lives exactly as long as the
controller's channel: EOF on stdin closes every buffer and socket it made.

Closing a vmlab buffer frees none of its pages: the module stamps its current pages
RETIRED and quarantines them under the buffer's id, next to the sets its MIGRATEs
retired, because a guest whose KVM missed a zap or munmap notifier may still reach them.
Whoever owns the buffer frees them with the "release_quarantine" op by "id" once the
guest's QEMU has exited ("close" returns the id).
"""
import base64
import errno
import fcntl
import json
import mmap
import os
import random
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
    import vhost_user
except ImportError:  # running from the source tree (unit tests)
    from vmlab import stamp
    from vmlab import exporter_uapi as U
    from vmlab import vhost_user

EXPORTER_DEV = "/dev/vmlab-exporter"
PAGE = 4096
FORKED_FROM = None   # the zygote's pid when this agent is its fork (hello says so)
KMSG_READ_SECONDS = 20           # a read of /dev/kmsg (op_kmsg, op_kernel_state since its mark)
KMSG_READ_BYTES = 16 << 20


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

    def move(self, mode, caching, pages=None):
        raise AgentError(f"{self.kind} buffers cannot be moved: the exporter has no move "
                         f"operation (reported as unsupported, not faked)", errno.EOPNOTSUPP)

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _name(table, value):
    return {v: k for k, v in table.items()}.get(value, value)


class VmlabBuffer(Buffer):
    """A buffer of the vmlab exporter, addressed by its dma-buf fd; ``id`` is the module's
    never-reused buffer id that the page stamps and the quarantine carry."""
    kind = "vmlab"
    movable = True

    def __init__(self, ctl, size, caching, alloc, ro_fault=False):
        super().__init__(size)
        self.ctl = ctl
        flags = U.CREATE_CLOEXEC | (U.CREATE_RO_FAULT if ro_fault else 0)
        req = U.pack(U.CREATE, U.CREATE_FIELDS, size=size, caching=U.CACHING[caching],
                     alloc=U.ALLOC[alloc], flags=flags, fd=-1)
        _ioctl(ctl, U.IOC_CREATE, req)
        out = U.unpack(U.CREATE, U.CREATE_FIELDS, req)
        self.fd, self.id = out["fd"], out["id"]

    def info(self, pfns=False):
        n = self.size // PAGE
        arr = bytearray(8 * n) if pfns else None
        addr = 0
        if pfns:
            import ctypes
            cbuf = (ctypes.c_char * len(arr)).from_buffer(arr)
            addr = ctypes.addressof(cbuf)
        req = U.pack(U.INFO, U.INFO_FIELDS, fd=self.fd, pfns_ptr=addr, pfns_count=n if pfns else 0)
        _ioctl(self.ctl, U.IOC_INFO, req)
        v = U.unpack(U.INFO, U.INFO_FIELDS, req)
        out = {"kind": self.kind, "id": v["id"], "pages": v["pfns_count"],
               "caching": _name(U.CACHING, v["caching"]), "vm_prot": _name(U.VM_PROT, v["vm_prot"]),
               "alloc": _name(U.ALLOC, v["alloc"])}
        out.update((k, v[k]) for k in U.INFO_OUT_U64)
        self.generation = out["generation"]
        if pfns:
            out["pfns"] = list(struct.unpack(f"<{n}Q", arr))
        return out

    def move(self, mode, caching, pages=None):
        """``pages``: None for the whole buffer, or {"first", "count"}: only that range moves."""
        cach = U.CACHING_KEEP if caching in (None, "KEEP") else U.CACHING[caching]
        first, count = (int(pages["first"]), int(pages["count"])) if pages else (0, 0)
        req = U.pack(U.MOVE_S, U.MOVE_FIELDS, fd=self.fd, mode=U.MOVE[mode], caching=cach,
                     first_page=first, page_count=count)
        _ioctl(self.ctl, U.IOC_MOVE, req)
        self.generation = U.unpack(U.MOVE_S, U.MOVE_FIELDS, req)["generation"]
        what = f"pages {first}..{first + count - 1}" if count else "the whole buffer"
        return {"generation": self.generation, "what": f"{mode} of {what} done by the exporter"}

    def release_quarantine(self, max_generation=0, force=False):
        return release_quarantine(self.ctl, self.id, max_generation, force)


def release_quarantine(ctl, buf_id, max_generation=0, force=False):
    """Free retired page sets of buffer ``buf_id`` (0: every buffer), open or closed, whose
    generation is <= max_generation (0: all). EBUSY while host PTEs may still map one of
    them, unless ``force`` (the module zaps the live buffer's mappings first)."""
    req = U.pack(U.RELEASE, U.RELEASE_FIELDS, id=int(buf_id), max_generation=int(max_generation),
                 flags=U.RELEASE_FORCE if force else 0)
    _ioctl(ctl, U.IOC_RELEASE_QUARANTINE, req)
    return {"id": int(buf_id), "freed_pages": U.unpack(U.RELEASE, U.RELEASE_FIELDS, req)["freed_pages"]}


class UdmabufBuffer(Buffer):
    """udmabuf over a sealed memfd. Its "move" punches a hole in the memfd and rewrites
    the page contents with generation+1; what a mapping then sees is reported, not assumed
    (udmabuf pins the memfd's folios at create time)."""
    kind = "udmabuf"
    movable = True

    HUGE = 2 << 20

    def __init__(self, size, backing="shmem"):
        super().__init__(size)
        self.id = 0x55444D41  # "UDMA": any stable id, stamped by us
        self.backing = backing
        flags = os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC
        if backing in ("hugetlb", "thp") and size % self.HUGE:
            raise AgentError(f"a {backing} memfd needs a multiple of 2 MiB, not {size} bytes", errno.EINVAL)
        if backing == "hugetlb":
            # 2 MiB pages: the buffer's, and as many again for the rewrite after a punch
            # (udmabuf keeps the old folios pinned)
            _reserve_hugepages(2 * size // self.HUGE)
            flags |= getattr(os, "MFD_HUGETLB", 4)
        elif backing == "thp":
            _shmem_thp_advise()
        self.memfd = os.memfd_create("vmlab-udmabuf", flags)
        try:
            os.ftruncate(self.memfd, size)
            fcntl.fcntl(self.memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
            self._stamp_memfd()
            dev = os.open("/dev/udmabuf", os.O_RDWR | os.O_CLOEXEC)
            try:
                req = bytearray(U.UDMABUF_CREATE_S.pack(self.memfd, 0x01, 0, size))
                try:
                    self.fd = fcntl.ioctl(dev, U.UDMABUF_CREATE, req)
                except OSError as e:
                    raise AgentError(f"UDMABUF_CREATE over a {backing} memfd: {os.strerror(e.errno)}",
                                     e.errno)
            finally:
                os.close(dev)
        except BaseException:
            os.close(self.memfd)
            raise

    def _stamp_memfd(self):
        if self.backing == "shmem":
            for i in range(self.size // PAGE):
                os.pwrite(self.memfd, stamp.stamp_page(self.id, self.generation, i)[:stamp.GUEST_OFF],
                          i * PAGE)
            return
        # hugetlbfs has no write(); a THP needs a PMD-aligned fault through a mapping that
        # asked for one (MADV_HUGEPAGE) before it was touched
        with mmap.mmap(self.memfd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
            if self.backing == "thp":
                m.madvise(mmap.MADV_HUGEPAGE)
            for i in range(self.size // PAGE):
                m[i * PAGE:i * PAGE + stamp.GUEST_OFF] = stamp.stamp_page(self.id, self.generation, i)[:stamp.GUEST_OFF]
        if self.backing == "thp" and _memfd_huge_pages(self.memfd) == 0:
            raise AgentError("the shmem memfd got no transparent huge page (shmem THP off, or "
                             "no 2 MiB block free): nothing to test", errno.ENOTSUP)

    def move(self, mode, caching, pages=None):
        if mode != "MIGRATE" or pages:
            raise AgentError(f"udmabuf supports only a whole MIGRATE (punch hole + rewrite), not {mode}"
                             f"{' of a page range' if pages else ''}",
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


def _reserve_hugepages(n):
    """At least ``n`` free 2 MiB hugetlb pages (raising vm.nr_hugepages in the lab)."""
    free = int(_read_first("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages") or 0)
    if free >= n:
        return
    total = int(_read_first("/proc/sys/vm/nr_hugepages") or 0)
    with open("/proc/sys/vm/nr_hugepages", "w") as f:
        f.write(str(total + n - free))
    ledger = os.environ.get("VMLAB_HUGEPAGES_LEDGER")
    raised = int(_read_first("/proc/sys/vm/nr_hugepages") or 0) - total
    if ledger and raised > 0:
        # on a box, the undo takes back what was raised, not more: someone else's change
        # to vm.nr_hugepages meanwhile stays
        with open(ledger, "a") as f:
            f.write(f"{raised}\n")
    free = int(_read_first("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages") or 0)
    if free < n:
        raise AgentError(f"only {free} free 2 MiB hugetlb pages of {n} wanted", errno.ENOMEM)


def _shmem_thp_advise():
    """Let shmem use a THP where the mapping asks (MADV_HUGEPAGE): the lab's own setting."""
    path = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"
    cur = _read_first(path) or ""
    if "[always]" in cur or "[advise]" in cur or "[force]" in cur:
        return
    try:
        with open(path, "w") as f:
            f.write("advise")
    except OSError as e:
        raise AgentError(f"{path}: {os.strerror(e.errno)}", errno.ENOTSUP)


def _memfd_huge_pages(fd):
    """How many PMD-mapped (huge) pages a fresh mapping of memfd ``fd`` gets: the THP test."""
    size = os.fstat(fd).st_size
    with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as m:
        m.madvise(mmap.MADV_HUGEPAGE)
        sum(m[i] for i in range(0, size, PAGE))        # fault it in
        with open("/proc/self/smaps") as f:
            text = f.read()
    kb, ours = 0, False
    for line in text.splitlines():
        head = line.split(None, 1)[0] if line else ""
        if "-" in head and ":" not in head:          # a mapping's header line
            ours = "/memfd:vmlab-udmabuf" in line
        elif ours and line.startswith(("ShmemPmdMapped:", "FilePmdMapped:")):
            kb = max(kb, int(line.split()[1]))
    return kb // 2048


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


def vgem_card():
    """/dev/dri/cardN of the vgem driver (GEM objects on shmem, no hardware), or None."""
    base = "/sys/class/drm"
    for name in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        if not name.startswith("card") or "-" in name:
            continue
        # vgem's device is a bare platform (or faux) device named vgem, bound to no driver
        if os.path.basename(os.path.realpath(f"{base}/{name}/device")) == "vgem":
            return f"/dev/dri/{name}"
    return None


class VgemBuffer(Buffer):
    """A vgem dumb buffer (drm_gem_shmem: shmem pages, mapped VM_PFNMAP by the GEM
    fault handler; read-only first and pfn_mkwrite on write since 7.1), exported with
    PRIME: a real DRM exporter's dma-buf. It cannot move."""
    kind = "vgem"

    def __init__(self, size):
        super().__init__(size)
        self.id = 0x5647454D  # "VGEM"
        card = vgem_card()
        if card is None:
            raise AgentError("no vgem DRM device (modprobe vgem)", errno.ENODEV)
        dev = os.open(card, os.O_RDWR | os.O_CLOEXEC)
        try:
            # 32 bpp x 1024 pixels = one 4 KiB row per page: the object is exactly size bytes
            req = bytearray(U.DRM_MODE_CREATE_DUMB_S.pack(size // PAGE, 1024, 32, 0, 0, 0, 0))
            _ioctl(dev, U.DRM_IOCTL_MODE_CREATE_DUMB, req)
            handle, _pitch, got = U.DRM_MODE_CREATE_DUMB_S.unpack(req)[4:]
            try:
                if got != size:
                    raise AgentError(f"vgem made a {got}-byte object for {size} bytes", errno.EINVAL)
                p = bytearray(U.DRM_PRIME_HANDLE_S.pack(handle, os.O_CLOEXEC | os.O_RDWR, -1))
                _ioctl(dev, U.DRM_IOCTL_PRIME_HANDLE_TO_FD, p)
                self.fd = U.DRM_PRIME_HANDLE_S.unpack(p)[2]
            finally:
                # the dma-buf holds the object now; the handle is not needed
                _ioctl(dev, U.DRM_IOCTL_GEM_CLOSE, bytearray(U.DRM_GEM_CLOSE_S.pack(handle, 0)))
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
        self.sock, self.ino = vhost_user.listen_private(path, 4)
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
        vhost_user.remove_if_ours(self.path, self.ino)


def _remove_dead_instances(root):
    """tracefs instances of agents that died without stopping theirs (SIGKILL, OOM)."""
    for name in os.listdir(f"{root}/instances"):
        pid = name[len("vmlab-"):] if name.startswith("vmlab-") else ""
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            try:
                with open(f"{root}/instances/{name}/events/enable", "w") as f:
                    f.write("0")
                os.rmdir(f"{root}/instances/{name}")
            except OSError as e:
                log(f"tracefs instance {name}: {e}")


def _read_first(path):
    try:
        with open(path) as f:
            return f.readline().strip()
    except OSError:
        return None


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


class AlignedMapping:
    """A shared read-write mapping of a buffer at a 2 MiB-aligned address, as a VMM that
    aligns its RAM blocks maps it: there the exporter may map whole 2 MiB blocks with one
    PMD. Sliced like an mmap object; ``addr`` is where it starts."""
    ALIGN = 2 << 20

    def __init__(self, fd, size):
        import ctypes
        libc = _libc()
        self._libc, self.size = libc, size
        res = libc.mmap(None, size + self.ALIGN, 0,  # PROT_NONE
                        mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x4000, -1, 0)  # MAP_NORESERVE
        if res in (None, ctypes.c_void_p(-1).value):
            raise AgentError("mmap reserve: " + os.strerror(ctypes.get_errno()), ctypes.get_errno())
        start = (res + self.ALIGN - 1) & ~(self.ALIGN - 1)
        if start > res:
            libc.munmap(res, start - res)
        libc.munmap(start + size, self.ALIGN - (start - res))
        got = libc.mmap(start, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | 0x10,
                        fd, 0)  # MAP_FIXED over our own reservation
        if got != start:
            err = ctypes.get_errno()
            libc.munmap(start, size)
            raise AgentError("mmap of the buffer: " + os.strerror(err), err)
        self.addr = start
        self._view = (ctypes.c_char * size).from_address(start)

    def __getitem__(self, sl):
        return self._view[sl]

    def __setitem__(self, sl, data):
        # one memmove (as mmap's slice assignment): an 8-byte tag is one store, never torn
        import ctypes
        start, stop, step = sl.indices(self.size)
        if step != 1 or stop - start != len(data):
            raise AgentError(f"write of {len(data)} bytes into [{start}:{stop}]", errno.EINVAL)
        ctypes.memmove(self.addr + start, bytes(data), len(data))

    def close(self):
        if self._view is not None:
            self._view = None
            self._libc.munmap(self.addr, self.size)


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


DEBUGFS = "/sys/kernel/debug/vmlab-exporter"


def _debugfs_int(name):
    try:
        with open(f"{DEBUGFS}/{name}") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def module_pages():
    """Pages the module holds (every buffer and the quarantine), from debugfs."""
    return _debugfs_int("pages")


def quarantine_state():
    """Module-wide quarantine from debugfs: one record per retired page set
    [buffer_id, generation, pages, still_mapped, caching], plus the module's counters."""
    sets = []
    try:
        with open(f"{DEBUGFS}/quarantine") as f:
            sets = [[int(x) for x in ln.split()] for ln in f if ln.strip()]
    except (OSError, ValueError):
        sets = None
    return {"sets": sets, "quarantined_pages": sum(r[2] for r in sets) if sets is not None else None,
            "module_pages": module_pages(), "leaked_pages": _debugfs_int("leaked")}


def retire_counters():
    """debugfs counters of the module's retirements (None where unreadable):
    close_freed_pages, closed buffers' pages freed at once because the quarantine was
    full; corrupt_retired_pages, pages whose stamp was not the module's own when retired
    (left untouched)."""
    return {"close_freed_pages": _debugfs_int("close_freed"),
            "corrupt_retired_pages": _debugfs_int("corrupt_retired")}


def meminfo():
    out = {}
    with open("/proc/meminfo") as f:
        for ln in f:
            k, v = ln.split(":", 1)
            if k in ("MemFree", "MemAvailable"):
                out[k] = int(v.split()[0])
    out["module_pages"] = module_pages()
    return out


def dmesg():
    """The kernel log; bounded well inside the controller's 60 s for a request (a late
    answer leaves the agent unusable for the run's teardown), a failing dmesg an error."""
    import subprocess
    r = subprocess.run(["dmesg"], capture_output=True, timeout=20)
    if r.returncode != 0:
        raise AgentError(f"dmesg exited {r.returncode}: "
                         f"{r.stderr.decode(errors='replace').strip()[-200:]}", errno.EIO)
    return r.stdout.decode(errors="replace")


def _reads(fd, size, counts=None, deadline=None, max_bytes=None):
    """Each read of the non-blocking ``fd`` until it has nothing more (EAGAIN or EOF):
    what trace_pipe and /dev/kmsg hold now, without waiting for more. A kmsg record
    overwritten while read (EPIPE) is skipped, the next one read, and counted in
    ``counts["overruns"]``; past ``deadline`` (monotonic) or ``max_bytes`` the reads stop
    with ``counts["truncated"]`` set."""
    counts = {} if counts is None else counts
    counts.setdefault("overruns", 0)
    counts.setdefault("truncated", False)
    n = 0
    while True:
        if (deadline is not None and time.monotonic() > deadline) or \
                (max_bytes is not None and n > max_bytes):
            counts["truncated"] = True
            return
        try:
            data = os.read(fd, size)
        except BlockingIOError:
            return
        except BrokenPipeError:
            counts["overruns"] += 1
            continue
        if not data:
            return
        n += len(data)
        yield data


def _drain(path, size):
    """_reads of ``path``, opened non-blocking for them."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        yield from _reads(fd, size)
    finally:
        os.close(fd)


def _kmsg_text(fd, deadline=None) -> tuple[str, dict]:
    """What the non-blocking /dev/kmsg reader ``fd`` holds now as "[seconds] message"
    lines (one record per read), bounded so that a kernel logging as fast as this reads
    (a printk storm) cannot hold the agent past the controller's timeout; and the counts
    (``overruns``, ``truncated``) of _reads."""
    counts: dict = {}
    recs = _reads(fd, 8192, counts, deadline or time.monotonic() + KMSG_READ_SECONDS, KMSG_READ_BYTES)
    return "".join(_kmsg_line(rec) + "\n" for rec in recs), counts


def _kmsg_line(rec: bytes) -> str:
    """One /dev/kmsg record ("prio,seq,usec,flags;text" and dictionary lines) as a
    "[seconds] text" line."""
    head, _, text = rec.decode(errors="replace").partition(";")
    fields = head.split(",")
    usec = int(fields[2]) if len(fields) > 2 and fields[2].isdigit() else 0
    return f"[{usec // 1000000:5d}.{usec % 1000000:06d}] {text.splitlines()[0] if text else ''}"


def dmesg_bad_lines():
    bad = [ln for ln in dmesg().splitlines()
           if any(w in ln for w in ("WARNING:", "BUG:", "Oops", "general protection", "Call Trace",
                                    "KASAN", "UBSAN", "kernel BUG"))]
    return bad


def _libc():
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
    libc.ioctl.restype = ctypes.c_int
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mmap.restype = ctypes.c_void_p
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.munmap.restype = ctypes.c_int
    return libc


class _Ioctls:
    """ioctl() through ctypes (the GIL is released while the kernel works, so threads
    really race), counting outcomes per errno name and per command."""
    NAMES = {U.IOC_ABI: "ABI", U.IOC_CREATE: "CREATE", U.IOC_INFO: "INFO", U.IOC_MOVE: "MOVE",
             U.IOC_RELEASE_QUARANTINE: "RELEASE_QUARANTINE", U.IOC_PTE: "PTE"}

    def __init__(self, ctl):
        import ctypes
        self.ctypes = ctypes
        self.libc = _libc()
        self.ctl = ctl
        self.lock = threading.Lock()
        self.errnos = {}
        self.per_cmd = {}
        self.total = 0

    def __call__(self, cmd, ptr):
        rc = self.libc.ioctl(self.ctl, cmd, ptr)
        e = self.ctypes.get_errno() if rc < 0 else 0
        name = errno.errorcode.get(e, str(e)) if e else "ok"
        op = self.NAMES.get(cmd, "other")
        with self.lock:
            self.total += 1
            self.errnos[name] = self.errnos.get(name, 0) + 1
            d = self.per_cmd.setdefault(op, {})
            d[name] = d.get(name, 0) + 1
        return rc, e


def _other_fds():
    """Fds that are not vmlab dma-bufs, for the fuzzers: another exporter's dma-buf when
    there is one (udmabuf, else a dma-heap), a pipe. Returns (fds to use, closers)."""
    fds, keep = [], []
    for make in (lambda: UdmabufBuffer(4 * PAGE), lambda: DmaHeapBuffer(4 * PAGE)):
        try:
            b = make()
        except (OSError, AgentError):
            continue
        fds.append(b.fd)
        keep.append(b.close)
        break
    r, w = os.pipe()
    fds.append(r)
    keep += [lambda: os.close(r), lambda: os.close(w)]
    return fds, keep


def _closed_fd():
    fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    os.close(fd)
    return fd


def _cleanup_fuzz(ctl, fds, ids, closers):
    """Close what a fuzzer made, free its buffers' quarantine by id (forced: nothing of
    theirs is mapped any more; closing retired each buffer's last pages into it too, so
    this runs after every close) and report the module's page counters for the caller's
    leak check."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    for c in closers:
        try:
            c()
        except OSError:
            pass
    freed, errs = 0, {}
    for i in sorted(ids):
        try:
            freed += release_quarantine(ctl, i, 0, True)["freed_pages"]
        except AgentError as e:
            errs[i] = errno.errorcode.get(e.errno or 0, str(e))
    out = {"released_pages": freed, "release_errors": errs}
    out.update(quarantine_state())
    out.update(retire_counters())
    out.pop("sets", None)
    return out


def fuzz(ctl, count, seed, seconds=600):
    """Random ioctls on the control device: random commands (ours and others), random
    struct contents, random and bad pointers, and as buffer fds: live vmlab dma-bufs,
    another exporter's dma-buf, non-dma-buf fds, closed fds and random numbers. One kept
    mapping is touched between ioctls so moves meet mapped pages. Bounded by ``count``
    ioctls and ``seconds``. Returns errno counts (summing to the ioctls done) and, after
    releasing everything it made, the module's page counters; the kernel log is the
    verdict (checked by the caller)."""
    import ctypes
    rnd = random.Random(seed)
    io = _Ioctls(ctl)
    libc = io.libc
    deadline = time.monotonic() + seconds
    cmds = [U.IOC_ABI, U.IOC_CREATE, U.IOC_INFO, U.IOC_MOVE, U.IOC_RELEASE_QUARANTINE, U.IOC_PTE]
    live = []           # [fd, size] of vmlab buffers this fuzzer created
    ids = set()
    closed = [_closed_fd()]
    others, closers = _other_fds()
    others.append(ctl)
    buf = ctypes.create_string_buffer(256)
    mapping = None      # (addr, size)
    interesting = [0, 1, 2, 3, 4095, 4096, 8192, 1 << 20, (1 << 20) + 1, 3 << 20, 1 << 40,
                   (1 << 64) - 1, (1 << 63), 0xFFFFFFFF, 0x80000000]

    def pick_fd():
        r = rnd.random()
        if r < 0.5 and live:
            return rnd.choice(live)[0]
        if r < 0.65:
            return rnd.choice(others)
        if r < 0.8:
            return rnd.choice(closed)
        return rnd.choice([-1, 0, 1023, 1 << 20, -(1 << 31), (1 << 31) - 1, rnd.getrandbits(31)])

    def touch():
        addr, size = mapping
        for _ in range(rnd.randrange(1, 4)):
            off = rnd.randrange(0, size // PAGE) * PAGE
            tmp = ctypes.create_string_buffer(8)
            ctypes.memmove(tmp, addr + off + rnd.randrange(0, PAGE - 8), 8)
            ctypes.memmove(addr + off + stamp.GUEST_OFF + 8 * rnd.randrange(1, 255), tmp, 8)

    done = 0
    while done < count and time.monotonic() < deadline:
        r = rnd.random()
        if r < 0.7:
            cmd = rnd.choice(cmds)
        elif r < 0.85:
            cmd = (rnd.choice(cmds) & ~(0x3FFF << 16)) | (rnd.randrange(0, 0x3FFF) << 16)
        else:
            cmd = rnd.getrandbits(32)
        for off in range(0, 160, 8):
            v = rnd.choice(interesting) if rnd.random() < 0.5 else rnd.getrandbits(64)
            if rnd.random() < 0.3:
                v = rnd.randrange(0, 5)
            struct.pack_into("<Q", buf, off, v)
        if cmd == U.IOC_CREATE and rnd.random() < 0.5:
            struct.pack_into("<QIII", buf, 0, rnd.choice([4096, 8192, 65536, 1 << 20]),
                             rnd.randrange(0, 4), rnd.randrange(0, 4), rnd.randrange(0, 3))
        if cmd in (U.IOC_INFO, U.IOC_MOVE) and rnd.random() < 0.8:
            struct.pack_into("<i", buf, 0, pick_fd())
            if rnd.random() < 0.7:
                struct.pack_into("<I", buf, 4, 0)       # INFO flags / MOVE mode
            if cmd == U.IOC_MOVE:
                struct.pack_into("<III", buf, 4, rnd.randrange(0, 5),
                                 rnd.choice([0, 1, 2, 3, U.CACHING_KEEP]), rnd.choice([0, 0, 0, 1]))
            if cmd == U.IOC_INFO:
                if rnd.random() < 0.7:
                    struct.pack_into("<I", buf, 44, 0)      # pad
                if rnd.random() < 0.5:
                    struct.pack_into("<QQ", buf, 8, rnd.choice([0, 0, 1, 0xdead0000, (1 << 63)]),
                                     rnd.randrange(0, 1 << 20))
        if cmd == U.IOC_RELEASE_QUARANTINE and rnd.random() < 0.8:
            bid = rnd.choice(sorted(ids) + [0, rnd.getrandbits(64)]) if ids else 0
            struct.pack_into("<QQII", buf, 0, bid, rnd.choice([0, 0, 1, 2, 3, rnd.getrandbits(64)]),
                             rnd.choice([0, 0, U.RELEASE_FORCE, rnd.getrandbits(32)]), rnd.choice([0, 0, 0, 1]))
        ptr = ctypes.addressof(buf) if rnd.random() < 0.9 else rnd.choice([0, 1, 0xdead000, (1 << 47) - 8, (1 << 64) - 4096])
        rc, _ = io(cmd, ptr)
        done += 1
        if rc >= 0 and cmd == U.IOC_CREATE and ptr == ctypes.addressof(buf):
            fd = struct.unpack_from("<i", buf, 20)[0]
            size, bid = struct.unpack_from("<Q", buf, 0)[0], struct.unpack_from("<Q", buf, 24)[0]
            ids.add(bid)    # its pages end in the quarantine under this id when closed
            if fd > 2:
                live.append([fd, size])
                if mapping is None and rnd.random() < 0.5:
                    addr = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
                    if addr not in (None, ctypes.c_void_p(-1).value):
                        mapping = (addr, size)
        if len(live) > 8:
            fd = live.pop(0)[0]
            os.close(fd)
            closed = (closed + [fd])[-4:]
        if mapping is not None:
            touch()
            if rnd.random() < 0.01:
                libc.munmap(*mapping)
                mapping = None
    if mapping is not None:
        libc.munmap(*mapping)
    out = {"errnos": io.errnos, "per_cmd": io.per_cmd, "ioctls": io.total,
           "seconds": round(seconds - (deadline - time.monotonic()), 1)}
    out.update(_cleanup_fuzz(ctl, [f for f, _ in live], ids, closers))
    return out


def fuzz_concurrent(ctl, count, seed, seconds=30, threads=4):
    """Races on purpose: movers (MOVE in every mode and caching, INFO), faulters (a kept
    mapping of a buffer, reads and writes of random pages, remapped now and then) and a
    churner (create, close, dup of buffer fds, RELEASE_QUARANTINE with and without FORCE),
    for at most ``count`` ioctls and ``seconds``. Returns errno counts per command, the
    number of ioctls and page touches, and, after releasing everything, the module's page
    counters (debugfs) for the caller's leak check."""
    import ctypes
    io = _Ioctls(ctl)
    libc = io.libc
    deadline = time.monotonic() + seconds
    lock = threading.Lock()
    pool = []               # [fd, size, id]: fds owned by the pool, closed only after removal
    ids = set()
    closed = [_closed_fd()]
    others, closers = _other_fds()
    stop = threading.Event()
    budget = [count]
    touches = [0]
    errors = []

    def take():
        with lock:
            if budget[0] <= 0 or time.monotonic() >= deadline:
                stop.set()
                return False
            budget[0] -= 1
            return True

    def pick(rnd):
        with lock:
            r = rnd.random()
            if pool and r < 0.85:
                return rnd.choice(pool)[0]
            if r < 0.95:
                return rnd.choice(others + closed)
            return rnd.getrandbits(16)

    def create(rnd):
        size = PAGE * rnd.choice([1, 2, 4, 16, 64])
        req = U.pack(U.CREATE, U.CREATE_FIELDS, size=size, caching=rnd.choice([0, 0, 1, 2]),
                     alloc=rnd.randrange(0, 3), flags=U.CREATE_CLOEXEC, fd=-1)
        cbuf = (ctypes.c_char * len(req)).from_buffer(req)
        rc, _ = io(U.IOC_CREATE, ctypes.addressof(cbuf))
        del cbuf
        if rc >= 0:
            out = U.unpack(U.CREATE, U.CREATE_FIELDS, req)
            with lock:
                pool.append([out["fd"], size, out["id"]])
                ids.add(out["id"])

    def ioctl_struct(cmd, st, names, **kw):
        req = U.pack(st, names, **kw)
        cbuf = (ctypes.c_char * len(req)).from_buffer(req)
        rc = io(cmd, ctypes.addressof(cbuf))
        del cbuf
        return rc

    def mover(rnd):
        while take():
            fd = pick(rnd)
            if rnd.random() < 0.2:
                ioctl_struct(U.IOC_INFO, U.INFO, U.INFO_FIELDS, fd=fd)
                continue
            mode = rnd.choice([1, 1, 2, 3, 4])
            cach = U.CACHING_KEEP if mode == 3 or rnd.random() < 0.5 else rnd.randrange(0, 3)
            ioctl_struct(U.IOC_MOVE, U.MOVE_S, U.MOVE_FIELDS, fd=fd, mode=mode, caching=cach)

    def faulter(rnd):
        m = None
        tmp = ctypes.create_string_buffer(8)
        while not stop.is_set() and time.monotonic() < deadline:
            if m is None or rnd.random() < 0.02:
                if m is not None:
                    libc.munmap(*m)
                    m = None
                with lock:    # dup under the lock: the pool's fd is open right now
                    if not pool:
                        mfd = None
                    else:
                        fd, size, _ = rnd.choice(pool)
                        mfd = os.dup(fd)
                if mfd is None:
                    time.sleep(0.01)
                    continue
                try:
                    addr = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, mfd, 0)
                finally:
                    os.close(mfd)     # the mapping holds the dma-buf
                if addr in (None, ctypes.c_void_p(-1).value):
                    continue
                m = (addr, size)
            addr, size = m
            off = rnd.randrange(0, size // PAGE) * PAGE
            ctypes.memmove(tmp, addr + off + rnd.randrange(0, PAGE - 8), 8)     # fault, GIL released
            ctypes.memmove(addr + off + stamp.GUEST_OFF + 8 * rnd.randrange(1, 255), tmp, 8)
            with lock:
                touches[0] += 1
        if m is not None:
            libc.munmap(*m)

    def churner(rnd):
        while take():
            r = rnd.random()
            if r < 0.3:
                with lock:
                    n = len(pool)
                if n < 8:
                    create(rnd)
                    continue
                r = 0.35
            if r < 0.5:
                with lock:
                    ent = pool.pop(rnd.randrange(len(pool))) if pool else None
                if ent:
                    os.close(ent[0])
                    with lock:
                        closed[:] = (closed + [ent[0]])[-4:]
            elif r < 0.65:
                with lock:
                    if pool:
                        fd, size, bid = rnd.choice(pool)
                        pool.append([os.dup(fd), size, bid])
            else:
                with lock:
                    bid = rnd.choice(sorted(ids) + [0]) if ids else 0
                ioctl_struct(U.IOC_RELEASE_QUARANTINE, U.RELEASE, U.RELEASE_FIELDS, id=bid,
                             max_generation=rnd.choice([0, 0, 1, 2, 5]),
                             flags=U.RELEASE_FORCE if rnd.random() < 0.5 else 0)

    def run(fn, i):
        try:
            fn(random.Random(seed * 1000 + i))
        except Exception:
            errors.append(traceback.format_exc())
            stop.set()

    rnd0 = random.Random(seed)
    for _ in range(3):
        create(rnd0)
    roles = [mover, faulter, churner, mover, faulter, mover]
    ts = [threading.Thread(target=run, args=(roles[i % len(roles)], i), daemon=True)
          for i in range(max(3, int(threads)))]
    t0 = time.monotonic()
    for t in ts:
        t.start()
    for t in ts:
        t.join(max(1.0, deadline - time.monotonic() + 60))
    stuck = sum(t.is_alive() for t in ts)
    stop.set()
    out = {"errnos": io.errnos, "per_cmd": io.per_cmd, "ioctls": io.total, "touches": touches[0],
           "threads": len(ts), "seconds": round(time.monotonic() - t0, 1), "stuck_threads": stuck,
           "thread_errors": errors}
    with lock:
        fds = [e[0] for e in pool]
        pool.clear()
    out.update(_cleanup_fuzz(ctl, fds, ids, closers))
    return out


class Agent:
    def __init__(self):
        self.ctl = None
        self.buffers = {}
        self.servers = {}
        self.maps = {}
        self.next = 1
        self.ktrace = None    # this agent's tracefs instance (op_ktrace_start)
        self.kmsg_mark = None  # a /dev/kmsg reader at the log's end (op_kernel_state)
        self.ktrace_overrun = 0   # its overruns at the last take (_ktrace_take)

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
        return {"pid": os.getpid(), "forked_from": FORKED_FROM, "kernel": os.uname().release,
                "env": {k: v for k, v in os.environ.items() if k.startswith("VMLAB_")},
                "exporter": os.path.exists(EXPORTER_DEV), "udmabuf": os.path.exists("/dev/udmabuf"),
                "dma_heaps": sorted(os.listdir("/dev/dma_heap")) if os.path.isdir("/dev/dma_heap") else [],
                "vgem": vgem_card()}

    def op_abi(self, req):
        b = bytearray(U.ABI.size)
        _ioctl(self.control(), U.IOC_ABI, b)
        v = U.unpack(U.ABI, U.ABI_FIELDS, b)
        return {"abi_version": v["abi_version"], "page_size": v["page_size"],
                "max_buffer_bytes": v["max_buffer_bytes"],
                "max_quarantine_bytes": v["max_quarantine_bytes"],
                "sizes": {k[len("sizeof_"):]: v[k] for k in U.ABI_FIELDS if k.startswith("sizeof_")}}

    def op_create(self, req):
        kind, size = req.get("kind", "vmlab"), int(req["size"])
        if kind == "vmlab":
            b = VmlabBuffer(self.control(), size, req.get("caching", "WB"), req.get("alloc", "ORDER0"),
                            ro_fault=req.get("fault") == "read-only-then-mkwrite")
        elif kind == "udmabuf":
            b = UdmabufBuffer(size, req.get("backing", "shmem"))
        elif kind == "dmaheap":
            b = DmaHeapBuffer(size, req.get("heap", "system"))
        elif kind == "vgem":
            b = VgemBuffer(size)
        else:
            raise AgentError(f"unknown exporter kind {kind!r}", errno.EINVAL)
        h = self.next
        self.next += 1
        self.buffers[h] = b
        log(f"created {kind} buffer {h}: size {size} id {b.id:#x}")
        return {"buf": h, "id": b.id, "size": size, "kind": kind, "movable": b.movable}

    def op_info(self, req):
        return self.buf(req).info(pfns=bool(req.get("pfns")))

    def _serve(self, req, make):
        """Hand buffer "buf" to the guest's QEMU through a server at "socket" (one per buffer)."""
        b = self.buf(req)
        if req["buf"] in self.servers:
            raise AgentError(f"buffer {req['buf']} is already served", errno.EEXIST)
        path = req["socket"]
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        self.servers[req["buf"]] = make(path, b)
        return {"socket": path}

    def op_serve_ivshmem(self, req):
        return self._serve(req, lambda path, b: IvshmemServer(path, b.fd))

    def op_serve_vhost_user(self, req):
        return self._serve(req, lambda path, b: vhost_user.Backend(path, b.fd, b.size, log=log))

    def backend(self, req):
        srv = self.servers.get(req["buf"])
        if not isinstance(srv, vhost_user.Backend):
            raise AgentError(f"buffer {req['buf']} has no vhost-user back-end", errno.EINVAL)
        return srv

    def op_vhost_map(self, req):
        """Map the buffer into the region once the guest has started the device (after
        at most "wait_s" seconds): the VMM's map of a host-visible blob."""
        srv = self.backend(req)
        t0 = time.monotonic()
        try:
            srv.wait_started(float(req.get("wait_s", 30)))
            srv.map()
        except vhost_user.VhostUserError as e:
            st = srv.state()
            raise AgentError(f"{e} (device status {st['status']:#x}; QEMU's last requests: "
                             f"{', '.join(st['last_messages']) or 'none'})", errno.EIO)
        return {"map_s": round(time.monotonic() - t0, 6), "state": srv.state()}

    def op_vhost_unmap(self, req):
        srv = self.backend(req)
        try:
            srv.unmap()
        except vhost_user.VhostUserError as e:
            raise AgentError(str(e), errno.EIO)
        return {"state": srv.state()}

    def op_vhost_state(self, req):
        return self.backend(req).state()

    def op_move(self, req):
        """The exporter's move. With "remap", the VMM's strategy around it: SHMEM_UNMAP
        before, SHMEM_MAP of the same fd after (KVM deletes and recreates the memslot). A
        map that QEMU refused comes back as "remap_error" with the move's result: a verdict
        for the controller, the buffer has moved either way. A channel that failed (a
        timeout, QEMU gone) is no verdict: the request fails."""
        b = self.buf(req)
        srv = self.backend(req) if req.get("remap") else None
        t0 = time.monotonic_ns()
        if srv is not None:
            try:
                srv.unmap()
            except vhost_user.VhostUserError as e:
                raise AgentError(f"SHMEM_UNMAP before the move: {e}", errno.EIO)
        t1 = time.monotonic_ns()
        try:
            out = b.move(req["mode"], req.get("caching"), req.get("pages"))
        except BaseException:
            if srv is not None:   # a refused move leaves the buffer where it was: map it back
                try:
                    srv.map()
                except vhost_user.VhostUserError as e:
                    log(f"map after a failed move: {e}")
            raise
        t2 = time.monotonic_ns()
        if srv is not None:
            try:
                # the negative control: a length past the region, which QEMU must refuse
                srv.map(length=2 * b.size if req.get("inject") == "refused-map" else None)
            except vhost_user.Refused as e:
                out["remap_error"] = str(e)
            except vhost_user.VhostUserError as e:
                raise AgentError(f"SHMEM_MAP after the move: {e}", errno.EIO)
            out["remap"] = {"unmap_ms": round((t1 - t0) / 1e6, 3), "move_ms": round((t2 - t1) / 1e6, 3),
                            "map_ms": round((time.monotonic_ns() - t2) / 1e6, 3),
                            "state": srv.state()}
        out["t_start_ns"], out["t_end_ns"] = t0, time.monotonic_ns()
        return out

    def op_vmm_mapping(self, req):
        """Where process ``pid`` (the guest's QEMU) maps the buffer: every VMA of the dma-buf's
        inode in /proc/PID/maps, with its start's alignment. KVM maps a 2 MiB nested entry
        only where the host address is 2 MiB-aligned like the guest physical address."""
        b = self.buf(req)
        st = os.fstat(b.fd)
        dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
        vmas = []
        with open(f"/proc/{int(req['pid'])}/maps") as f:
            for ln in f:
                parts = ln.split(None, 5)
                if len(parts) >= 5 and parts[3] == dev and int(parts[4]) == st.st_ino:
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    vmas.append({"start": hex(lo), "bytes": hi - lo, "offset": int(parts[2], 16),
                                 "start_align": lo & -lo, "aligned_2m": lo % (2 << 20) == 0})
        # for a file VMA the core calls ->huge_fault only as THP's sysfs setting allows
        return {"vmas": vmas, "thp_enabled": _read_first("/sys/kernel/mm/transparent_hugepage/enabled")}

    def op_host_map(self, req):
        """Keep a host mapping of the buffer open (as a VMM would) until host_unmap;
        ``align_2m``: at a 2 MiB-aligned address (AlignedMapping)."""
        b = self.buf(req)
        old = self.maps.pop(req["buf"], None)
        if old is not None:
            old.close()
        if req.get("align_2m"):
            m = AlignedMapping(b.fd, b.size)
            self.maps[req["buf"]] = m
            return {"addr": hex(m.addr)}
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

    def op_host_write(self, req):
        """Write bytes into a buffer as a host process would (a stale writer, for tests):
        {"buf", "offset", "hex"} through the kept mapping if there is one, else a fresh one."""
        b = self.buf(req)
        off, data = int(req["offset"]), bytes.fromhex(req["hex"])
        if not 0 <= off <= b.size - len(data):
            raise AgentError(f"{len(data)} bytes at {off} outside the buffer", errno.EINVAL)
        kept = self.maps.get(req["buf"])
        if kept is not None:
            kept[off:off + len(data)] = data
        else:
            with mmap.mmap(b.fd, b.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
                m[off:off + len(data)] = data
        return {}

    def op_host_pte(self, req):
        b = self.buf(req)
        if not isinstance(b, VmlabBuffer):
            raise AgentError("host_pte needs a vmlab exporter buffer", errno.EINVAL)
        with mmap.mmap(b.fd, b.size, mmap.MAP_SHARED, mmap.PROT_READ) as m:
            page = int(req.get("page", 0))
            _ = m[page * PAGE]  # fault it in through the exporter
            addr = mmap_address(m) + page * PAGE
            q = U.pack(U.PTE, U.PTE_FIELDS, addr=addr)
            _ioctl(self.control(), U.IOC_PTE, q)
            v = U.unpack(U.PTE, U.PTE_FIELDS, q)
        page_mt = v["page_memtype"]
        return {"memtype": U.MEMTYPE.get(v["memtype"], str(v["memtype"])), "pfn": v["pfn"],
                "pte": hex(v["pte"]), "pat_msr": hex(v["pat_msr"]),
                "page_memtype": U.MEMTYPE.get(page_mt & 0xFFFFFFFF, str(page_mt))}

    def op_move_under_writes(self, req):
        """MOVE while a host thread (as a VMM or a guest vCPU would) writes one page's guest
        area through its own mapping, each 8-byte slot exactly once (so no later write can
        hide a lost one), paced to straddle the move. Afterwards every slot the writer
        completed must hold its value in the pages the buffer now has. MIGRATE zaps before
        it copies: nothing is lost, however wide the exporter's move_window_ms; the old
        order (copy, then zap) loses the writes made inside the window, and
        MIGRATE_NO_ZAP loses every write after the copy (the negative control).
        {"buf", "mode", "caching", "page", "pace_us"} -> slots_written, slots_during_move,
        lost (slot numbers), lost_write, generation."""
        import ctypes
        b = self.buf(req)
        if not isinstance(b, VmlabBuffer):
            raise AgentError("move_under_writes needs a vmlab exporter buffer", errno.EINVAL)
        page = int(req.get("page", 0))
        if not 0 <= page < b.size // PAGE:
            raise AgentError(f"page {page} outside the buffer", errno.EINVAL)
        base = page * PAGE + stamp.GUEST_OFF + 8   # slot 0 (GUEST_OFF) is the guest agent's tag
        nslots = (PAGE - stamp.GUEST_OFF - 8) // 8
        pace = float(req.get("pace_us", 200)) / 1e6
        if not 0 <= pace <= 0.1:
            raise AgentError(f"pace_us {req.get('pace_us')!r}: want 0 to 100000", errno.EINVAL)
        if req.get("mode") not in U.MOVE:
            raise AgentError(f"mode {req.get('mode')!r}: not a move mode", errno.EINVAL)
        if req.get("caching") not in (None, "KEEP") and req["caching"] not in U.CACHING:
            raise AgentError(f"caching {req['caching']!r}: not a caching", errno.EINVAL)
        cach = U.CACHING_KEEP if req.get("caching") in (None, "KEEP") else U.CACHING[req["caching"]]
        marker = 0x5752495400000000                   # "WRIT" << 32 | slot
        libc = _libc()
        addr = libc.mmap(None, b.size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, b.fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise AgentError("mmap: " + os.strerror(ctypes.get_errno()), ctypes.get_errno())
        done, moving, stop, during = [0], threading.Event(), threading.Event(), []

        def writer():
            v = ctypes.c_uint64(0)
            for k in range(nslots):
                if stop.is_set():
                    return
                v.value = marker | k
                ctypes.memmove(addr + base + 8 * k, ctypes.byref(v), 8)   # may fault; no GIL
                done[0] = k + 1
                if moving.is_set():
                    during.append(k)
                time.sleep(pace)

        t = threading.Thread(target=writer, daemon=True)
        e = 0
        try:
            t.start()
            while done[0] < nslots // 8 and t.is_alive():
                time.sleep(0.001)
            mreq = U.pack(U.MOVE_S, U.MOVE_FIELDS, fd=b.fd, mode=U.MOVE[req["mode"]], caching=cach)
            cbuf = (ctypes.c_char * len(mreq)).from_buffer(mreq)
            moving.set()
            rc = libc.ioctl(self.control(), U.IOC_MOVE, ctypes.addressof(cbuf))   # GIL released
            moving.clear()
            e = ctypes.get_errno() if rc < 0 else 0
            del cbuf
            at_move = done[0]
            t.join(120)
        finally:
            if t.is_alive():     # an error above, or a writer past its time: stop it first
                stop.set()
                t.join(10)
            # never unmap under a live writer: its next store would kill this agent (SIGSEGV)
            if not t.is_alive():
                libc.munmap(addr, b.size)
            else:
                log("move_under_writes: the writer is still running; its mapping is left")
        if t.is_alive() or done[0] < nslots:
            raise AgentError("the writer did not finish within 120 s", errno.ETIMEDOUT)
        if e:
            raise AgentError(f"MOVE: {os.strerror(e)}", e)
        b.generation = U.unpack(U.MOVE_S, U.MOVE_FIELDS, mreq)["generation"]
        with mmap.mmap(b.fd, b.size, mmap.MAP_SHARED, mmap.PROT_READ) as m:
            got = struct.unpack_from(f"<{nslots}Q", m, base)
        lost = [k for k in range(done[0]) if got[k] != marker | k]
        return {"generation": b.generation, "slots_written": done[0], "slots_before_move_returned": at_move,
                "slots_during_move": len(during), "lost": lost[:16], "lost_count": len(lost),
                "lost_write": bool(lost)}

    def op_release_quarantine(self, req):
        """Free retired pages: {"buf": handle} for a live buffer of this agent, or
        {"id": buffer id} for any buffer, closed ones included (0: every buffer);
        optional "max_generation" (free generations <= it; 0: all) and "force" (zap the
        live buffer's mappings instead of failing with EBUSY)."""
        mg, force = int(req.get("max_generation", 0)), bool(req.get("force", False))
        if req.get("buf") is not None:
            b = self.buf(req)
            if not isinstance(b, VmlabBuffer):
                raise AgentError("only vmlab buffers have a quarantine", errno.EINVAL)
            return b.release_quarantine(mg, force)
        if req.get("id") is None:
            raise AgentError('release_quarantine needs "buf" or "id"', errno.EINVAL)
        return release_quarantine(self.control(), int(req["id"]), mg, force)

    def op_quarantine(self, req):
        """The module-wide quarantine (debugfs): retired sets [buffer_id, generation, pages,
        still_mapped, caching] of every buffer, open or closed, the page counters, and
        close_freed_pages / corrupt_retired_pages."""
        out = quarantine_state()
        out.update(retire_counters())
        return out

    def op_close(self, req):
        """Close a buffer: {"id": its id} (None for an unknown handle). For a vmlab buffer
        every page it had stays quarantined under that id once the last reference to the
        dma-buf is gone (the sets MIGRATE retired and, stamped RETIRED at close, its current
        pages) until "release_quarantine" with that "id"."""
        self.op_host_unmap(req)
        b = self.buffers.pop(req["buf"], None)
        srv = self.servers.pop(req["buf"], None)
        if srv:
            srv.close()
        if b:
            b.close()
        return {"id": b.id if b else None}

    def op_lab_facts(self, req):
        """What vmlab.lab's facts script prints, read in this process (the script's cat,
        grep and subshells cost a TCG lab ~0.2 s): the static facts that script cached at
        "cache", then the live ones. None when nothing is cached: the script runs then."""
        try:
            with open(req["cache"]) as f:
                static = f.read()
        except OSError:
            return {"text": None}
        if not static.strip():
            return {"text": None}
        with open("/proc/cmdline") as f:
            lines = [static.rstrip("\n"), "cmdline=" + f.read().rstrip("\n")]
        for mod in req.get("modules", ()):
            d = f"/sys/module/{mod}/parameters"
            try:
                names = sorted(os.listdir(d))
            except OSError:
                continue            # not loaded, or without parameters: grep says nothing
            for name in names:
                try:
                    with open(f"{d}/{name}", errors="replace") as f:
                        value = f.read()
                except OSError:
                    continue        # write-only, or gone: grep says nothing either
                lines += [f"{d}/{name}:{ln}" for ln in value.splitlines()]
        return {"text": "\n".join(lines) + "\n"}

    def op_pat(self, req):
        return {"lines": pat_memtype_list()}

    def op_meminfo(self, req):
        return meminfo()

    def op_kernel_state(self, req, deadline=None):
        """The taint mask, and with "mark" a mark at the kernel log's end: a /dev/kmsg
        reader moved there and held by this agent; with "since_mark" the log's lines
        logged since ("text", as op_kmsg writes them), and "overruns": how often the ring
        overwrote lines before they were read. A run's health reads only what it logged,
        where a `dmesg` at each end cost the TCG lab ~0.08 s and two whole logs to compare."""
        with open("/proc/sys/kernel/tainted") as f:
            taint = int(f.read().strip() or 0)
        if req.get("mark"):
            fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
            try:
                os.lseek(fd, 0, os.SEEK_END)
            except BaseException:
                os.close(fd)
                raise
            if self.kmsg_mark is not None:
                os.close(self.kmsg_mark)
            self.kmsg_mark = fd
            return {"taint": taint}
        if req.get("since_mark"):
            if self.kmsg_mark is None:
                raise AgentError("kernel_state since_mark: no mark was set", errno.EINVAL)
            # a read cut short ("truncated") fails the health check
            text, counts = _kmsg_text(self.kmsg_mark, deadline)
            return {"taint": taint, "text": text, **counts}
        raise AgentError("kernel_state needs mark or since_mark", errno.EINVAL)

    def op_kmsg(self, req, deadline=None):
        """The kernel log as text, one "[seconds] message" line per record, read from
        /dev/kmsg in this process: a log to keep; the kernel's escapes (\\xNN) are kept."""
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
        try:
            text, counts = _kmsg_text(fd, deadline)
        finally:
            os.close(fd)
        if counts["truncated"]:
            text += f"[vmlab: the log grew faster than it was read; cut at {KMSG_READ_BYTES >> 20} MiB or its deadline]\n"
        return {"text": text, "overruns": counts["overruns"], "truncated": counts["truncated"]}

    def op_shutdown(self, req):
        """Close every buffer, mapping, trace and the exporter's control file as the
        agent's exit would, then the kernel log (op_kmsg) with what that printed: the
        teardown's lab-dmesg.log, without an exec of dmesg after the agent is gone. When
        a run marked the log (op_kernel_state), also what came since the mark was last
        read ("since_mark", as op_kernel_state says it): what the teardown made the
        kernel say (the unplug, the buffer's close, its quarantine's release)."""
        self.close_all(keep_mark=True)
        # one budget for both reads, well inside the controller's 60 s; the judgement's
        # read (since the mark) first, the log to keep with what is left
        deadline = time.monotonic() + KMSG_READ_SECONDS
        since = None
        if self.kmsg_mark is not None:
            try:
                since = self.op_kernel_state({"since_mark": True}, deadline=deadline)
            finally:
                os.close(self.kmsg_mark)
                self.kmsg_mark = None
        out = self.op_kmsg(req, deadline=deadline)
        if since is not None:
            out["since_mark"] = since
        return out

    def op_dmesg_bad(self, req):
        return {"lines": dmesg_bad_lines()}

    def op_fuzz(self, req):
        """{"count", "seed", "seconds"} random ioctls, or with "concurrent": true the racing
        fuzzer with "threads". Both are bounded by count and seconds (at most an hour)."""
        seconds = min(float(req.get("seconds", 30 if req.get("concurrent") else 600)), 3600.0)
        if req.get("concurrent"):
            return fuzz_concurrent(self.control(), int(req.get("count", 100000)), int(req.get("seed", 1)),
                                   seconds, int(req.get("threads", 4)))
        return fuzz(self.control(), int(req.get("count", 10000)), int(req.get("seed", 1)), seconds)

    def op_raw(self, req):
        """One ioctl with caller-chosen struct fields and pointer (negative tests):
        {"cmd": "CREATE"|"INFO"|"MOVE"|"RELEASE_QUARANTINE"|"PTE"|"ABI",
         "fields": [...] in C order, or {"name": value} (the rest 0),
         "buf": handle (a dict without "fd" gets that buffer's fd),
         "fd_of": "ctl" | "closed" | "devnull" (a dict's "fd": the control device, a closed
                  fd, an open non-dma-buf fd),
         "ptr": null (a valid buffer) or an integer address}.
        Returns rc, errname, and the fields after the call as a list and by name."""
        import ctypes
        st, names = U.STRUCTS[{"CREATE": "vmlab_create", "INFO": "vmlab_info", "MOVE": "vmlab_move",
                               "RELEASE_QUARANTINE": "vmlab_release_quarantine", "PTE": "vmlab_pte",
                               "ABI": "vmlab_abi"}[req["cmd"]]]
        cmd = getattr(U, "IOC_" + req["cmd"])
        buf = ctypes.create_string_buffer(st.size)
        fields = req.get("fields")
        extra = None
        if isinstance(fields, dict):
            fields = dict(fields)
            if "fd" in names and "fd" not in fields:
                kind = req.get("fd_of")
                if kind == "ctl":
                    fields["fd"] = self.control()
                elif kind == "closed":
                    fields["fd"] = _closed_fd()
                elif kind == "devnull":
                    extra = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
                    fields["fd"] = extra
                elif req.get("buf") is not None:
                    fields["fd"] = self.buf(req).fd
            buf[:] = bytes(U.pack(st, names, **fields))
        elif fields:
            st.pack_into(buf, 0, *fields)
        libc = _libc()
        ptr = req.get("ptr")
        try:
            rc = libc.ioctl(self.control(), cmd, ctypes.addressof(buf) if ptr is None else ptr)
            e = ctypes.get_errno() if rc < 0 else 0
        finally:
            if extra is not None:
                os.close(extra)
        out = list(st.unpack_from(buf.raw))
        named = dict(zip(names, out))
        if rc >= 0 and req["cmd"] == "CREATE" and named["fd"] > 2:
            os.close(named["fd"])  # a negative test that unexpectedly succeeded must not leak
        return {"rc": rc, "errname": errno.errorcode.get(e, "") if e else "", "fields": out,
                "named": named}

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

    # --- KVM's own evidence: its MMU tracepoints, in a private tracefs instance ---------
    KTRACE_EVENTS = {   # event -> filter over the buffer's guest-physical range
        "kvmmmu/kvm_tdp_mmu_spte_changed": "gfn >= {g0} && gfn < {g1}",
        "kvmmmu/kvm_mmu_set_spte": "gfn >= {g0} && gfn < {g1}",
        "kvm/kvm_page_fault": "fault_address >= {b0} && fault_address < {a1}",
        "kvm/kvm_emulate_insn": None,
        "kvmmmu/kvm_mmu_zap_all_fast": None,   # a memslot deleted (the VMM's unmap)
    }

    def op_ktrace_start(self, req):
        """Record KVM's MMU events for guest frames [gfn, gfn + pages) in a tracefs
        instance of this agent's own (other tracing users are not disturbed). A 1 GiB
        aligned start, so a huge mapping that covers the range is seen too."""
        self.op_ktrace_stop({})
        root = next((t for t in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
                     if os.path.isdir(t + "/instances")), None)
        if root is None:
            raise AgentError("no tracefs (neither /sys/kernel/tracing nor debugfs tracing)", errno.ENOENT)
        g0, g1 = int(req["gfn"]) & ~0x3FFFF, int(req["gfn"]) + int(req["pages"])
        _remove_dead_instances(root)
        inst = f"{root}/instances/vmlab-{os.getpid()}"
        os.mkdir(inst)
        self.ktrace = inst
        self.ktrace_overrun = 0
        with open(inst + "/buffer_size_kb", "w") as f:
            f.write(str(int(req.get("buffer_kb", 8192))))
        enabled, missing = [], []
        for ev, flt in self.KTRACE_EVENTS.items():
            d = f"{inst}/events/{ev}"
            if not os.path.isdir(d):
                missing.append(ev)
                continue
            if flt:
                with open(d + "/filter", "w") as f:
                    # page faults: the buffer's own frames (sptes: from 1 GiB below, for huge ones)
                    f.write(flt.format(g0=g0, g1=g1, b0=int(req["gfn"]) << 12, a1=g1 << 12))
            with open(d + "/enable", "w") as f:
                f.write("1")
            enabled.append(ev)
        return {"instance": inst, "enabled": enabled, "missing": missing,
                "tdp_mmu": _read_first("/sys/module/kvm/parameters/tdp_mmu")}

    def _ktrace_take(self) -> tuple[list[str], int]:
        """The events recorded since the last take, consumed from trace_pipe, and the
        ring buffer's overruns meanwhile. Consuming, not clearing: a write to ``trace``
        resets the buffer behind an RCU grace period (29 ms a move under the TCG lab)."""
        if not self.ktrace:
            raise AgentError("ktrace_start first", errno.EINVAL)
        chunks = list(_drain(self.ktrace + "/trace_pipe", 1 << 16))
        overrun = 0
        for cpu in os.listdir(self.ktrace + "/per_cpu"):
            with open(f"{self.ktrace}/per_cpu/{cpu}/stats") as f:
                overrun += sum(int(ln.split()[1]) for ln in f if ln.startswith("overrun:"))
        new_overrun, self.ktrace_overrun = overrun - self.ktrace_overrun, overrun
        lines = b"".join(chunks).decode(errors="replace").splitlines()
        return [ln for ln in lines if ln and not ln.startswith("#")], new_overrun

    def op_ktrace_clear(self, req):
        self._ktrace_take()
        return {}

    def op_ktrace_collect(self, req):
        """The events since the last clear, as tracefs prints them (one per line), and
        whether the ring buffer overflowed meanwhile (then the record is incomplete)."""
        lines, overrun = self._ktrace_take()
        return {"lines": lines, "overrun": overrun}

    def op_ktrace_stop(self, req):
        inst, self.ktrace = self.ktrace, None
        if inst and os.path.isdir(inst):
            try:
                with open(inst + "/events/enable", "w") as f:
                    f.write("0")
            finally:
                os.rmdir(inst)
        return {}

    def op_ping(self, req):
        return {}

    def op_batch(self, req):
        """Several requests in one round trip, run in order, each answered as it would be
        alone: a move's extras (KVM's trace, the pfns, the quarantine) cost a channel
        round trip each through the TCG lab. A failed request ends the batch (those
        after it are not run) unless it says ``may_fail``: true, or the errno names
        (["EBUSY"]) with which the ones after it may still run."""
        subs = req.get("requests")
        if not isinstance(subs, list) or not all(isinstance(r, dict) for r in subs):
            raise AgentError("batch: requests must be a list of requests", errno.EINVAL)
        if any(r.get("op") == "batch" for r in subs):
            raise AgentError("batch: a batch cannot hold a batch", errno.EINVAL)
        answers, elapsed = [], []
        for sub in subs:
            t = time.monotonic()
            answers.append(answer(self, sub))
            elapsed.append(round(time.monotonic() - t, 6))
            may_fail = sub.get("may_fail")
            if not answers[-1]["ok"] and not (may_fail is True or isinstance(may_fail, list)
                                              and answers[-1].get("errname") in may_fail):
                break
        # each request's own time here: the controller times a move, not the ones before it
        return {"answers": answers, "elapsed_s": elapsed}

    def op_read_files(self, req):
        """Each path's size and first ``max_bytes`` bytes (base64), None where it cannot be
        read: a guest's logs in a request, not an exec (0.3-0.7 s under the TCG lab)."""
        cap = int(req.get("max_bytes", 16 << 20))
        if cap < 0:
            raise AgentError(f"max_bytes {cap} < 0", errno.EINVAL)
        out = []
        for p in req["paths"]:
            try:
                with open(p, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    data = f.read(min(size, cap))     # cut at the size it had: it may grow
            except OSError:
                out.append(None)
                continue
            out.append({"size": size, "data": base64.b64encode(data).decode()})
        return {"files": out}

    def close_all(self, keep_mark=False):
        try:
            self.op_ktrace_stop({})
        except OSError as e:
            log(f"ktrace stop: {e}")
        for h in list(self.buffers):
            self.op_close({"buf": h})
        if self.ctl is not None:
            os.close(self.ctl)
            self.ctl = None
        if self.kmsg_mark is not None and not keep_mark:
            os.close(self.kmsg_mark)
            self.kmsg_mark = None


def answer(agent, req) -> dict:
    """One request's answer: {"ok": True, ...} or {"ok": False, "error", "errno", ...}."""
    try:
        fn = getattr(agent, "op_" + str(req.get("op", "")), None)
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
    return resp


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
            except ValueError as e:
                resp = {"ok": False, "error": f"not a JSON request: {e}", "errno": errno.EINVAL,
                        "errname": "EINVAL"}
            else:
                resp = answer(agent, req) if isinstance(req, dict) else \
                    {"ok": False, "error": "a request is a JSON object", "errno": errno.EINVAL,
                     "errname": "EINVAL"}
            out.write(json.dumps(resp) + "\n")
            out.flush()
    finally:
        agent.close_all()
        log("stdin closed: buffers released, exiting")
    return 0


# a forked agent's pipes (the SSH channel's) and its message from vmlab-attach
_ZYGOTE_MAX_MSG = 8192


def zygote(sock_path):
    """The fork server of a nested lab (started with the lab, kept in its snapshot): one
    process that has imported the agent and forks a fresh one for each vmlab-attach
    connection, so a run's agent starts in a fork, not a Python start (0.9-1.7 s under
    TCG). It holds no buffer, fd or thread of its own: each agent is a process like one
    the exec would start, with the channel's own pipes as its stdin, stdout and stderr,
    and its end is a process exit. The server itself only accepts; a message it cannot
    take is dropped (vmlab-attach then starts the agent itself)."""
    import ctypes  # noqa: F401  (imported once here, not in every agent: _forked_agent)
    import signal
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)   # the kernel reaps the agents
    tmp = f"{sock_path}.{os.getpid()}"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)
    try:
        srv.bind(tmp)
    finally:
        os.umask(old)
    srv.listen(16)
    os.rename(tmp, sock_path)       # atomic: a client never sees a socket not yet listening
    log(f"zygote: serving {sock_path} (pid {os.getpid()})")
    while True:
        try:
            conn, _ = srv.accept()
        except OSError as e:        # out of fds, an aborted connection: not the server's end
            log(f"zygote: accept: {e}")
            time.sleep(0.1)
            continue
        fds = []
        try:
            conn.settimeout(5)      # one silent client must not hold the others' agents
            msg, fds, _, _ = socket.recv_fds(conn, _ZYGOTE_MAX_MSG, 3)
            if len(fds) != 3 or not msg.startswith(b"A"):
                log(f"zygote: dropped a message of {len(msg)} bytes with {len(fds)} fds")
                continue
            pid = os.fork()
            if pid == 0:
                srv.close()
                _forked_agent(conn, fds, msg[1:])   # never returns
        except OSError as e:
            log(f"zygote: {e}")
        finally:
            for fd in fds:
                os.close(fd)
            conn.close()


# what a forked agent calls itself (prctl PR_SET_NAME): its command line is its server's,
# and cleanups must find it also when that server is gone (matrix.clean_lab_script)
FORKED_AGENT_NAME = b"vmlab-agent"


def _forked_agent(conn, fds, env):
    """The child of zygote(): become the agent the exec would have started, then exit.
    Nothing is sent before it owns the channel's pipes (vmlab-attach then starts an agent
    itself); then "S" and its pid, and it waits for vmlab-attach to hold a pidfd of it:
    the exec ends only once this process has exited, as sshd's wait on an agent it
    started would."""
    global FORKED_FROM
    import ctypes
    import signal
    rc, started = 1, False
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)   # its subprocesses are waited for
        os.setsid()
        ctypes.CDLL(None, use_errno=True).prctl(15, FORKED_AGENT_NAME, 0, 0, 0)   # PR_SET_NAME
        for i, fd in enumerate(fds):
            os.dup2(fd, i)
            os.close(fd)
        for k in [k for k in os.environ if k.startswith("VMLAB_")]:
            del os.environ[k]
        for kv in env.split(b"\0"):
            k, sep, v = kv.decode().partition("=")
            if sep and k.startswith("VMLAB_"):
                os.environ[k] = v
        # the zygote's own file objects were on /dev/null; these are the channel's
        sys.stdin = open(0, "r", closefd=False)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        FORKED_FROM = os.getppid()
        conn.settimeout(30)
        conn.sendall(b"S" + struct.pack("<I", os.getpid()))
        started = True
        if conn.recv(1) != b"A":
            # vmlab-attach is gone: the exec has ended, so nobody may be served here
            os._exit(1)
        conn.settimeout(None)
        rc = serve()
    except BaseException:
        try:
            log(traceback.format_exc())
        except Exception:
            pass
    finally:
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except Exception:   # the controller gone (EPIPE): the status still goes
                pass
        if started:
            try:
                conn.sendall(bytes([rc & 0xFF]))
            except Exception:
                pass
        os._exit(rc)


def main(argv):
    if len(argv) >= 2 and argv[1] == "serve":
        return serve()
    if len(argv) == 3 and argv[1] == "zygote":
        return zygote(argv[2])
    print("usage: hostagent.py serve | hostagent.py zygote SOCK", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
