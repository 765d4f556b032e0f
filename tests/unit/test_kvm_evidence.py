"""kvm_evidence: tracefs lines (in the formats of the 6.1-7.3 kernels' printk formats)
-> what KVM did to the buffer's frames. The lab tests check it on real moves."""
from __future__ import annotations

import pytest

from vmlab import kvm_evidence as ke

GFN0 = 0xFE000          # BAR2 at 0xfe000000
OLD = [0x120000 + i for i in range(4)]
NEW = [0x130000 + i for i in range(4)]
NPT = 0x0000_0000_0000_0867   # low flag bits of a present, writable NPT leaf


def spte(pfn):
    return (pfn << 12) | NPT


def tdp(t, gfn, old, new, level=1):
    return (f" qemu-system-x86-812     [001] .....  {t:.6f}: kvm_tdp_mmu_spte_changed: "
            f"as id 0 gfn {gfn:x} level {level} old_spte {old:x} new_spte {new:x}")


def fault(t, gpa):
    return (f" qemu-system-x86-812     [000] .....  {t:.6f}: kvm_page_fault: vcpu 0 rip 0xffffffff8100 "
            f"address 0x{gpa:016x} error_code 0x4")


def test_migrate_zaps_old_and_maps_new():
    lines = ["# tracer: nop", "#"]
    lines += [tdp(1.0 + i / 100, GFN0 + i, spte(OLD[i]), 0x5A0) for i in range(4)]    # zap (frozen)
    lines += [tdp(1.1 + i / 100, GFN0 + i, 0x5A0, 0) for i in range(4)]
    lines += [fault(2.0 + i / 100, (GFN0 + i) << 12) for i in range(4)]
    lines += [tdp(2.0 + i / 100, GFN0 + i, 0, spte(NEW[i])) for i in range(4)]      # refault
    ev = ke.summarize(ke.parse(lines), GFN0, 4, OLD, NEW)
    assert ev["mmu_events"] == "tdp" and ev["page_faults"] == 4
    assert ev["zapped_pages"] == 4 and ev["zapped_sptes_by_level"] == {"4K": 4}
    assert ev["mapped_new_pages"] == 4 and ev["mapped_old_pages"] == 0
    assert ev["kept_old_pages"] == 0
    assert "KVM zapped 4 of 4 pages' sptes (4 4K)" in ev["summary"]


def test_no_zap_keeps_old_sptes():
    ev = ke.summarize(ke.parse([]), GFN0, 4, OLD, NEW)
    assert ev["mmu_events"] is None and ev["summary"] == "no KVM MMU event for the buffer's frames"
    # with the TDP MMU on and traced, silence means KVM left every old spte in place
    ev = ke.summarize(ke.parse([]), GFN0, 4, OLD, NEW, tdp_mmu=True)
    assert ev["kept_old_pages"] == 4 and "KVM kept 4 sptes to old pfns" in ev["summary"]
    lines = [tdp(1.0, GFN0 + 3, spte(OLD[3]), 0)]
    ev = ke.summarize(ke.parse(lines), GFN0, 4, OLD, NEW, tdp_mmu=True)
    assert ev["kept_old_pages"] == 3 and ev["zapped_pages"] == 1


def test_refault_onto_a_retired_pfn_is_named():
    lines = [tdp(1.0, GFN0, spte(OLD[0]), 0), tdp(2.0, GFN0, 0, spte(OLD[0]))]
    ev = ke.summarize(ke.parse(lines), GFN0, 4, OLD, NEW)
    assert ev["mapped_old_pages"] == 1 and "RETIRED pfns" in ev["summary"]


def test_zap_only_same_pfns():
    lines = [tdp(1.0 + i, GFN0 + i, spte(OLD[i]), 0) for i in range(4)]
    lines += [tdp(2.0 + i, GFN0 + i, 0, spte(OLD[i])) for i in range(4)]
    ev = ke.summarize(ke.parse(lines), GFN0, 4, OLD, list(OLD))
    assert ev["zapped_pages"] == 4 and ev["mapped_new_pages"] == 4 and ev["mapped_old_pages"] == 0
    assert "to their pfns" in ev["summary"]


def test_a_2m_spte_covers_512_frames():
    old = [0x200000 + i for i in range(512)]
    new = [0x400000 + i for i in range(512)]
    lines = [tdp(1.0, GFN0, spte(old[0]) | 0x80, 0, level=2), tdp(2.0, GFN0, 0, spte(new[0]) | 0x80, level=2)]
    ev = ke.summarize(ke.parse(lines), GFN0, 512, old, new)
    assert ev["zapped_pages"] == 512 and ev["zapped_sptes_by_level"] == {"2M": 1}
    assert ev["mapped_new_pages"] == 512 and ev["mapped_sptes_by_level"] == {"2M": 1}


def test_a_page_range_move_must_drop_only_its_range():
    # one page of four moved; KVM dropped nothing: only that page's spte is "kept old"
    new = OLD[:2] + [NEW[2]] + OLD[3:]
    ev = ke.summarize(ke.parse([]), GFN0, 4, OLD, new, tdp_mmu=True)
    assert ev["kept_old_pages"] == 1 and "KVM kept 1 sptes to old pfns" in ev["summary"]
    # a 2 MiB spte over the range goes whole: the range is dropped, nothing kept
    old = [0x200000 + i for i in range(512)]
    new = list(old)
    new[300] = 0x700000
    lines = [tdp(1.0, GFN0, spte(old[0]) | 0x80, 0, level=2)]
    ev = ke.summarize(ke.parse(lines), GFN0, 512, old, new, tdp_mmu=True)
    assert ev["kept_old_pages"] == 0 and ev["zapped_sptes_by_level"] == {"2M": 1}


def test_shadow_mmu_and_emulation_and_unknown_pfns():
    lines = [f" qemu-812 [000] ..... 3.000000: kvm_mmu_set_spte: gfn {GFN0:x} spte {spte(NEW[0]):x} "
             f"(rw-u) level 1 at 12345",
             " qemu-812 [000] ..... 3.100000: kvm_emulate_insn: 0:ffffffff81000000:89 07 (prot64)",
             " qemu-812 [000] ..... 3.200000: kvm_emulate_insn: 0:ffffffff81000000:c5 fd 7f 07 (prot64) failed",
             "garbage line"]
    ev = ke.summarize(ke.parse(lines), GFN0, 4, OLD, NEW)
    assert ev["mmu_events"] == "shadow" and ev["mapped_new_pages"] == 1
    assert "anywhere in the VM" in ev["summary"]
    assert ev["emulated_insns"] == 2 and ev["emulation_failed"] == 1
    assert "kept" not in ev["summary"]       # the shadow MMU's zaps are not traced per spte
    ev = ke.summarize(ke.parse(lines), GFN0, 4, None, None, overrun=7)
    assert "does not list its pfns" in ev["summary"] and ev["overrun"] == 7


def set_spte(t, gfn, pfn):
    return (f" qemu-812 [000] ..... {t:.6f}: kvm_mmu_set_spte: gfn {gfn:x} spte {spte(pfn):x} "
            f"(rw-u) level 1 at 12345")


def test_tdp_mappings_are_counted_once_and_faults_only_on_the_buffer():
    """The TDP MMU fires kvm_mmu_set_spte beside kvm_tdp_mmu_spte_changed for one mapping;
    the page-fault filter in the lab starts 1 GiB low, so faults elsewhere are dropped."""
    lines = []
    for i in range(4):
        lines += [tdp(1.0 + i, GFN0 + i, spte(OLD[i]), 0)]
        lines += [tdp(2.0 + i, GFN0 + i, 0, spte(NEW[i])), set_spte(2.0 + i, GFN0 + i, NEW[i])]
        lines += [fault(2.0 + i, ((GFN0 + i) << 12) | 0x800).replace("error_code 0x4", "error_code 0x6")]
    lines += [fault(3.0, (GFN0 - 0x100) << 12)]          # another device's MMIO, same GiB
    ev = ke.summarize(ke.parse(lines), GFN0, 4, OLD, NEW)
    assert ev["mapped_new_pages"] == 4 and ev["mapped_sptes_by_level"] == {"4K": 4}
    assert ev["page_faults"] == 4 and ev["write_faults"] == 4


def test_an_overrun_trace_claims_nothing_was_kept():
    ev = ke.summarize(ke.parse([]), GFN0, 4, OLD, NEW, overrun=999, tdp_mmu=True)
    assert "kept_old_pages" not in ev and "kept" not in ev["summary"] and "incomplete" in ev["summary"]


# --- QEMU's memslot calls (its kvm_set_user_memory trace event) ---------------------------
def _slot(gpa, size, ua="7f02baefc000", ret=0, asid=0):
    return (f"kvm_set_user_memory AddrSpace#{asid} Slot#6 flags=0x0 gpa=0x{gpa:x} size=0x{size:x} "
            f"ua=0x{ua} guest_memfd=-1 guest_memfd_offset=0x0 ret={ret}")


def test_memslot_delete_then_create_is_a_recreation():
    lines = [_slot(0xfea00000, 0), _slot(0xfea00000, 0, asid=1),
             "some other line", _slot(0x100000, 0x1000),             # another slot: ignored
             _slot(0xfea00000, 0x100000, ua="7f02bacff000"), _slot(0xfea00000, 0x100000, asid=1)]
    ev = ke.memslot_changes(lines, 0xfea00000, 0x100000)
    assert ev["deleted"] == 2 and ev["created"] == 2 and ev["recreated"] and ev["failed"] == 0
    assert ev["calls"][2]["ua"] == "0x7f02bacff000" and ev["calls"][2]["size"] == 0x100000


@pytest.mark.parametrize("lines", [
    [],                                                              # nothing happened
    [_slot(0xfea00000, 0)],                                          # deleted, never back
    [_slot(0xfea00000, 0x100000), _slot(0xfea00000, 0)],             # created, then deleted
    [_slot(0xfea00000, 0), _slot(0xfea00000, 0x100000, ret=-22)],    # the creation failed
])
def test_memslot_without_a_clean_recreation(lines):
    assert ke.memslot_changes(lines, 0xfea00000, 0x100000)["recreated"] is False


@pytest.mark.parametrize("lines", [
    [_slot(0xfea00000, 0), _slot(0xfea00000, 0x100000), _slot(0xfea00000, 0)],   # gone again
    [_slot(0xfea00000, 0), _slot(0xfea00000, 0x1000)],                           # not the whole region
    [_slot(0xfea00000, 0), _slot(0xfea00000, 0x100000),                          # the SMM space
     _slot(0xfea00000, 0, asid=1)],                                              # left deleted
])
def test_memslot_must_end_recreated_in_every_address_space(lines):
    assert ke.memslot_changes(lines, 0xfea00000, 0x100000)["recreated"] is False
