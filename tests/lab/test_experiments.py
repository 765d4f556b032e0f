"""Issue: refault experiment. Each test is a real `vmlab run` (lab + guest + exporter +
guest agent) and reads its results directory."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from .conftest import ROOT, qemu_pids, results_dir, vmlab_cmd

EXP = ROOT / "configs" / "experiments"


def run(name: str, config: str | None = None, expect_rc: int = 0, extra=()) -> dict:
    out = results_dir(f"run-{name}")
    args = ["run"] + ([str(EXP / config)] if config else []) + ["--out", str(out), *extra]
    r = vmlab_cmd(*args, timeout=1800)
    assert r.returncode == expect_rc, f"{r.stdout}\n{r.stderr}"
    assert qemu_pids(str(out)) == []
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "finished"
    for f in ("junit.xml", "reproduce.sh", "config.yaml", "lab-console.log", "guest-console.log",
              "lab-dmesg.log", "hostagent.log", "vmlab.log", "guest.qemu.log"):
        assert (out / f).exists(), f
    assert not (out / "id_ed25519").exists()
    res["_dir"] = out
    res["_stdout"] = r.stdout
    return res


def verdicts(res):
    return [m["verdict"] for m in res["moves"]]


def test_default_experiment(images_ready):
    res = run("default")
    assert verdicts(res) == ["REFAULTED"] * 3 + ["STALE"]
    assert res["passed"] is True
    assert all(m["pages"] == {"REFAULTED": 256} for m in res["moves"][:3])
    assert res["moves"][3]["pages"] == {"STALE": 256}
    assert res["guest"]["query_kvm"]["enabled"] is True
    # guest writes survive MIGRATE: the tag written before each move is read after it
    assert all(m["guest_write"]["readback_ok"] for m in res["moves"][:3])
    assert not any("LOST_WRITE" in m["pages"] for m in res["moves"])
    suite = ET.parse(res["_dir"] / "junit.xml").getroot()
    assert suite.get("tests") == "4" and suite.get("failures") == "0"
    assert "PASSED" in res["_stdout"]
    chain = res["caching_chain"]
    assert chain["exporter"]["caching"] == "WB" and chain["lab_host_pte"]["memtype"] == "WB"
    assert chain["guest"]["memtype"] == "uncached-minus"


def test_caching_change_during_migrate(images_ready):
    res = run("caching", "caching-wb-to-wc.yaml")
    assert verdicts(res) == ["REFAULTED", "REFAULTED"]
    assert res["moves"][0]["exporter_info"]["caching"] == "WC"
    assert res["moves"][0]["exporter_info"]["vm_prot"] == "WC"
    assert res["moves"][1]["exporter_info"]["caching"] == "WB"


def test_udmabuf(images_ready):
    res = run("udmabuf", "udmabuf.yaml")
    assert res["caching_chain"]["exporter"]["kind"] == "udmabuf"
    assert verdicts(res) == ["STALE"]
    assert "punched" in res["moves"][0]["exporter_note"]


def test_dmaheap_move_unsupported(images_ready):
    res = run("dmaheap", "dmaheap.yaml")
    assert verdicts(res) == ["UNSUPPORTED"]
    assert "unsupported" in res["moves"][0]["detail"]
    assert res["baseline"]["verdict"] == "REFAULTED"


def test_dmaheap_high_order_recorded_honestly(images_ready):
    res = run("dmaheap-1m", "dmaheap-1m.yaml")
    if res["baseline"]["verdict"] == "VMM_FAULT":
        assert "kvm run failed" in res["vmm_fault"].lower()
        assert verdicts(res) == ["VMM_FAULT"]
    else:
        assert res["baseline"]["verdict"] == "REFAULTED" and verdicts(res) == ["UNSUPPORTED"]


@pytest.mark.parametrize("config", ["noncompound.yaml", "compound.yaml"])
def test_high_order_allocations_recorded_honestly(images_ready, config):
    res = run(config.split(".")[0], config)
    v = set(verdicts(res))
    assert v <= {"REFAULTED", "VMM_FAULT"}
    if "VMM_FAULT" in v:
        assert "kvm run failed" in res["vmm_fault"].lower(), res["vmm_fault"]
    else:
        assert res["baseline"]["verdict"] == "REFAULTED"


def test_zap_only(images_ready):
    res = run("zap-only", "zap-only.yaml")
    assert verdicts(res) == ["REFAULTED", "REFAULTED"]
    assert res["moves"][0]["generation"] == 1 and res["moves"][1]["generation"] == 2


def test_100_moves_with_concurrent_guest_reads(images_ready):
    res = run("watch-100", "watch-100.yaml")
    assert verdicts(res) == ["REFAULTED"] * 100
    assert all(m["watch"]["seen"] for m in res["moves"])
    lat = res["watch"]["move_to_guest_latency_s"]
    assert lat["n"] == 100 and lat["p50"] <= lat["p99"]


def test_killed_vmm_is_a_verdict_not_a_hang(images_ready):
    res = run("kill-vmm", "kill-vmm.yaml")
    assert verdicts(res) == ["REFAULTED", "VMM_FAULT", "VMM_FAULT"]
    assert "exited" in res["vmm_fault"]
    assert (res["_dir"] / "guest.qemu.log").exists()


def test_expectation_mismatch_fails_the_run(images_ready, tmp_path):
    cfg = tmp_path / "wrong.yaml"
    cfg.write_text((EXP / "default.yaml").read_text().replace("expect: STALE", "expect: REFAULTED")
                   .replace("name: default", "name: wrong-expectation"))
    out = results_dir("run-wrong-expectation")
    r = vmlab_cmd("run", str(cfg), "--out", str(out), timeout=1800)
    assert r.returncode == 1
    res = json.loads((out / "results.json").read_text())
    assert res["passed"] is False and res["moves"][3]["verdict"] == "STALE"
    assert "MISMATCH" in r.stdout


def test_gpu_blob_screendump_round_trip(images_ready):
    res = run("gpu-blob", "gpu-blob.yaml")
    g = res["virtio_gpu"]
    assert g["probe"]["resource_blob"] is True
    for shot in ("screendump_1", "screendump_2"):
        assert g[shot]["ok"] and g[shot]["mismatches"] == 0 and g[shot]["checked"] > 0
    assert g["scanout"]["seed"] != g["rewrite"]["seed"]


def test_gpu_host_blob_round_trip(images_ready):
    res = run("gpu-host-blob", "gpu-host-blob.yaml")
    g = res["virtio_gpu"]
    assert g["probe"]["host_visible"] is True and g["probe"]["context_init"] is True
    assert g["guest"]["readback_ok"] is True and g["guest"]["ctx"] is True
    assert g["host_view"]["found"]
    assert all("memfd" not in h["name"] for h in g["host_view"]["hits"])
    mi = res["caching_chain"]["virtio_gpu_map_info"]
    assert mi["value"] in (1, 2, 3) and mi["guest_memtype"]


def test_backports_kernel_under_test(images_ready):
    """The kernel under test swapped without rebooting anything: a 7.x lab kernel from
    trixie-backports (its image is built here if missing) runs KVM for a 6.12 guest.
    (A 7.3 *guest* kernel panics on an XSAVE size mismatch of the TCG-emulated CPU.)"""
    res = run("backports", extra=["--kernel", "trixie-backports", "--guest-kernel", "trixie"])
    assert int(res["lab"]["kernel"].split(".")[0]) >= 7, res["lab"]["kernel"]
    assert res["guest"]["kernel"].startswith("6.12")
    assert verdicts(res) == ["REFAULTED"] * 3 + ["STALE"]
