"""The caching-attribute chain of one buffer, layer by layer: what the exporter was asked
for and set, what the lab host's PTE says, what KVM's MMU leaves to whom, and what the
guest's mapping got; and where the layers disagree. Pure: the answers come from the run
(vmlab/experiment.py asks each layer)."""
from __future__ import annotations

GUEST_WANTS = {"wb": "write-back", "wc": "write-combining", "uc": "uncached-minus"}
EXPORTER_PTE = {"WB": "WB", "WC": "WC", "UC": "UC-"}
GUEST_PTE = {"write-back": "WB", "write-combining": "WC", "uncached-minus": "UC-", "uncached": "UC"}


def chain(exporter: dict, host_pte: dict | None, npt: str, guest_map: dict, mapping: str) -> dict:
    """``exporter``: kind, requested and (vmlab) caching/vm_prot; ``host_pte``: the host
    agent's answer (or None: not a vmlab buffer); ``npt``: kvm_amd's npt parameter;
    ``guest_map``: the guest agent's ``map`` answer; ``mapping``: what the guest asked."""
    out: dict = {"exporter": exporter}
    if host_pte is not None:
        out["lab_host_pte"] = host_pte
    out["kvm"] = {"mmu": "NPT" if npt.strip() == "Y" else "EPT/other",
                  "memtype": "none: NPT leaves the guest PAT in charge (no IPAT on AMD)"
                  if npt.strip() == "Y" else "see EPT memtype/IPAT"}
    out["guest"] = {"requested": mapping, "memtype": guest_map.get("memtype"),
                    "pat_line": guest_map.get("pat_line")}
    host = (host_pte or {}).get("memtype")
    out["effective"] = out["guest"]["memtype"]
    mism = []
    if out["guest"]["memtype"] != GUEST_WANTS[mapping]:
        mism.append(f"guest asked {mapping} but got {out['guest']['memtype']}")
    exp_c = exporter.get("caching")
    if host and exp_c and EXPORTER_PTE.get(exp_c) != host:
        mism.append(f"exporter says {exp_c} but the host PTE is {host}")
    if host and out["guest"]["memtype"] and host != GUEST_PTE.get(out["guest"]["memtype"]):
        mism.append(f"host mapping {host} vs guest mapping {out['guest']['memtype']} "
                    f"(NPT does not carry host PAT)")
    out["mismatches"] = mism
    return out
