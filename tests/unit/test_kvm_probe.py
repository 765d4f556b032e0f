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
    # JSON line with a reason (on this PVM host the 5-byte VM runs: the lab-kernel boot decides)
    cp = subprocess.run([sys.executable, "-m", "vmlab.kvm_probe"], capture_output=True, text=True,
                        timeout=10, cwd=os.path.dirname(os.path.dirname(kvm_probe.__file__)))
    r = json.loads(cp.stdout)
    assert isinstance(r["ok"], bool) and r["why"]
