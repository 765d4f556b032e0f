"""Issue: the VMM's own path. The buffer in a VIRTIO shared memory region (QEMU 11.1's
vhost-user SHMEM_MAP through vhost-user-test-device-pci, mapped by the host agent's
back-end) instead of an ivshmem BAR, and the VMM's "remap on move" strategy. Real runs on
a trixie-backports lab (kernel 7.3, QEMU 11.1)."""
from __future__ import annotations

import json

import pytest
import yaml

from .conftest import ROOT, qemu_pids, results_dir, vmlab_cmd

EXP = ROOT / "configs" / "experiments"
KERNEL = "trixie-backports"
RECORD = {"title": "vmlab's VIRTIO shared memory transport",
          "links": ["20251111091058.879669-1-aesteve@redhat.com", "722e9022a0b6"],
          "why": "vhost-user SHMEM_MAP (QEMU 11.1) maps the dma-buf into the device's region"}


def verdicts(res):
    return [m["verdict"] for m in res["moves"]]


REFUSED_MAP = dict(RECORD, version=1, name="virtio-shm-refused-map", transport="virtio-shm",
                   vmm_on_move="remap", guest={"gpu": "none"},
                   exporter={"kind": "vmlab", "size": "1M", "caching": "WB", "alloc": "ORDER0"},
                   moves=[{"mode": "MIGRATE", "expect": "REFAULTED"},
                          {"mode": "MIGRATE", "inject": "refused-map", "expect": "VMM_FAULT"},
                          {"mode": "MIGRATE", "expect": "REFAULTED"}])


@pytest.mark.nightly   # core tier under 30 min on 2 cores, cold cache (DESIGN.md CI tiers)
def test_virtio_shm_same_verdicts_as_ivshmem_and_remap_refaults(images_ready, tmp_path):
    """One trixie-backports lab, four guests: the default moves over ivshmem, the same
    over virtio-shm, the same under the VMM's remap strategy, and a SHMEM_MAP that QEMU
    refuses (a verdict, not a hang, and the VMM lives on)."""
    cat = tmp_path / "catalog"
    cat.mkdir()
    for name in ("default", "virtio-shm", "virtio-shm-remap"):
        doc = yaml.safe_load((EXP / f"{name}.yaml").read_text())
        doc.pop("lab", None)
        doc.update(RECORD)
        (cat / f"{name}.yaml").write_text(yaml.safe_dump(doc))
    (cat / "virtio-shm-refused-map.yaml").write_text(yaml.safe_dump(REFUSED_MAP))
    out = results_dir("virtio-shm-matrix")
    r = vmlab_cmd("matrix", "--kernels", KERNEL, "--catalog", str(cat), "--out", str(out), timeout=1800)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr[-3000:]}"
    assert qemu_pids(str(out)) == []
    res = {n: json.loads((out / KERNEL / n / "results.json").read_text())
           for n in ("default", "virtio-shm", "virtio-shm-remap", "virtio-shm-refused-map")}
    ivshmem, shm, remap = res["default"], res["virtio-shm"], res["virtio-shm-remap"]
    assert ivshmem["lab"]["qemu"].startswith("11.1") and "vmm" not in ivshmem

    # the same verdicts, page for page, over the two transports
    assert verdicts(shm) == verdicts(ivshmem) == ["REFAULTED"] * 3 + ["STALE"]
    assert [m["pages"] for m in shm["moves"]] == [m["pages"] for m in ivshmem["moves"]]
    vmm = shm["vmm"]
    assert vmm["transport"] == "virtio-shm" and vmm["bar"] == 4 and vmm["on_move"] == "none"
    assert vmm["guest_start"]["status"] & 4, vmm["guest_start"]          # DRIVER_OK
    assert vmm["backend"]["mapped"] and vmm["backend"]["counts"]["maps"] == 1
    assert vmm["memslot_seen_s"] is not None            # the baseline read came after the commit
    # the VMM did nothing on a move: no memslot change; without the zap KVM kept every spte
    assert all(m["memslot_evidence"]["deleted"] == 0 for m in shm["moves"]), shm["moves"]
    assert shm["moves"][3]["kvm_evidence"]["kept_old_pages"] == 256
    assert set(shm["kernel_health"]) == {"lab", "guest"} and all(h["ok"] for h in shm["kernel_health"].values())

    # remap: the exporter's skipped zap does not matter, the VMM's unmap tore it down
    assert verdicts(remap) == ["REFAULTED"] * 4
    nozap = remap["moves"][3]
    assert nozap["mode"] == "MIGRATE_NO_ZAP" and nozap["pages"] == {"REFAULTED": 256}
    for m in remap["moves"]:
        ev = m["memslot_evidence"]
        assert ev["recreated"] and ev["deleted"] >= 1 and ev["created"] >= 1 and ev["failed"] == 0, ev
        assert m["vmm_remap"]["state"]["mapped"], m["vmm_remap"]
        assert m["vmm_remap"]["memslot_seen_s"] is not None, m["vmm_remap"]   # read after the commit
        assert m["kvm_evidence"]["kept_old_pages"] == 0, m["kvm_evidence"]
        assert m["kvm_evidence"].get("zap_all_fast", 0) >= 1, m["kvm_evidence"]
    assert remap["vmm"]["backend"]["counts"]["map_failures"] == 0
    assert set(remap["kernel_health"]) == {"lab", "guest"} and all(h["ok"] for h in remap["kernel_health"].values())
    # QEMU refused the map (a length past the region): that move's verdict; the next
    # move's map works again in the same guest
    refused = res["virtio-shm-refused-map"]
    assert verdicts(refused) == ["REFAULTED", "VMM_FAULT", "REFAULTED"]
    bad = refused["moves"][1]
    assert "SHMEM_MAP after the move failed" in bad["detail"] and "refused" in bad["detail"], bad
    assert bad["vmm_remap"]["state"]["counts"]["map_failures"] == 1
    assert "vmm_fault" not in refused
    assert refused["moves"][2]["vmm_remap"]["state"]["mapped"]
    qlog = (out / KERNEL / "virtio-shm-refused-map" / "guest.qemu.log").read_text()
    assert "Bad offset/len for mmap" in qlog, qlog[-2000:]


def test_virtio_shm_on_qemu_10_is_refused_before_boot(images_ready):
    """trixie's lab carries QEMU 10.0: no SHMEM_MAP. One line, exit 2, nothing boots."""
    out = results_dir("virtio-shm-qemu10")
    r = vmlab_cmd("run", str(EXP / "virtio-shm.yaml"), "--kernel", "trixie", "--out", str(out),
                  timeout=600)
    assert r.returncode == 2, f"{r.stdout}\n{r.stderr}"
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("vmlab: ")]   # not progress lines
    assert len(err) == 1 and "virtio-shm.yaml" in err[0] and "QEMU >= 11.1" in err[0], r.stderr
    assert "10.0" in err[0]
    assert not (out / "lab-console.log").exists()   # refused before the lab booted
    assert qemu_pids(str(out)) == []


@pytest.mark.nightly   # 100 remap cycles with a watcher: about 150 s under TCG
def test_100_remap_cycles_in_watch_mode(images_ready):
    out = results_dir("virtio-shm-remap-watch")
    r = vmlab_cmd("run", str(EXP / "virtio-shm-remap-watch.yaml"), "--out", str(out), timeout=1800)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr[-3000:]}"
    res = json.loads((out / "results.json").read_text())
    assert verdicts(res) == ["REFAULTED"] * 100
    for m in res["moves"]:
        w = m["watch"]
        assert w["seen"] and w["stale_observations"] == 0, w
        assert w["holes_outside_window"] == 0, w      # holes only while the region was unmapped
        assert m["memslot_evidence"]["recreated"], m["memslot_evidence"]
    assert res["vmm"]["backend"]["counts"]["map_failures"] == 0
    assert set(res["kernel_health"]) == {"lab", "guest"} and all(h["ok"] for h in res["kernel_health"].values())
    assert qemu_pids(str(out)) == []

