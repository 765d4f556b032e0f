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
    # both VMMs on record: trixie's QEMU in the lab, this machine's running the lab
    assert res["lab"]["qemu"].split(".")[0].isdigit() and "Debian" in res["lab"]["qemu"]
    assert res["lab"]["outer_qemu"].split(".")[0].isdigit()
    # guest writes survive MIGRATE: the tag written before each move is read after it
    assert all(m["guest_write"]["readback_ok"] for m in res["moves"][:3])
    assert not any("LOST_WRITE" in m["pages"] for m in res["moves"])
    suite = ET.parse(res["_dir"] / "junit.xml").getroot()
    assert suite.get("tests") == "6" and suite.get("failures") == "0"  # baseline + 4 moves + the run
    assert all(h["ok"] for h in res["kernel_health"].values()) and set(res["kernel_health"]) == {"lab", "guest"}
    # verified MIGRATEs released their old generations as they went; what is left (the
    # NO_ZAP control's retired set and the last pages) is released once the guest is gone
    assert [m.get("released_pages") for m in res["moves"]] == [256, 256, 256, None]
    assert res["released_at_end"] == 512
    assert "PASSED" in res["_stdout"]
    chain = res["caching_chain"]
    assert chain["exporter"]["caching"] == "WB" and chain["lab_host_pte"]["memtype"] == "WB"
    assert chain["guest"]["memtype"] == "uncached-minus"
    assert res["moves"][3]["page_map"] == [["STALE", 256]]
    # the agent's own time on each move is part of the move's round trip, never more
    assert all(0 < m["phases_s"]["move_in_lab"] <= m["phases_s"]["move"] for m in res["moves"])
    check_report_in_browser(res["_dir"] / "report.html", moves=4)


def check_report_in_browser(page, moves: int):
    """report.html as Chromium renders it: the verdict table, a page map per read, the
    caching chain, the latency plot and the environment are in the DOM, and the
    screenshot shows the verdict colours (the page maps: green pages, and the control's
    red ones)."""
    from tests.browser import colour_pixels, hex_rgb, render
    from vmlab.report import PALETTE
    dom, img = render(page)
    assert dom.count("<tr class=") == 1 + moves          # baseline + moves, verdict table
    assert dom.count('class="pagemap"') == 1 + moves
    assert dom.count('class="box') == 4 and 'id="caching-chain"' in dom
    assert "<svg" in dom.split('id="latency"', 1)[1].split("</div>", 1)[0]
    assert 'id="environment"' in dom and "lab QEMU" in dom and "host CPU" in dom
    assert colour_pixels(img, hex_rgb(PALETTE["REFAULTED"])) > 2000, "no green page map"
    assert colour_pixels(img, hex_rgb(PALETTE["STALE"])) > 2000, "no red page map for the control"


def test_zap_only(images_ready):
    res = run("zap-only", "zap-only.yaml")
    assert verdicts(res) == ["REFAULTED", "REFAULTED", "NOT_ZAPPED"]
    assert res["moves"][0]["generation"] == 1 and res["moves"][1]["generation"] == 2
    z = res["moves"][0]["zap_evidence"]
    assert z["ok"] and z["zaps"] == 1 and z["refaulted_pages"] == 256 and z["faults"] >= 256
    # the negative control: stamps alone say REFAULTED; the counters say nothing happened
    ctl = res["moves"][2]
    assert ctl["pages"] == {"REFAULTED": 256}
    assert ctl["zap_evidence"]["ok"] is False and ctl["zap_evidence"]["zaps"] == 0
    assert "zap changed nothing" in ctl["detail"]


@pytest.mark.nightly   # core tier under 30 min on 2 cores, cold cache (DESIGN.md CI tiers)
def test_watch_observations_decide(images_ready):
    res = run("watch-no-zap", "watch-no-zap.yaml")
    assert verdicts(res) == ["REFAULTED"] * 3 + ["STALE"]
    assert all(m["watch"]["stale_observations"] == 0 for m in res["moves"][:3])
    # each verified move released the generation before it: the quarantine stays bounded
    assert [m["released_pages"] for m in res["moves"][:3]] == [256] * 3
    w = res["moves"][3]["watch"]
    assert w["stale_observations"] > 0 and w["retired_seen"] > 0
    assert "RETIRED" in res["moves"][3]["detail"]


@pytest.mark.nightly   # 100 watched moves: 107 s of the tier; watch-no-zap covers the watcher in CI
def test_100_moves_with_concurrent_guest_reads(images_ready):
    res = run("watch-100", "watch-100.yaml")
    assert verdicts(res) == ["REFAULTED"] * 100
    assert all(m["watch"]["seen"] and m["watch"]["stale_observations"] == 0 for m in res["moves"])
    # verified moves release their old generations: the quarantine stays bounded
    assert all(m["released_pages"] == 256 for m in res["moves"])
    assert res["final_exporter_info"]["quarantined_pages"] <= 256
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


@pytest.mark.nightly   # core tier under 30 min on 2 cores, cold cache (DESIGN.md CI tiers)
def test_gpu_blob_screendump_round_trip(images_ready):
    res = run("gpu-blob", "gpu-blob.yaml")
    g = res["virtio_gpu"]
    assert g["probe"]["resource_blob"] is True
    for shot in ("screendump_1", "screendump_2"):
        assert g[shot]["ok"] and g[shot]["mismatches"] == 0 and g[shot]["checked"] > 0
    assert g["scanout"]["seed"] != g["rewrite"]["seed"]


@pytest.mark.nightly   # core tier under 30 min on 2 cores, cold cache (DESIGN.md CI tiers)
def test_gpu_host_blob_round_trip(images_ready):
    res = run("gpu-host-blob", "gpu-host-blob.yaml")
    g = res["virtio_gpu"]
    assert g["probe"]["host_visible"] is True and g["probe"]["context_init"] is True
    assert g["guest"]["readback_ok"] is True and g["guest"]["ctx"] is True
    assert g["host_view"]["found"]
    assert all("memfd" not in h["name"] for h in g["host_view"]["hits"])
    mi = res["caching_chain"]["virtio_gpu_map_info"]
    assert mi["value"] in (1, 2, 3) and mi["guest_memtype"]


# nightly: its lab image (trixie with trixie-backports' QEMU) is a third image build on a
# cold cache, about 100 s; --qemu belongs to the your-VMM work of issue 10
@pytest.mark.nightly
def test_qemu_from_another_suite(images_ready):
    """--qemu suite:trixie-backports in a trixie lab: the kernel under test stays trixie's,
    the VMM is backports' (QEMU 11.x), and results.json says which and from where."""
    res = run("qemu-bpo", extra=["--qemu", "suite:trixie-backports"])
    assert res["passed"] is True
    assert res["lab"]["kernel"].startswith("6.12."), res["lab"]["kernel"]
    assert res["lab"]["qemu"].startswith("11."), res["lab"]["qemu"]
    assert res["lab"]["qemu_source"] == "suite:trixie-backports"
