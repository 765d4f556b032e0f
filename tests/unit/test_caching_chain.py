"""vmlab/caching.py: the chain's layers and where they disagree (answers given, no VM)."""
from vmlab import caching


def test_agreeing_layers_have_no_mismatch():
    c = caching.chain({"kind": "vmlab", "requested": "WC", "caching": "WC"}, {"memtype": "WC"}, "Y",
                      {"memtype": "write-combining", "pat_line": "x"}, "wc")
    assert c["mismatches"] == [] and c["kvm"]["mmu"] == "NPT" and c["effective"] == "write-combining"


def test_each_disagreement_is_named():
    c = caching.chain({"kind": "vmlab", "requested": "WC", "caching": "WC"}, {"memtype": "WB"}, "Y",
                      {"memtype": "uncached-minus"}, "wc")
    m = " | ".join(c["mismatches"])
    assert "guest asked wc but got uncached-minus" in m
    assert "exporter says WC but the host PTE is WB" in m
    assert "host mapping WB vs guest mapping uncached-minus" in m


def test_a_buffer_without_host_pte_or_with_an_error_compares_only_the_guest():
    c = caching.chain({"kind": "udmabuf", "requested": "WB"}, None, "N", {"memtype": "write-back"}, "wb")
    assert "lab_host_pte" not in c and c["mismatches"] == [] and c["kvm"]["mmu"] == "EPT/other"
    c = caching.chain({"kind": "vmlab", "requested": "WB", "caching": "WB"}, {"error": "EPERM"}, "Y",
                      {"memtype": "write-back"}, "wb")
    assert c["lab_host_pte"] == {"error": "EPERM"} and c["mismatches"] == []
