"""Issue: regression catalog. The whole catalog on the two CI kernels (trixie 6.12 and
trixie-backports 7.3) through `vmlab matrix`, for real: one lab boot per kernel, a guest
per cell; then a matrix that must fail. Reads matrix.json and each cell's results."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vmlab import catalog
from vmlab.versions import matches

from .conftest import qemu_pids, results_dir, vmlab_cmd

KERNELS = ["trixie", "trixie-backports"]


@pytest.fixture(scope="module")
def catalog_matrix(images_ready):
    out = results_dir("catalog-matrix")
    r = vmlab_cmd("matrix", "--kernels", ",".join(KERNELS), "--out", str(out), timeout=3000)
    doc = json.loads((out / "matrix.json").read_text())
    return r, out, doc


def _cell(doc, entry, kernel):
    [c] = [c for c in doc["cells"] if c["entry"] == entry and c["kernel_suite"] == kernel]
    return c, json.loads((Path(c["results"]) / "results.json").read_text())


# Cells this lab cannot judge, and why (measured): a TCG lab's L2 guest has no AVX (its
# kernel turns XSAVE off: "XSAVE consistency problem"). Anything else must match.
NOT_APPLICABLE_HERE = {"ro-pte-avx-store": "the guest has no AVX"}


def test_catalog_matches_on_both_kernels(catalog_matrix):
    r, out, doc = catalog_matrix
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr[-4000:]}"
    entries = [e.name for e in catalog.load()]
    assert doc["status"] == "finished" and doc["kernels"] == KERNELS
    assert sorted((c["entry"], c["kernel_suite"]) for c in doc["cells"]) == \
        sorted((e, k) for e in entries for k in KERNELS)
    for c in doc["cells"]:
        if c["entry"] in NOT_APPLICABLE_HERE and c["match"] is None:
            assert NOT_APPLICABLE_HERE[c["entry"]] in c["reason"], c
        else:
            assert c["match"] is True, c
    assert qemu_pids(str(out)) == []
    # one lab boot per kernel, reused by every cell of it; the cells whose buffer can
    # arrive by hot-plug share the lab's guest (issue speed), the others boot their own
    from vmlab.experiment import hotplug_blocker
    for k in KERNELS:
        assert (out / k / "lab" / "lab-console.log").exists()
        boots = {_cell(doc, e, k)[1]["lab"]["boot_seconds"] for e in entries}
        assert len(boots) == 1, boots
        shared = {e.name: (_cell(doc, e.name, k)[1].get("guest") or {}).get("reused_from")
                  for e in catalog.load() if _cell(doc, e.name, k)[0]["match"] is not None}
        eligible = {e.name for e in catalog.load() if e.name in shared and hotplug_blocker(e, {}) is None}
        assert {n for n, v in shared.items() if v} <= eligible, (shared, eligible)
        # every eligible cell ran in the shared guest, but for one whose shared guest did
        # not boot (a TCG boot flake: that cell boots its own, as before)
        assert len(eligible - {n for n, v in shared.items() if v}) <= 1, (shared, eligible)
    suite = ET.parse(out / "junit.xml").getroot()
    assert suite.get("tests") == str(len(doc["cells"])) and suite.get("failures") == "0"
    assert suite.get("skipped") == str(doc["summary"]["not_applicable"])
    assert doc["summary"]["not_applicable"] <= len(NOT_APPLICABLE_HERE) * len(KERNELS)
    assert {t.get("name") for t in suite} == {f"{e}[{k}]" for e in entries for k in KERNELS}
    page = (out / "report.html").read_text()
    assert page.count('class="match"') == doc["summary"]["match"] and "lore.kernel.org" in page
    assert "cell 1/" in r.stderr    # progress per cell


def test_every_cell_says_what_it_ran_with(catalog_matrix):
    _, _, doc = catalog_matrix
    for c in doc["cells"]:
        if c["match"] is None:
            continue
        assert c["kernel_package"] not in (None, "", "-"), c
        assert "console=ttyS0" in c["kernel_cmdline"]
        assert "max_quarantine_mb" in c["module_params"]["vmlab_exporter"], c["module_params"]
        assert c["module_params"]["kvm_amd"]["npt"] == "Y"
        g = json.loads((Path(c["results"]) / "results.json").read_text())["guest"]
        guest = g["name"]
        for f in ("results.json", "reproduce.sh", "config.yaml", f"{guest}-console.log", "lab-dmesg.log",
                  "junit.xml"):
            assert (Path(c["results"]) / f).exists(), (c["results"], f)
        if "hotplug" in g and "unplug_error" not in g:
            # the shared guest's log after the cell's unplug (from its guest agent): kernel
            # lines, the hot-plugged device's among them, no agent framing (a guest whose
            # VMM stopped is not unplugged, nor asked: its QEMU is stopped with the cell)
            lines = (Path(c["results"]) / f"{guest}-dmesg.log").read_text().splitlines()
            assert lines and all(ln.startswith("[") for ln in lines[-20:]), c["results"]
            assert any(g["hotplug"]["bdf"] in ln for ln in lines), c["results"]
        assert f"--kernel={c['kernel_suite']}" in Path(c["reproduce"]).read_text()


def test_version_keyed_expectations_resolve_per_kernel(catalog_matrix):
    """The refcount rule (f8be156be163 until "KVM: Stop grabbing references to PFNMAP'd
    pages" in 6.13): refused below 6.13, mapped from 6.13, on the kernel that booted."""
    _, _, doc = catalog_matrix
    for entry in ("pfnmap-noncompound", "pfnmap-compound", "dmaheap-order4", "dmaheap-order8",
                  "udmabuf-hugetlb", "udmabuf-thp"):
        for k in KERNELS:
            c, res = _cell(doc, entry, k)
            new = matches(">=6.13", c["kernel_release"])
            want = "REFAULTED" if new else "VMM_FAULT"
            assert c["expected"][0] == [want] and c["verdicts"][0] == want, (entry, k, c)
            if not new:
                assert "kvm run failed" in res["vmm_fault"].lower(), res["vmm_fault"]
    releases = {k: _cell(doc, "calibration", k)[0]["kernel_release"] for k in KERNELS}
    assert not matches(">=6.13", releases["trixie"]) and matches(">=7.0", releases["trixie-backports"])
    # the kernel under test swapped without rebooting anything; the guest stays trixie's 6.12
    for k in KERNELS:
        assert _cell(doc, "calibration", k)[1]["guest"]["kernel"].startswith("6.12"), k


def test_entries_show_their_evidence(catalog_matrix):
    _, _, doc = catalog_matrix
    for k in KERNELS:
        _, res = _cell(doc, "dmaheap-order0", k)
        assert res["moves"] == [] and res["baseline"]["pages"] == {"REFAULTED": 8}
        _, res = _cell(doc, "udmabuf-shmem", k)
        assert res["caching_chain"]["exporter"]["kind"] == "udmabuf"
        assert "punched" in res["moves"][0]["exporter_note"]
        _, res = _cell(doc, "calibration", k)
        z = res["moves"][0]["zap_evidence"]
        assert z["ok"] and z["zaps"] == 1 and z["refaulted_pages"] == 256
        assert [m["verdict"] for m in res["moves"]] == ["REFAULTED", "REFAULTED", "STALE"]
        # KVM's own evidence: the zap dropped every spte to the old pfns, the refault
        # mapped the new ones; MIGRATE_NO_ZAP left them all (the STALE says so)
        mig, nozap = res["moves"][1]["kvm_evidence"], res["moves"][2]
        assert mig["zapped_pages"] == 256 and mig["mapped_new_pages"] == 256 and mig["mapped_old_pages"] == 0
        assert mig["zapped_sptes_by_level"] == {"4K": 256}, mig
        assert nozap["kvm_evidence"]["kept_old_pages"] == 256
        assert "KVM kept 256 sptes to old pfns" in nozap["detail"]
        _, res = _cell(doc, "caching-wc-uc", k)
        assert res["caching_chain"]["exporter"]["caching"] == "WC"
        assert res["caching_chain"]["exporter"]["vm_prot"] == "WC"
        assert res["moves"][0]["exporter_info"]["caching"] == "UC"
        assert res["moves"][1]["exporter_info"]["caching"] == "WB"
        # each layer as read from that layer: the guest asked WB (/dev/mem on the BAR) and
        # Linux gave it uncached-minus (measured); the host's WC does not reach it (NPT)
        chain = res["caching_chain"]
        assert chain["guest"]["requested"] == "wb" and chain["lab_host_pte"]["memtype"] == "WC"
        assert any(m.startswith("guest asked wb but got ") for m in chain["mismatches"]), chain
        assert any("NPT does not carry host PAT" in m for m in chain["mismatches"]), chain
        # read-only PTE, then a store: KVM emulated it, the exporter upgraded every page
        _, res = _cell(doc, "ro-pte-plain-store", k)
        first = res["moves"][0]
        assert first["guest_write"]["store"] == "plain" and first["guest_write"]["readback_ok"]
        # a write fault on each of the buffer's 16 read-only pages, the exporter's
        # pfn_mkwrite for each (KVM's emulated store wrote through the VMM's mapping)
        assert first["kvm_evidence"]["write_faults"] >= 16, first["kvm_evidence"]
        assert first["exporter_info"]["mkwrites"] >= 16, first["exporter_info"]
        _, res = _cell(doc, "vgem-read-then-write", k)
        assert res["caching_chain"]["exporter"]["kind"] == "vgem" and res["moves"][0]["pages"] == {"REFAULTED": 16}
        # huge PFNMAP: QEMU's BAR mapping 2 MiB-aligned (the preload), the exporter mapped
        # the block with a PMD and KVM with a 2 MiB nested entry; one page moving drops that
        # entry whole, the block comes back at 4 KiB, and only the moved page is new
        _, res = _cell(doc, "huge-pfnmap", k)
        assert res["vmm_mapping"]["aligned_2m"] is True, res["vmm_mapping"]
        assert res["baseline"]["exporter_info"]["pmd_faults"] >= 1
        one, whole, nozap = res["moves"]
        assert one["page_range"] == {"first": 300, "count": 1} and one["pages"] == {"REFAULTED": 512}
        ev = one["kvm_evidence"]
        assert ev["zapped_sptes_by_level"] == {"2M": 1} and ev["kept_old_pages"] == 0, ev
        # after the move the block maps at 4 KiB (a 2M entry may show from the guest's write
        # before the move: its write fault rebuilds the 2 MiB spte)
        assert ev["mapped_sptes_by_level"].get("4K") == 512, ev
        assert nozap["pages"] == {"REFAULTED": 511, "STALE": 1}
        assert nozap["examples"]["STALE"]["page"] == 7
        assert nozap["kvm_evidence"]["kept_old_pages"] == 1, nozap["kvm_evidence"]
        # the same without the preload: QEMU's own 4 KiB alignment (a 2 MiB-aligned start
        # by chance is 1 in 512 under ASLR: then the PMD path must show instead)
        _, res = _cell(doc, "huge-pfnmap-qemu-unaligned", k)
        vm, one = res["vmm_mapping"], res["moves"][0]
        assert vm["align_mappings"] == "4K" and len(vm["vmas"]) == 1, vm
        if vm["aligned_2m"]:
            assert one["kvm_evidence"]["zapped_sptes_by_level"] == {"2M": 1}, one["kvm_evidence"]
        else:
            assert "not 2 MiB-aligned" in vm["note"], vm
            assert one["kvm_evidence"]["zapped_sptes_by_level"] == {"4K": 1}, one["kvm_evidence"]
        assert one["pages"] == {"REFAULTED": 512}


def test_a_cell_that_misses_fails_the_matrix_and_keeps_its_results(images_ready, tmp_path):
    """A catalog whose entry expects the wrong thing: exit 1, the cell is match false with
    the reason, junit has the failure, the cell's results directory stays."""
    cat = tmp_path / "catalog"
    cat.mkdir()
    (cat / "wrong.yaml").write_text(
        "version: 1\nname: wrong\ntitle: a move without a zap cannot refault\nlinks: [abc1234]\n"
        "why: deliberately wrong, to see the matrix fail\nguest: {gpu: none}\n"
        "exporter: {kind: vmlab, size: 64K, caching: WB, alloc: ORDER0}\n"
        "moves:\n  - {mode: MIGRATE_NO_ZAP, expect: REFAULTED}\n")
    out = results_dir("catalog-wrong")
    r = vmlab_cmd("matrix", "--kernels", "trixie", "--catalog", str(cat), "--out", str(out), timeout=900)
    assert r.returncode == 1, f"{r.stdout}\n{r.stderr[-3000:]}"
    doc = json.loads((out / "matrix.json").read_text())
    [c] = doc["cells"]
    assert c["match"] is False and "STALE (expected REFAULTED)" in c["reason"], c
    assert (out / "trixie" / "wrong" / "results.json").exists()
    suite = ET.parse(out / "junit.xml").getroot()
    assert suite.get("failures") == "1"
    assert 'class="mismatch"' in (out / "report.html").read_text()
    assert "MISMATCH" in r.stdout
    assert qemu_pids(str(out)) == []
