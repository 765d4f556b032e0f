"""KVM's own evidence for one move: its MMU tracepoints in the lab (recorded by the host
agent's ``ktrace_*`` ops), mapped onto the buffer's guest frames and the exporter's pfns.

From ``kvmmmu:kvm_tdp_mmu_spte_changed`` (the TDP MMU, the default with NPT/EPT) it
tells which host pfns KVM mapped for the BAR's frames before and after the move: how many
sptes to the old pfns it dropped (zapped), at which level (4K/2M/1G), how many frames it
mapped again and to which pfns (new ones, or, stale, old ones), and how many frames kept
their pre-move spte (no change seen: KVM kept an spte to an old pfn). ``kvm_mmu_set_spte``
(the shadow MMU) counts mappings; ``kvm_page_fault`` and ``kvm_emulate_insn`` are counted.

An spte's pfn is bits 12..51 (the physical-address field of an x86 page-table entry);
"present" is judged by whether that pfn is one of the buffer's, so a frozen/removed or
MMIO spte never counts as a mapping of the buffer.
"""
from __future__ import annotations

import re

PFN_MASK = 0x000F_FFFF_FFFF_F000
LEVEL = {1: "4K", 2: "2M", 3: "1G"}
PAGES = {1: 1, 2: 512, 3: 512 * 512}

_LINE = re.compile(r"\s(\d+\.\d+):\s+(\w+):\s+(.*)$")


def parse(lines: list[str]) -> list[dict]:
    """tracefs text lines -> [{"t": seconds, "event": name, ...fields}] for the events
    vmlab records (numbers in the printk formats are hex unless said otherwise)."""
    out = []
    for ln in lines:
        m = _LINE.search(ln)
        if not m:
            continue
        t, ev, rest = float(m.group(1)), m.group(2), m.group(3)
        rec: dict = {"t": t, "event": ev}
        if ev == "kvm_tdp_mmu_spte_changed":
            f = re.search(r"gfn (\w+) level (\d+) old_spte (\w+) new_spte (\w+)", rest)
            if not f:
                continue
            rec.update(gfn=int(f.group(1), 16), level=int(f.group(2)),
                       old_spte=int(f.group(3), 16), new_spte=int(f.group(4), 16))
        elif ev == "kvm_mmu_set_spte":
            f = re.search(r"gfn (\w+) spte (\w+) .*level (\d+)", rest)
            if not f:
                continue
            rec.update(gfn=int(f.group(1), 16), spte=int(f.group(2), 16), level=int(f.group(3)))
        elif ev == "kvm_page_fault":
            f = re.search(r"address (?:0x)?(\w+) error_code (?:0x)?(\w+)", rest)
            rec.update(address=int(f.group(1), 16) if f else None,
                       error_code=int(f.group(2), 16) if f else None)
        elif ev == "kvm_emulate_insn":
            rec.update(failed=rest.endswith(" failed"))
        elif ev == "kvm_mmu_zap_all_fast":
            pass   # a memslot went away (x86's default on a delete: every root invalidated)
        else:
            continue
        out.append(rec)
    return out


def _pfn(spte: int) -> int:
    return (spte & PFN_MASK) >> 12


def _covered(gfn: int, level: int, pfn: int, gfn0: int, npages: int) -> list[tuple[int, int]]:
    """(buffer page index, host pfn) for every buffer frame an spte at ``level`` maps."""
    n = PAGES.get(level, 1)
    lo, hi = max(gfn, gfn0), min(gfn + n, gfn0 + npages)
    return [(g - gfn0, pfn + (g - gfn)) for g in range(lo, hi)]


def summarize(events: list[dict], gfn0: int, npages: int, old_pfns: list[int] | None,
              new_pfns: list[int] | None, overrun: int = 0, tdp_mmu: bool = False) -> dict:
    """What KVM did to the buffer's frames between the trace's clear and its collection.
    ``old_pfns`` / ``new_pfns``: the exporter's pfn per page before and after the move
    (None for exporters that do not tell; then only counts are given). ``tdp_mmu``: the
    TDP MMU is on and its spte tracepoint recorded, so no event for a frame means KVM
    did not touch its spte."""
    old = {p: i for i, p in enumerate(old_pfns or [])}
    new = {p: i for i, p in enumerate(new_pfns or [])}
    zapped_pages: set[int] = set()
    zapped_by_level: dict[str, int] = {}
    mapped_new: set[int] = set()
    mapped_old: set[int] = set()
    mapped_by_level: dict[str, int] = {}
    changes = 0
    mmu = "tdp" if tdp_mmu else None
    # the TDP MMU also fires kvm_mmu_set_spte for each mapping it makes: count one of them
    tdp_seen = tdp_mmu or any(e["event"] == "kvm_tdp_mmu_spte_changed" for e in events)
    for e in events:
        if e["event"] == "kvm_tdp_mmu_spte_changed":
            mmu = "tdp"
            changes += 1
            lvl = LEVEL.get(e["level"], str(e["level"]))
            if _pfn(e["new_spte"]) != _pfn(e["old_spte"]):
                gone = [idx for idx, pfn in _covered(e["gfn"], e["level"], _pfn(e["old_spte"]), gfn0, npages)
                        if pfn in old]
                zapped_pages.update(gone)
                if gone:
                    zapped_by_level[lvl] = zapped_by_level.get(lvl, 0) + 1
            landed = _covered(e["gfn"], e["level"], _pfn(e["new_spte"]), gfn0, npages)
            _count_mapping(landed, old, new, mapped_old, mapped_new, mapped_by_level, lvl)
        elif e["event"] == "kvm_mmu_set_spte" and not tdp_seen:
            mmu = "shadow"
            lvl = LEVEL.get(e["level"], str(e["level"]))
            landed = _covered(e["gfn"], e["level"], _pfn(e["spte"]), gfn0, npages)
            _count_mapping(landed, old, new, mapped_old, mapped_new, mapped_by_level, lvl)
    moved = old_pfns is not None and new_pfns is not None and set(old_pfns) != set(new_pfns)
    in_range = [e for e in events if e["event"] == "kvm_page_fault" and e.get("address") is not None
                and gfn0 <= e["address"] >> 12 < gfn0 + npages]
    out = {
        "mmu_events": mmu,
        "spte_changes": changes,
        # the trace's filter starts 1 GiB below the buffer (huge mappings); count its own frames
        "page_faults": sum(1 for e in in_range),
        "write_faults": sum(1 for e in in_range if (e.get("error_code") or 0) & 2),
        "emulated_insns": sum(1 for e in events if e["event"] == "kvm_emulate_insn"),
        "emulation_failed": sum(1 for e in events if e["event"] == "kvm_emulate_insn" and e.get("failed")),
        "overrun": overrun,
    }
    fast = sum(1 for e in events if e["event"] == "kvm_mmu_zap_all_fast")
    if fast:
        out["zap_all_fast"] = fast
    if old_pfns is None:
        out["summary"] = (f"{changes} spte changes, {out['page_faults']} page faults in the buffer's "
                          f"range (the exporter does not list its pfns)")
        return out
    if not moved:
        # ZAP_ONLY: the same pfns before and after; a present->non-present change is the zap
        retired = set()
    else:
        retired = set(old_pfns) - set(new_pfns)
    out.update(
        zapped_pages=len(zapped_pages),
        zapped_sptes_by_level=zapped_by_level,
        mapped_new_pages=len(mapped_new - mapped_old) if moved else len(mapped_new),
        mapped_old_pages=len({i for i in mapped_old if old_pfns[i] in retired}) if moved else 0,
        mapped_sptes_by_level=mapped_by_level,
    )
    if mmu == "tdp" and not overrun:
        # silence is evidence only when the record is complete. What had to go: the pages
        # whose pfn retired (a page-range move retires only its range), or every page
        # when nothing moved (ZAP_ONLY)
        must_go = {i for i, p in enumerate(old_pfns) if p in retired} if moved else set(range(npages))
        out["kept_old_pages"] = len(must_go - zapped_pages)
    words = []
    if mmu == "tdp":
        words.append(f"KVM zapped {len(zapped_pages)} of {npages} pages' sptes "
                     f"({', '.join(f'{n} {lv}' for lv, n in sorted(zapped_by_level.items())) or 'none'})")
        if out.get("kept_old_pages"):
            words.append(f"KVM kept {out['kept_old_pages']} sptes to {'old' if moved else 'the'} pfns")
    if mmu:
        words.append(f"mapped {out['mapped_new_pages']} pages to {'new' if moved else 'their'} pfns")
        if out["mapped_old_pages"]:
            words.append(f"mapped {out['mapped_old_pages']} pages to RETIRED pfns after the move")
    else:
        words.append("no KVM MMU event for the buffer's frames")
    if out["write_faults"]:
        words.append(f"{out['write_faults']} guest write faults on the buffer")
    if out["emulated_insns"]:
        words.append(f"KVM emulated {out['emulated_insns']} instructions (anywhere in the VM)")
    if overrun:
        words.append(f"trace overran by {overrun} events (incomplete)")
    out["summary"] = "; ".join(words)
    return out


def _count_mapping(landed, old, new, mapped_old, mapped_new, by_level, lvl) -> None:
    hit = False
    for idx, pfn in landed:
        if pfn in new:
            mapped_new.add(idx)
            hit = True
        elif pfn in old:
            mapped_old.add(idx)
            hit = True
    if hit:
        by_level[lvl] = by_level.get(lvl, 0) + 1


_MEMSLOT = re.compile(r"kvm_set_user_memory AddrSpace#(\d+) Slot#(\d+) flags=(\w+) gpa=0x(\w+) "
                      r"size=0x(\w+) ua=0x(\w+).*ret=(-?\d+)")


def memslot_changes(lines: list[str], gpa: int, size: int) -> dict:
    """QEMU's KVM_SET_USER_MEMORY_REGION calls (its ``kvm_set_user_memory`` trace event)
    that touch guest-physical [gpa, gpa + size): a delete has size 0, a creation the
    mapping's size. ``recreated``: in every address space that changed (QEMU keeps the
    SMM one too), a delete and, as its last word, a creation of the whole region at gpa,
    with no call failing: the memslot is back, not just once touched."""
    seen = []
    for ln in lines:
        m = _MEMSLOT.search(ln)
        if not m:
            continue
        start, length = int(m.group(4), 16), int(m.group(5), 16)
        if not gpa <= start < gpa + size:
            continue
        seen.append({"as": int(m.group(1)), "slot": int(m.group(2)), "gpa": hex(start), "size": length,
                     "ua": "0x" + m.group(6), "ret": int(m.group(7))})
    deleted = [i for i, e in enumerate(seen) if e["size"] == 0]
    created = [i for i, e in enumerate(seen) if e["size"] > 0]
    spaces = {e["as"] for e in seen}
    ok = bool(seen) and all(e["ret"] == 0 for e in seen)
    for a in spaces:
        mine = [e for e in seen if e["as"] == a]
        last = mine[-1]
        ok = ok and any(e["size"] == 0 for e in mine) and last["size"] == size and last["gpa"] == hex(gpa)
    present = bool(seen) and all(e["ret"] == 0 for e in seen) and all(
        [e for e in seen if e["as"] == a][-1]["size"] == size for a in spaces)
    return {"deleted": len(deleted), "created": len(created), "failed": sum(1 for e in seen if e["ret"]),
            "recreated": ok, "present": present, "calls": seen[:8]}
