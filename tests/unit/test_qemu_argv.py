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


def test_a_snapshottable_lab_disk_key_port_and_generation_id():
    a = spec(disk="/run/x/lab-disk.qcow2", disk_overlay=True, key_port="/run/x/lab-key.sock",
             vmgenid=True, console_append=True).argv()
    # the overlay is written (a snapshot keeps it): no snapshot=on, qcow2
    assert opt(a, "-drive") == ["file=/run/x/lab-disk.qcow2,if=virtio,format=qcow2"]
    assert "socket,id=keyport,path=/run/x/lab-key.sock,server=on,wait=off" in opt(a, "-chardev")
    devs = opt(a, "-device")
    assert "virtserialport,bus=vser0.0,chardev=keyport,name=vmlab.key" in devs
    assert "vmgenid,guid=auto" in devs
    assert "file,id=con0,path=/tmp/w/console.log,append=on" in opt(a, "-chardev")
    plain = spec().argv()
    assert opt(plain, "-drive") == ["file=/img/disk raw.img,if=virtio,format=raw,snapshot=on"]
    assert not any("keyport" in c or "vmgenid" in c for c in opt(plain, "-chardev") + opt(plain, "-device"))


def test_a_snapshot_key_is_the_machine_without_the_runs_key(monkeypatch, tmp_path):
    from vmlab import lab_snapshot
    monkeypatch.setattr(lab_snapshot, "qemu_version", lambda b: "QEMU emulator version 7.2.22")
    img = tmp_path / "lab-trixie-abc"
    s = spec(append="console=ttyS0 vmlab.sshkey=AAAA1 panic=-1", accel="tcg")
    k = lab_snapshot.key(s, img)
    assert lab_snapshot.key(spec(append="console=ttyS0 vmlab.sshkey=BBBB2 panic=-1", accel="tcg"), img) == k
    for other in (spec(append="console=ttyS0 vmlab.sshkey=AAAA1 panic=1", accel="tcg"),
                  spec(append=s.append, accel="tcg", memory_mb=4096)):
        assert lab_snapshot.key(other, img) != k
    assert lab_snapshot.key(s, tmp_path / "lab-trixie-def") != k
    # the snapshot holds the host agent's fork server: another agent, another snapshot
    assert lab_snapshot.key(s, img, agent="0123") != k
    monkeypatch.setattr(lab_snapshot, "qemu_version", lambda b: "QEMU emulator version 8.2.0")
    assert lab_snapshot.key(s, img) != k
    assert lab_snapshot.find(img, k) is None
    d = img / "snapshots" / k
    d.mkdir(parents=True)
    (d / "vm.state").write_bytes(b"x" * 100)
    (d / "disk.qcow2").write_bytes(b"q")
    assert lab_snapshot.find(img, k) is None          # half written: no meta.json yet
    (d / "meta.json").write_text('{"bytes": 100}')
    assert lab_snapshot.find(img, k) == d
    (d / "vm.state").write_bytes(b"x" * 99)           # cut short after its meta was written
    assert lab_snapshot.find(img, k) is None


def test_a_snapshot_with_a_guest_is_keyed_by_that_guest_and_its_image(monkeypatch, tmp_path):
    """A lab snapshot that holds a guest serves only runs that would boot that guest from
    that guest image; how long its boot may take is no part of it."""
    import dataclasses
    from types import SimpleNamespace
    from vmlab import lab_snapshot
    from vmlab.experiment import resident_options
    from vmlab.guest import GuestOptions
    monkeypatch.setattr(lab_snapshot, "qemu_version", lambda b: "QEMU emulator version 7.2.22")
    img, s = tmp_path / "lab-trixie-abc", spec(accel="tcg")
    gi = SimpleNamespace(path=tmp_path / "guest-trixie-111")
    g = resident_options(GuestOptions(extra_qemu_args=["-device", "ivshmem-doorbell,chardev=ivs0"]))
    assert g.key_port and "ivshmem-doorbell,chardev=ivs0" not in g.extra_qemu_args
    assert any(a.startswith("pcie-root-port") for a in g.extra_qemu_args)
    k = lab_snapshot.key(s, img, resident=g, guest_image=gi)
    assert k != lab_snapshot.key(s, img)
    assert lab_snapshot.key(s, img, resident=dataclasses.replace(g, boot_timeout=999), guest_image=gi) == k
    for other in (dataclasses.replace(g, memory_mb=1024), dataclasses.replace(g, gpu="blob")):
        assert lab_snapshot.key(s, img, resident=other, guest_image=gi) != k
    assert lab_snapshot.key(s, img, resident=g, guest_image=SimpleNamespace(path=tmp_path / "guest-trixie-222")) != k
    # the guest kernel's fixed arguments count too (one may decide where a hot-plugged BAR
    # lands: pci=no_e820 did, measured)
    from vmlab import guest
    monkeypatch.setattr(guest, "BOOT_ARGS", guest.BOOT_ARGS + " pci=no_e820")
    assert lab_snapshot.key(s, img, resident=g, guest_image=gi) != k


def test_a_guests_key_port_is_port_io_like_its_network():
    """In a TCG lab a guest's MMIO exits may meet KVM's emulator bug (suberror 3): the
    guest's virtio devices are legacy port I/O, its key port's too."""
    a = spec(accel="kvm", key_port="/run/vmlab/guest/key.sock", virtio_pio=True, ssh_forward=2222).argv()
    assert "virtio-serial-pci,id=vser0,disable-modern=on,disable-legacy=off" in opt(a, "-device")


def test_snapshots_are_pruned_and_a_dead_vmlabs_leftovers_go(tmp_path, monkeypatch):
    import os
    import subprocess
    import time

    from vmlab import lab_snapshot
    monkeypatch.setattr(lab_snapshot, "KEEP", 3)
    img = tmp_path / "lab-x"
    d = lab_snapshot.directory(img)
    for i, k in enumerate(("a1", "b2", "c3", "d4", "e5")):
        (d / k).mkdir(parents=True)
        (d / k / "meta.json").write_text("{}")
        os.utime(d / k, (time.time() + i, time.time() + i))
    p = subprocess.Popen(["true"])
    p.wait()
    (d / f".ff.{p.pid}.tmp").mkdir()                  # a save of a vmlab that died
    (d / f".ee.{p.pid}.123.discarded").mkdir()
    (d / f".ab.{os.getpid()}.tmp").mkdir()            # a save in progress: stays
    lab_snapshot.prune(img, keep=d / "a1")
    left = sorted(x.name for x in d.iterdir())
    assert left == sorted(["a1", "c3", "d4", "e5", f".ab.{os.getpid()}.tmp"]), left
    lab_snapshot.discard(d / "e5")
    assert not (d / "e5").exists() and not [x for x in d.iterdir() if "discarded" in x.name]


def test_which_labs_are_snapshotted(monkeypatch):
    from vmlab import lab_snapshot
    monkeypatch.delenv(lab_snapshot.DISABLE_ENV, raising=False)
    assert lab_snapshot.enabled(spec(accel="tcg"), False, ()) is None
    assert "TCG" in lab_snapshot.enabled(spec(accel="kvm"), False, ())
    assert "plugin" in lab_snapshot.enabled(spec(accel="tcg"), True, ())
    assert "extra QEMU arguments" in lab_snapshot.enabled(spec(accel="tcg"), False, ("-S",))
    monkeypatch.setenv(lab_snapshot.DISABLE_ENV, "0")
    assert lab_snapshot.enabled(spec(accel="tcg"), False, ()) == "VMLAB_SNAPSHOTS=0"
