"""vmlab/reuse.py: when a command may run in the lab that `vmlab lab up` left running
(the lab test in tests/lab/test_cli_lifecycle.py runs two experiments in one)."""
from __future__ import annotations

from vmlab import reuse

HAVE = {"kernel": "trixie", "qemu": "default", "memory_mb": 3072,
        "extra_qemu_args": [], "hwtrace_plugin": None, "accel": "tcg",
        "image": "/c/lab-trixie-aa", "guest_image": "/c/guest-trixie-bb"}


def want(**kw):
    return {**HAVE, "accel": "auto", **kw}


def test_same_shape_is_reused_and_auto_takes_the_labs_accel():
    assert reuse.shape_mismatch(HAVE, want()) is None
    assert reuse.shape_mismatch(HAVE, want(accel="tcg")) is None


def test_each_difference_is_named():
    assert "kvm" in reuse.shape_mismatch(HAVE, want(accel="kvm"))
    assert "kernel is 'trixie'" in reuse.shape_mismatch(HAVE, want(kernel="trixie-backports"))
    assert "memory_mb" in reuse.shape_mismatch(HAVE, want(memory_mb=2048))
    assert "extra_qemu_args" in reuse.shape_mismatch(HAVE, want(extra_qemu_args=["-d", "int"]))
    assert "hwtrace_plugin" in reuse.shape_mismatch(HAVE, want(hwtrace_plugin="x.so"))
    # a rebuilt exporter or agent is a new image key: the running lab has the old one
    assert "image" in reuse.shape_mismatch(HAVE, want(image="/c/lab-trixie-cc"))
    assert "not built yet" in reuse.shape_mismatch(HAVE, want(guest_image=None))
    assert "no shape" in reuse.shape_mismatch(None, want())


def test_the_recorded_shape_is_the_wanted_one(tmp_path, monkeypatch):
    # what a lab records and what a run asks for must not drift apart (a key that only
    # one side has would make every lab unusable, or any lab usable)
    from vmlab import config
    from vmlab.lab import NestedLab
    from vmlab.stack import lab_options
    monkeypatch.setenv("VMLAB_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    o = config.resolve(None, None)
    have, want = NestedLab(tmp_path / "w", lab_options(o)).shape(), reuse.wanted_shape(o)
    assert set(have) == set(want)
    for k in set(have) - {"image", "guest_image", "accel"}:   # set at boot, not by options
        assert have[k] == want[k], k
    # the agent the lab was given is part of it: an edited host agent is another lab
    assert len(want["agent"]) == 16


# --- the guest of `vmlab guest up` -------------------------------------------------------
def test_guest_shape_compares_what_a_boot_fixes_not_the_guests_own_names():
    from dataclasses import asdict
    from vmlab.guest import GuestOptions
    have = asdict(GuestOptions(extra_qemu_args=["-device", "pcie-root-port,id=vmlab-hp0"]))
    # name, port, boot timeout and devices are the guest's own
    assert reuse.guest_mismatch(have, GuestOptions(name="run1", ssh_port=2300, boot_timeout=9,
                                                   extra_qemu_args=["-device", "ivshmem"])) is None
    assert "memory_mb is 512, this run wants 384" in reuse.guest_mismatch(have, GuestOptions(memory_mb=384))
    assert "gpu" in reuse.guest_mismatch(have, GuestOptions(gpu="blob"))
    assert "align_mappings" in reuse.guest_mismatch(have, GuestOptions(align_mappings="2M"))
    assert "shared_ram" in reuse.guest_mismatch(have, GuestOptions(shared_ram=True))


def test_which_experiments_can_take_their_buffer_by_hot_plug(tmp_path, monkeypatch):
    from vmlab import config as cfgmod
    from vmlab.experiment import hotplug_blocker

    def exp(body, size="1M"):
        p = tmp_path / "e.yaml"
        p.write_text(f"version: 1\nname: e\nexporter: {{kind: vmlab, size: {size}}}\n" + body)
        return cfgmod.load(p)
    plain = "moves:\n  - {mode: MIGRATE, expect: REFAULTED}\n"
    assert hotplug_blocker(exp(plain), {}) is None
    # half a root port's reserved window, the most SeaBIOS's alignment of it allows for sure
    assert hotplug_blocker(exp(plain, "64M"), {}) is None
    assert "BAR (128 MiB) is larger than a hot-plugged BAR can be (64 MiB" in \
        hotplug_blocker(exp(plain, "128M"), {})
    from vmlab import hotplug
    monkeypatch.setattr(hotplug, "HOTPLUG_MAX_BAR", 2 << 20)
    assert hotplug_blocker(exp(plain, "2M"), {}) is None
    assert "BAR (4 MiB) is larger than a hot-plugged BAR can be (2 MiB" in \
        hotplug_blocker(exp(plain, "4M"), {})
    assert "vhost-user" in hotplug_blocker(exp("transport: virtio-shm\n" + plain), {})
    kill = "moves:\n  - {mode: MIGRATE, inject: kill-vmm, expect: VMM_FAULT}\n"
    assert "kills the guest's QEMU" in hotplug_blocker(exp(kill), {})
