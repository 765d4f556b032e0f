"""vmlab/qemu.py VMSpec.argv(): pure command-line construction (nothing is launched)."""
from __future__ import annotations

import shlex

from vmlab import lab
from vmlab.qemu import VMSpec


def spec(**kw) -> VMSpec:
    base = dict(name="t vm", kernel="/img/vmlinuz", initrd="/img/initrd.img",
                append="console=ttyS0 root=/dev/vda quiet='a b'", disk="/img/disk raw.img",
                ssh_forward=2222, share="/srv/share dir", console_log="/tmp/w/console.log",
                qmp_socket="/tmp/w/qmp.sock", pidfile="/tmp/w/pid")
    base.update(kw)
    return VMSpec(**base)


def opt(argv, flag):
    """Values following every occurrence of ``flag``."""
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_hostfwd_loopback_only():
    a = spec().argv()
    nets = opt(a, "-netdev")
    assert nets == ["user,id=n0,hostfwd=tcp:127.0.0.1:2222-:22"]
    assert "0.0.0.0" not in " ".join(a)
    assert "hostfwd=tcp::" not in " ".join(a)
    assert any(d.startswith("virtio-net-pci,netdev=n0") for d in opt(a, "-device"))


def test_no_network_without_forward():
    a = spec(ssh_forward=None).argv()
    assert opt(a, "-netdev") == []
    assert "hostfwd" not in " ".join(a)


def test_qmp_unix_socket():
    q = opt(spec().argv(), "-qmp")
    assert q == ["unix:/tmp/w/qmp.sock,server=on,wait=off"]
    assert "tcp" not in q[0]


def test_disk_snapshot():
    d = opt(spec().argv(), "-drive")
    assert len(d) == 1
    fields = d[0].split(",")
    assert "snapshot=on" in fields
    assert "file=/img/disk raw.img" in fields
    assert "format=raw" in fields
    assert opt(spec(disk=None).argv(), "-drive") == []


def test_nodefaults_and_no_user_config():
    a = spec().argv()
    assert a[0] == "qemu-system-x86_64"
    assert "-nodefaults" in a
    assert "-no-user-config" in a
    assert opt(a, "-display") == ["none"]
    assert "-no-reboot" in a


def test_accel_strings():
    assert opt(spec().argv(), "-accel") == ["tcg,thread=single"]
    assert opt(spec(accel="kvm").argv(), "-accel") == ["kvm"]


def test_virtfs_readonly():
    v = opt(spec().argv(), "-virtfs")
    assert len(v) == 1
    fields = v[0].split(",")
    assert "readonly=on" in fields
    assert "mount_tag=vmlabshare" in fields
    assert fields[0] == "local"
    assert opt(spec(share=None).argv(), "-virtfs") == []


def test_basic_fields():
    a = spec(memory_mb=777, smp=3, cpu=lab.TCG_CPU, machine="pc").argv()
    assert opt(a, "-m") == ["777"]
    assert opt(a, "-smp") == ["3"]
    assert opt(a, "-cpu") == ["EPYC,+svm,+npt"]
    assert opt(a, "-machine") == ["pc"]
    assert opt(a, "-kernel") == ["/img/vmlinuz"]
    assert opt(a, "-initrd") == ["/img/initrd.img"]
    assert opt(a, "-append") == ["console=ttyS0 root=/dev/vda quiet='a b'"]
    assert opt(a, "-chardev") == ["file,id=con0,path=/tmp/w/console.log"]
    assert opt(a, "-serial") == ["chardev:con0"]
    assert opt(a, "-pidfile") == ["/tmp/w/pid"]
    assert "-daemonize" not in a
    assert "-daemonize" in spec(daemonize=True).argv()


def test_extra_last():
    a = spec(extra=["-device", "ivshmem-doorbell,chardev=ivs0"]).argv()
    assert a[-2:] == ["-device", "ivshmem-doorbell,chardev=ivs0"]


def test_command_line_round_trip():
    s = spec(extra=["-append-ish", "it's \"quoted\" $HOME;"])
    assert shlex.split(s.command_line()) == s.argv()


def test_tcg_cpu():
    assert lab.TCG_CPU == "EPYC,+svm,+npt"
