"""The accel probe's quick half: the tiny VM's ioctl numbers and its verdicts."""
import json
import os
import subprocess
import sys

from vmlab import kvm_probe


def test_ioctl_numbers_match_linux_uapi():
    # from <linux/kvm.h> on x86-64
    assert kvm_probe.KVM_CREATE_VM == 0xAE01
    assert kvm_probe.KVM_RUN == 0xAE80
    assert kvm_probe.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert kvm_probe.KVM_GET_REGS == 0x8090AE81
    assert kvm_probe.KVM_SET_SREGS == 0x4138AE84


def test_a_probe_that_never_answers_is_unusable(tmp_path):
    # a "python" whose probe hangs: the deadline turns it into a verdict, not a wait
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexec sleep 30\n")
    fake.chmod(0o755)
    r = kvm_probe.probe(python=str(fake), deadline_s=0.5)
    assert r["ok"] is False and "did not return within" in r["why"]
    assert r["seconds"] < 5


def test_a_probe_that_crashes_is_unusable_with_its_words(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'OSError: boom' >&2\nexit 1\n")
    fake.chmod(0o755)
    r = kvm_probe.probe(python=str(fake))
    assert r["ok"] is False and "boom" in r["why"]


def test_the_tiny_vm_answers_on_this_machine():
    # whatever this machine's /dev/kvm is (none, PVM, real), the probe process answers one
    # JSON line with a reason; where /dev/kvm is usable, a refusal must be KVM's own (an
    # errno or an exit reason), never the probe's (a struct or ioctl number of its own)
    cp = subprocess.run([sys.executable, "-m", "vmlab.kvm_probe"], capture_output=True, text=True,
                        timeout=10, cwd=os.path.dirname(os.path.dirname(kvm_probe.__file__)))
    assert cp.returncode == 0, cp.stderr
    r = json.loads(cp.stdout)
    assert isinstance(r["ok"], bool) and r["why"]
    if os.access("/dev/kvm", os.R_OK | os.W_OK):
        assert r["ok"] or r["why"].startswith(("KVM API:", "KVM_RUN exit", "KVM API version")), r
    else:
        assert not r["ok"] and "/dev/kvm" in r["why"]


def test_struct_layouts_match_the_kernel_abi():
    import ctypes

    class Segment(ctypes.Structure):          # struct kvm_segment
        _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint32), ("selector", ctypes.c_uint16),
                    ("type", ctypes.c_uint8), ("present", ctypes.c_uint8), ("dpl", ctypes.c_uint8),
                    ("db", ctypes.c_uint8), ("s", ctypes.c_uint8), ("l", ctypes.c_uint8),
                    ("g", ctypes.c_uint8), ("avl", ctypes.c_uint8), ("unusable", ctypes.c_uint8),
                    ("padding", ctypes.c_uint8)]

    class DTable(ctypes.Structure):           # struct kvm_dtable
        _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint16), ("padding", ctypes.c_uint16 * 3)]

    class Sregs(ctypes.Structure):            # struct kvm_sregs (x86)
        _fields_ = [(n, Segment) for n in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")] + \
                   [("gdt", DTable), ("idt", DTable)] + \
                   [(n, ctypes.c_uint64) for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")] + \
                   [("interrupt_bitmap", ctypes.c_uint64 * 4)]

    class Io(ctypes.Structure):               # kvm_run's io exit
        _fields_ = [("direction", ctypes.c_uint8), ("size", ctypes.c_uint8), ("port", ctypes.c_uint16),
                    ("count", ctypes.c_uint32), ("data_offset", ctypes.c_uint64)]

    class RunHead(ctypes.Structure):          # struct kvm_run up to its exit union
        _fields_ = [("request_interrupt_window", ctypes.c_uint8), ("immediate_exit", ctypes.c_uint8),
                    ("padding1", ctypes.c_uint8 * 6), ("exit_reason", ctypes.c_uint32),
                    ("ready_for_interrupt_injection", ctypes.c_uint8), ("if_flag", ctypes.c_uint8),
                    ("flags", ctypes.c_uint16), ("cr8", ctypes.c_uint64), ("apic_base", ctypes.c_uint64),
                    ("io", Io)]

    assert ctypes.sizeof(Sregs) == kvm_probe.SREGS_SIZE
    assert Segment.selector.offset == kvm_probe.SEG_SELECTOR and Sregs.cs.offset == 0
    assert RunHead.exit_reason.offset == kvm_probe.RUN_EXIT_REASON
    assert RunHead.io.offset == kvm_probe.RUN_IO
    assert kvm_probe.USERSPACE_REGION.size == 32


def test_only_a_definite_answer_is_kept_and_a_hang_for_an_hour(tmp_path, monkeypatch):
    import vmlab.lab as lab
    monkeypatch.setenv("VMLAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(lab.os, "access", lambda p, m: True)
    monkeypatch.setattr(lab.os.path, "exists", lambda p: True)
    monkeypatch.setattr(lab, "qemu_version", lambda: "q")

    class Img:
        manifest = {"artifacts": {"vmlinuz": "k"}}
    answers = [{"ok": False, "why": "KVM API: Operation not supported", "definite": True, "seconds": 0.01},
               {"ok": False, "why": "did not return within 5s", "definite": False, "seconds": 5}]
    monkeypatch.setattr(lab.kvm_probe, "probe", lambda: answers[0])
    assert lab.probe_accel(Img())[0] == "tcg"
    rec = json.loads((tmp_path / "accel-probe.json").read_text())
    assert "expires" not in rec and "(cached probe)" in lab.probe_accel(Img())[1]
    (tmp_path / "accel-probe.json").unlink()
    monkeypatch.setattr(lab.kvm_probe, "probe", lambda: answers[1])
    lab.probe_accel(Img())
    rec = json.loads((tmp_path / "accel-probe.json").read_text())
    assert 0 < rec["expires"] - __import__("time").time() <= lab.UNSURE_PROBE_TTL_S
    rec["expires"] = 1       # an hour later: asked again
    (tmp_path / "accel-probe.json").write_text(json.dumps(rec))
    assert "(cached probe)" not in lab.probe_accel(Img())[1]
