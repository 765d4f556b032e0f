"""The quick half of the accelerator probe: a tiny VM run through the KVM API itself.

Booting the lab kernel under -accel kvm is the real test of /dev/kvm, but an unusable one
can make that boot hang until its timeout (a PVM /dev/kvm did, for 40 s). Sixteen bytes of
real-mode code (write a byte to an I/O port, halt) tell in milliseconds whether this
/dev/kvm can run a VM at all: if it cannot, the lab kernel cannot boot either and the boot
is skipped; if it can, the boot still decides. The tiny VM runs in a child process with a
deadline, so a KVM_RUN that never returns costs seconds, not the boot's timeout.

Run as ``python3 -m vmlab.kvm_probe``: prints one JSON line {"ok": bool, "why": str}.
"""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import struct
import subprocess
import sys

KVMIO = 0xAE


def _io(nr):
    return (KVMIO << 8) | nr


def _iow(nr, size):
    return (1 << 30) | (size << 16) | (KVMIO << 8) | nr


def _ior(nr, size):
    return (2 << 30) | (size << 16) | (KVMIO << 8) | nr


KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_TSS_ADDR = _io(0x47)
USERSPACE_REGION = struct.Struct("=IIQQQ")       # struct kvm_userspace_memory_region
KVM_SET_USER_MEMORY_REGION = _iow(0x46, USERSPACE_REGION.size)
REGS_SIZE = 18 * 8                                # struct kvm_regs
SREGS_SIZE = 8 * 24 + 2 * 16 + 7 * 8 + 4 * 8      # struct kvm_sregs (x86)
KVM_GET_REGS, KVM_SET_REGS = _ior(0x81, REGS_SIZE), _iow(0x82, REGS_SIZE)
KVM_GET_SREGS, KVM_SET_SREGS = _ior(0x83, SREGS_SIZE), _iow(0x84, SREGS_SIZE)
KVM_RUN = _io(0x80)
SEG_SELECTOR = 12        # offsetof(struct kvm_segment, selector); cs is kvm_sregs' first
RUN_EXIT_REASON = 8      # offsetof(struct kvm_run, exit_reason)
RUN_IO = 32              # offsetof(struct kvm_run, io)
KVM_EXIT_IO, KVM_EXIT_HLT = 2, 5
EXIT_NAMES = {0: "UNKNOWN", 1: "EXCEPTION", 2: "IO", 5: "HLT", 6: "MMIO", 8: "SHUTDOWN",
              9: "FAIL_ENTRY", 17: "INTERNAL_ERROR"}

PORT, VALUE = 0x10, 0x42
# mov al, 0x42; out 0x10, al; hlt
CODE = bytes([0xB0, VALUE, 0xE6, PORT, 0xF4])
MEM = 0x1000
DEADLINE_S = 5.0


_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)


def _ioctl(fd: int, req: int, arg=0):
    """ioctl with an unsigned long or a struct (bytes in, the struct as the kernel left it
    out): fcntl.ioctl takes only a C int, and KVM_SET_TSS_ADDR's address is above it."""
    if isinstance(arg, (bytes, bytearray)):
        buf = ctypes.create_string_buffer(bytes(arg), len(arg))
        if _libc.ioctl(fd, req, ctypes.cast(buf, ctypes.c_void_p)) < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        return buf.raw
    rc = _libc.ioctl(fd, req, ctypes.c_void_p(arg))
    if rc < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return rc


def run_tiny_vm() -> dict:
    """In this process: the tiny VM from creation to HLT. {"ok", "why"}."""
    try:
        kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return {"ok": False, "why": f"/dev/kvm: {e.strerror}"}
    try:
        api = _ioctl(kvm, KVM_GET_API_VERSION)
        if api != 12:
            return {"ok": False, "why": f"KVM API version {api}, not 12"}
        vm = _ioctl(kvm, KVM_CREATE_VM, 0)
        try:
            _ioctl(vm, KVM_SET_TSS_ADDR, 0xFFFBD000)   # VMX without unrestricted guest needs it
        except OSError:
            pass
        mem = mmap.mmap(-1, MEM, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        mem[:len(CODE)] = CODE
        addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
        _ioctl(vm, KVM_SET_USER_MEMORY_REGION, USERSPACE_REGION.pack(0, 0, 0, MEM, addr))
        vcpu = _ioctl(vm, KVM_CREATE_VCPU, 0)
        run = mmap.mmap(vcpu, _ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE), mmap.MAP_SHARED,
                        mmap.PROT_READ | mmap.PROT_WRITE)
        sregs = bytearray(_ioctl(vcpu, KVM_GET_SREGS, bytes(SREGS_SIZE)))
        struct.pack_into("=Q", sregs, 0, 0)           # cs.base = 0
        struct.pack_into("=H", sregs, SEG_SELECTOR, 0)   # cs.selector = 0
        _ioctl(vcpu, KVM_SET_SREGS, bytes(sregs))
        regs = bytearray(REGS_SIZE)
        struct.pack_into("=Q", regs, 16 * 8, 0)       # rip
        struct.pack_into("=Q", regs, 17 * 8, 2)       # rflags: bit 1 is always set
        _ioctl(vcpu, KVM_SET_REGS, bytes(regs))
        seen_out = False
        for _ in range(4):
            _ioctl(vcpu, KVM_RUN, 0)
            reason = struct.unpack_from("=I", run, RUN_EXIT_REASON)[0]
            if reason == KVM_EXIT_IO:
                direction, size, port, count, off = struct.unpack_from("=BBHIQ", run, RUN_IO)
                if direction == 1 and port == PORT and size == 1 and run[off] == VALUE:
                    seen_out = True
                    continue
                return {"ok": False, "why": f"unexpected I/O exit (port {port:#x})"}
            if reason == KVM_EXIT_HLT:
                return ({"ok": True, "why": "a real-mode VM ran to HLT through the KVM API"}
                        if seen_out else {"ok": False, "why": "HLT before the expected port write"})
            return {"ok": False, "why": f"KVM_RUN exit {EXIT_NAMES.get(reason, reason)}"}
        return {"ok": False, "why": "the tiny VM did not halt"}
    except OSError as e:
        return {"ok": False, "why": f"KVM API: {e.strerror or e}"}
    finally:
        os.close(kvm)


def probe(python: str = sys.executable, deadline_s: float = DEADLINE_S) -> dict:
    """The tiny VM in a child process with a deadline: {"ok", "why", "seconds"}."""
    import time
    t0 = time.monotonic()
    child = subprocess.Popen([python, "-m", "vmlab.kvm_probe"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        out, err = child.communicate(timeout=deadline_s)
        line = (out.strip().splitlines() or [""])[-1]
        try:
            res = json.loads(line)
            if not isinstance(res, dict) or not isinstance(res.get("ok"), bool):
                raise ValueError(line)
            res["definite"] = True     # KVM's own answer, worth caching
        except ValueError:
            last = (err.strip().splitlines() or [f"exit {child.returncode}"])[-1]
            res = {"ok": False, "why": f"the probe process failed: {last[:160]}", "definite": False}
    except subprocess.TimeoutExpired:
        child.kill()
        try:
            child.wait(timeout=2)
        except subprocess.TimeoutExpired:
            # stuck in KVM_RUN past SIGKILL (uninterruptible): left to the kernel, not waited for
            pass
        res = {"ok": False, "definite": False,
               "why": f"KVM_RUN of a 5-byte real-mode VM did not return within {deadline_s:.0f}s"}
    res["seconds"] = round(time.monotonic() - t0, 3)
    return res


if __name__ == "__main__":
    print(json.dumps(run_tiny_vm()))
