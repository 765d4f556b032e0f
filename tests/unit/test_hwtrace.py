"""The hardware oracle's pure parts: its verdict, how it combines with the stamps, the
patch filter for qemu-plugin.h, and how `oracle: [stamps, hw]` shapes the options. The
plugin itself runs in real QEMU in tests/lab/test_hwtrace.py."""
from types import SimpleNamespace

import pytest

from vmlab import config, hwtrace
from vmlab.errors import ConfigError


def dump(old_hits=0, old_pages_hit=0, new_hits=0, new_pages_hit=0, pages=256, other=0, io=0,
         no_hwaddr=0, before_retire=0, before_move=0):
    return {"epoch": 1, "in_range": old_hits + new_hits + other + io + no_hwaddr + before_retire,
            "io": io, "no_hwaddr": no_hwaddr, "other": other,
            "old": {"pages": pages, "hits": old_hits, "pages_hit": old_pages_hit,
                    "before_retire": before_retire, "before_move": before_move},
            "new": {"pages": pages, "hits": new_hits, "pages_hit": new_pages_hit},
            "first_old_hit_ns": 10_001_500 if old_hits else None,
            "old_hits": [{"pfn": 7, "vaddr": hwtrace.GUEST_MAP_VA, "pc": 0x406358, "ns": 10_001_500,
                          "store": False}] if old_hits else [],
            "old_hits_by_pc": [{"pc": 0x406358, "hits": old_hits, "vaddr_min": hwtrace.GUEST_MAP_VA,
                                "vaddr_max": hwtrace.GUEST_MAP_VA + 8}] if old_hits else [],
            "old_hits_other_pcs": 0, "samples": []}


def test_every_page_at_its_new_pfn_is_hw_refaulted():
    v = hwtrace.verdict(dump(new_hits=131072, new_pages_hit=256, before_retire=4096), 256, 10_000_000)
    assert v["verdict"] == "HW_REFAULTED"
    assert v["guest_hits_old"] == 0 and v["guest_hits_new"] == 131072
    assert v["hits_before_retire"] == 4096   # the old pages, read while they were current


def test_one_access_to_a_retired_page_is_hw_stale_whatever_else_was_seen():
    v = hwtrace.verdict(dump(old_hits=1, old_pages_hit=1, new_hits=131071, new_pages_hit=256), 256,
                        10_000_000)
    assert v["verdict"] == "HW_STALE"
    assert v["old_hits"][0]["pc"] == "0x406358" and v["first_old_hit_ns"] == 1500
    assert v["old_hits"][0]["ns_after_move"] == 1500 and v["old_hits_by_pc"][0]["hits"] == 1


@pytest.mark.parametrize("d", [
    dump(new_hits=1000, new_pages_hit=255),                          # a page never seen
    dump(),                                                          # the oracle saw nothing
    dump(new_hits=131072, new_pages_hit=256, other=1),               # one access went elsewhere
    dump(new_hits=131072, new_pages_hit=256, io=1),                  # one was I/O
    dump(new_hits=131072, new_pages_hit=256, no_hwaddr=1),           # one had no address
    dump(new_hits=131072, new_pages_hit=256, pages=255),             # the sets are not the buffer
    dump(new_hits=131072, new_pages_hit=256, before_move=1),         # an older stale mapping
], ids=["page-unseen", "nothing", "elsewhere", "io", "no-hwaddr", "wrong-set", "before-move"])
def test_a_read_the_hardware_cannot_account_for_has_no_hw_verdict(d):
    v = hwtrace.verdict(d, 256, 10_000_000)
    assert v["verdict"] is None and "cannot vouch" in v["detail"]


def test_an_empty_buffer_is_never_hw_refaulted():
    assert hwtrace.verdict(dump(pages=0), 0)["verdict"] is None


def test_combine_takes_the_worse_and_fails_what_it_cannot_reconcile():
    stale = {"verdict": "HW_STALE", "detail": "x"}
    fine = {"verdict": "HW_REFAULTED", "detail": "y"}
    assert hwtrace.combine("REFAULTED", fine) == ("REFAULTED", None, False)
    v, why, bad = hwtrace.combine("REFAULTED", stale)
    assert v == "HW_STALE" and "disagree" in why and not bad
    assert hwtrace.combine("STALE", stale) == ("STALE", None, False)
    v, why, bad = hwtrace.combine("STALE", fine)           # one oracle is wrong: never a pass
    assert v == "STALE" and "disagree" in why and bad
    for content in ("TORN", "LOST_WRITE", "NOT_ZAPPED"):  # about content/counters: consistent
        assert hwtrace.combine(content, fine) == (content, None, False)
    v, why, bad = hwtrace.combine("REFAULTED", {"verdict": None, "detail": "blind"})
    assert v == "REFAULTED" and "no verdict" in why and bad
    assert hwtrace.combine("TORN", None) == ("TORN", None, False)


def test_patch_filter_keeps_only_the_header_sections():
    patch = ("diff --git a/VERSION b/VERSION\n--- a/VERSION\n+++ b/VERSION\n@@ -1 +1 @@\n-7.2.2\n+7.2.3\n"
             "diff --git a/include/qemu/qemu-plugin.h b/include/qemu/qemu-plugin.h\n"
             "--- a/include/qemu/qemu-plugin.h\n+++ b/include/qemu/qemu-plugin.h\n"
             "@@ -1 +1 @@\n-old\n+new\n"
             "--- a/plugins/api.c\n+++ b/plugins/api.c\n@@ -1 +1 @@\n-a\n+b\n")
    part = hwtrace._patch_sections(patch, hwtrace.HEADER)
    assert "+++ b/include/qemu/qemu-plugin.h" in part and "+new" in part
    assert "VERSION" not in part and "7.2.3" not in part and "api.c" not in part
    assert hwtrace._patch_sections("--- a/x.c\n+++ b/x.c\n", hwtrace.HEADER) == ""


def _exp(tmp_path, text):
    p = tmp_path / "e.yaml"
    p.write_text("version: 1\nname: e\nexporter: {kind: vmlab, size: 1M}\n"
                 "moves:\n  - {mode: MIGRATE, expect: REFAULTED}\n" + text)
    return config.load(p)


def test_hw_forces_a_tcg_lab(tmp_path):
    o = config.resolve(_exp(tmp_path, "oracle: [stamps, hw]\n"), SimpleNamespace())
    assert o["oracle"] == ["stamps", "hw"] and o["accel"] == "tcg"
    assert o["sources"]["accel"] == "oracle hw"
    o = config.resolve(_exp(tmp_path, ""), SimpleNamespace())
    assert o["oracle"] == ["stamps"] and o["accel"] == "auto"


def test_hw_with_kvm_or_too_much_lab_memory_from_the_command_line_is_refused(tmp_path):
    exp = _exp(tmp_path, "oracle: [stamps, hw]\n")
    with pytest.raises(ConfigError, match="--accel"):
        config.resolve(exp, SimpleNamespace(accel="kvm"))
    with pytest.raises(ConfigError, match="--lab-memory"):
        config.resolve(exp, SimpleNamespace(lab_memory=4096))


def test_the_agent_and_the_controller_agree_on_the_mapping_address():
    src = (hwtrace.repo_root() / "guest-images" / "agent" / "vmlab-guest-agent.c").read_text()
    assert f"#define VMLAB_GUEST_MAP_VA {hwtrace.GUEST_MAP_VA:#x}UL" in src
    assert hwtrace.GUEST_MAP_VA < 1 << 47   # user half of a 4-level x86-64 address space
