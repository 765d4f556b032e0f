"""Issue: nested lab. Boots lab + guest for real and checks what DESIGN.md promises."""
from __future__ import annotations

import json
import os
import stat

import paramiko
import pytest

from vmlab import doctor
from vmlab.guest import GuestOptions

from .conftest import lab_stack, results_dir


@pytest.fixture(scope="module")
def stack(images_ready):
    d = results_dir("lab-boot")
    s = lab_stack(d, GuestOptions(gpu="blob"))
    try:
        s.up()
        yield s
    finally:
        s.down()


def test_guest_runs_under_kvm(stack):
    kvm = stack.guest.cmd("query-kvm")
    assert kvm == {"enabled": True, "present": True}
    _, dmesg, _ = stack.guest.run("dmesg")
    assert "Hypervisor detected: KVM" in dmesg
    _, cpuinfo, _ = stack.guest.run("cat /proc/cpuinfo")
    assert " hypervisor" in cpuinfo


def test_lab_has_kvm_with_nested_paging_and_exporter(stack):
    facts = doctor.lab_facts(stack.lab)
    assert facts["kvm_module"] in ("kvm_amd", "kvm_intel")
    assert facts["kvm_dev"] and facts["nested_paging"]
    assert facts["udmabuf"] and "system" in facts["dma_heaps"]
    assert facts["exporter_loaded"] and facts["exporter_dev_mode"] == "600:root"
    if stack.lab.accel == "tcg":
        _, cmdline, _ = stack.lab.run("cat /proc/cpuinfo")
        assert cmdline.count("processor\t:") == 1, "one lab vCPU under TCG"


def test_ssh_and_qmp_to_both(stack):
    assert stack.lab.machine.cmd("query-status")["status"] == "running"
    assert stack.guest.cmd("query-status")["status"] == "running"
    assert stack.lab.run("hostname")[1].strip() == "vmlab-lab"
    assert stack.guest.run("hostname")[1].strip() == "vmlab-guest"


def test_qmp_sockets_private_and_forwards_on_loopback(stack):
    qmp = stack.lab.machine.spec.qmp_socket
    assert stat.S_IMODE(os.stat(qmp).st_mode) == 0o600
    _, mode, _ = stack.lab.run(f"stat -c %a {stack.guest.dir}/qmp.sock")
    assert mode.strip() == "600"
    # the lab's SSH forward listens on 127.0.0.1 only (/proc/net/tcp: 0100007F:PORT, state 0A)
    port = f"{stack.lab.ssh_port:04X}"
    listen = [ln.split()[1] for ln in open("/proc/net/tcp").read().splitlines()[1:]
              if ln.split()[3] == "0A" and ln.split()[1].endswith(":" + port)]
    assert listen == [f"0100007F:{port}"]
    _, tcp, _ = stack.lab.run("cat /proc/net/tcp")
    gport = f"{stack.guest.opts.ssh_port:04X}"
    glisten = [ln.split()[1] for ln in tcp.splitlines()[1:]
               if ln.split()[3] == "0A" and ln.split()[1].endswith(":" + gport)]
    assert glisten == [f"0100007F:{gport}"]


def test_no_password_logins(stack):
    t = paramiko.Transport(("127.0.0.1", stack.lab.ssh_port))
    try:
        t.start_client(timeout=30)
        with pytest.raises(paramiko.AuthenticationException):
            t.auth_password("root", "")
        with pytest.raises(paramiko.AuthenticationException):
            t.auth_password("root", "root")
    finally:
        t.close()


def test_doctor_json_from_a_running_stack(stack):
    rep = doctor.report(doctor.machine_facts(), doctor.lab_facts(stack.lab), doctor.guest_facts(stack.guest))
    text = json.dumps(rep)
    back = json.loads(text)
    assert back["lab"]["accel"] in ("kvm", "tcg")
    assert isinstance(back["lab"]["nested_paging"], bool) and back["lab"]["nested_paging"]
    assert back["lab"]["kernel"] and back["lab"]["qemu_version"]
    assert back["guest"]["accel"] == "kvm"
    assert back["guest"]["kernel"]
    # this stack's guest was asked for virtio-gpu with blob=true
    assert back["guest"]["virtio_gpu"]["resource_blob"] is True
