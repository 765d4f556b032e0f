"""vmlab matrix's shared guest (CellGuest): which cells run in it, and when it is let go.
The guest is faked at its boundary (boot, liveness, stop); the lab test is test_catalog."""
from __future__ import annotations

from dataclasses import asdict

from vmlab import config as cfgmod
from vmlab import matrix


class FakeGuest:
    boots = 0

    def __init__(self, lab, opts, workdir):
        self.lab, self.opts, self.workdir = lab, opts, workdir
        self.up_called = self.down_called = False
        self.is_alive = True

    def up(self, progress):
        FakeGuest.boots += 1
        self.up_called = True

    def alive(self):
        return self.is_alive

    def down(self):
        self.down_called = True
        return True


def _exp(tmp_path, name, body=""):
    p = tmp_path / f"{name}.yaml"
    p.write_text(f"version: 1\nname: {name}\nexporter: {{kind: vmlab, size: 1M}}\n"
                 f"moves:\n  - {{mode: MIGRATE, expect: REFAULTED}}\n" + body)
    return cfgmod.load(p)


def _opts(**kw):
    o = {"guest_memory_mb": 512, "guest_gpu": "none", "guest_boot_timeout": 240, "guest_align": "4K"}
    o.update(kw)
    return o


def _cg(monkeypatch, tmp_path):
    import vmlab.guest
    monkeypatch.setattr(vmlab.guest, "Guest", FakeGuest)
    FakeGuest.boots = 0
    return matrix.CellGuest(tmp_path, lambda msg: None)


def test_cells_of_one_shape_share_one_guest_with_hot_plug_ports(monkeypatch, tmp_path):
    cg = _cg(monkeypatch, tmp_path)
    lab = object()
    g1 = cg.get(lab, _exp(tmp_path, "a"), _opts())
    g2 = cg.get(lab, _exp(tmp_path, "b"), _opts())
    assert g1 is g2 and FakeGuest.boots == 1
    assert g1.opts.name == "cells" and any("pcie-root-port" in a for a in g1.opts.extra_qemu_args)
    assert not any("ivshmem" in a for a in g1.opts.extra_qemu_args)   # buffers come by hot-plug


def test_another_shape_replaces_the_guest_and_a_blocked_cell_gets_none(monkeypatch, tmp_path):
    cg = _cg(monkeypatch, tmp_path)
    lab = object()
    g1 = cg.get(lab, _exp(tmp_path, "a"), _opts())
    g2 = cg.get(lab, _exp(tmp_path, "b"), _opts(guest_memory_mb=1024))
    assert g1.down_called and g2 is not g1 and g2.opts.memory_mb == 1024
    assert cg.get(lab, _exp(tmp_path, "k", ""), _opts(guest_memory_mb=1024)) is g2
    p = tmp_path / "kill.yaml"
    p.write_text("version: 1\nname: kill\nexporter: {kind: vmlab, size: 1M}\n"
                 "moves:\n  - {mode: MIGRATE, inject: kill-vmm, expect: VMM_FAULT}\n")
    assert cg.get(lab, cfgmod.load(p), _opts(guest_memory_mb=1024)) is None
    assert not g2.down_called     # a cell that boots its own leaves the shared one be


def test_a_rebooted_lab_or_a_dead_guest_means_a_new_guest(monkeypatch, tmp_path):
    cg = _cg(monkeypatch, tmp_path)
    lab1, lab2 = object(), object()
    g1 = cg.get(lab1, _exp(tmp_path, "a"), _opts())
    g2 = cg.get(lab2, _exp(tmp_path, "a"), _opts())
    assert g2 is not g1 and g2.lab is lab2
    g2.is_alive = False
    g3 = cg.get(lab2, _exp(tmp_path, "a"), _opts())
    assert g3 is not g2 and FakeGuest.boots == 3


def test_a_cell_that_leaves_doubt_lets_the_guest_go(monkeypatch, tmp_path):
    cg = _cg(monkeypatch, tmp_path)
    lab = object()
    ok = {"status": "finished", "guest": {}}
    for result, kept in ((ok, True), ({"status": "not_applicable"}, True),
                         ({"status": "finished", "vmm_fault": "kvm run failed"}, False),
                         ({"status": "finished", "kernel_health_failed": ["WARN"]}, False),
                         ({"status": "finished", "guest": {"unplug_error": "timeout"}}, False),
                         ({"status": "error"}, False), ({"status": "could_not_test"}, False),
                         ({"status": "interrupted", "guest": {}}, True)):
        g = cg.get(lab, _exp(tmp_path, "a"), _opts())
        cg.after(result)
        assert (cg.guest is g) is kept and g.down_called is (not kept), result
    assert asdict(cg.get(lab, _exp(tmp_path, "a"), _opts()).opts)["name"] == "cells"


def test_own_guests_turns_sharing_off(monkeypatch, tmp_path):
    import vmlab.guest
    monkeypatch.setattr(vmlab.guest, "Guest", FakeGuest)
    cg = matrix.CellGuest(tmp_path, lambda msg: None, enabled=False)
    assert cg.get(object(), _exp(tmp_path, "a"), _opts()) is None


def test_a_shared_guest_that_does_not_come_up_leaves_the_cell_its_own(monkeypatch, tmp_path):
    from vmlab.errors import BootFailure, WaitTimeout
    cg = _cg(monkeypatch, tmp_path)
    for exc in (BootFailure("cells", "guest kernel panic"), WaitTimeout("QMP socket of cells", 60),
                OSError("lab: cannot make /run/vmlab/cells")):
        def up(self, progress, exc=exc):
            raise exc
        monkeypatch.setattr(FakeGuest, "up", up)
        assert cg.get(object(), _exp(tmp_path, "a"), _opts()) is None and cg.guest is None


def test_doubt_is_one_rule_for_the_matrix_and_the_persistent_guest():
    from vmlab.reuse import guest_doubt
    assert guest_doubt({"status": "finished", "guest": {}}) is None
    assert guest_doubt({"status": "not_applicable"}) is None
    assert "VMM fault" in guest_doubt({"status": "finished", "vmm_fault": "x"})
    assert "health" in guest_doubt({"status": "finished", "kernel_health_failed": ["guest"]})
    assert guest_doubt({"status": "finished", "kernel_health_error": "KeyError: 'x'"}) == \
        "the kernels' health could not be checked (KeyError: 'x')"
    assert "unplug" in guest_doubt({"status": "finished", "guest": {"unplug_error": "x"}})
    assert "status error" == guest_doubt({"status": "error"})
    assert "status could_not_test" == guest_doubt({"status": "could_not_test"})
    assert guest_doubt({"status": "interrupted", "guest": {}}) is None
    assert "unplug" in guest_doubt({"status": "interrupted", "guest": {"unplug_error": "x"}})


def test_a_persistent_guest_left_in_doubt_says_so_in_its_record(tmp_path):
    import json
    from vmlab import reuse
    (tmp_path / "guest.json").write_text(json.dumps({"pid": 7, "opts": {}, "hotplug_ports": 4}))
    reuse.mark_guest_in_doubt(tmp_path, "a VMM fault")
    rec = json.loads((tmp_path / "guest.json").read_text())
    assert rec["doubt"] == "a VMM fault" and rec["pid"] == 7
