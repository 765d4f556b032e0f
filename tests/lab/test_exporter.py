"""Issue: vmlab-exporter. The real module in the real lab kernel, driven through the real
host agent: stamps, moves, memtypes, argument checks, fuzzing, unload, and the upstream
exporters (udmabuf, dma-heap) behind the same interface."""
from __future__ import annotations

import pytest

from vmlab import stamp
from vmlab.cli import progress
from vmlab.exporter import AgentRequestFailed, HostAgent
from vmlab.stack import Stack

from .conftest import lab_args, results_dir

MiB = 1 << 20


@pytest.fixture(scope="module")
def lab(images_ready):
    d = results_dir("exporter")
    s = Stack(lab_args(), d, progress)
    try:
        s.up_lab()
        yield s.lab
    finally:
        s.down()


@pytest.fixture
def agent(lab, request):
    a = HostAgent(lab, lab.workdir / f"hostagent-{request.node.name}.log")
    yield a
    a.close()


def _gens(recs):
    return {(r[3], r[5]) for r in recs}


def test_stamps_and_moves_seen_by_a_host_process(agent):
    b = agent.request("create", kind="vmlab", size=MiB, caching="WB", alloc="ORDER0")
    h = b["buf"]
    recs = agent.request("host_read", buf=h, full=True)["records"]
    assert len(recs) == 256
    assert all(r[1] == "ok" and r[2] == b["id"] and r[3] == 1 and r[4] == r[0] and r[5] == stamp.LIVE
               for r in recs)
    agent.request("host_map", buf=h)
    agent.request("host_read", buf=h)  # fault every page into the kept mapping
    before = agent.request("info", buf=h, pfns=True)

    # MIGRATE: generation+1, the kept mapping refaults onto new pages
    assert agent.request("move", buf=h, mode="MIGRATE")["generation"] == 2
    kept = agent.request("host_read", buf=h, full=True)["records"]
    assert _gens(kept) == {(2, stamp.LIVE)} and all(r[1] == "ok" for r in kept)
    after = agent.request("info", buf=h, pfns=True)
    assert after["faults"] > before["faults"] and after["zaps"] == before["zaps"] + 1
    assert set(after["pfns"]).isdisjoint(before["pfns"])
    assert after["quarantined_pages"] == 256

    # MIGRATE_NO_ZAP: the kept mapping still reads the old pages, now RETIRED
    assert agent.request("move", buf=h, mode="MIGRATE_NO_ZAP")["generation"] == 3
    kept = agent.request("host_read", buf=h, full=True)["records"]
    assert _gens(kept) == {(2, stamp.RETIRED)} and all(r[1] == "ok" for r in kept)
    info = agent.request("info", buf=h)
    assert info["stale_mapped"] == 1
    with pytest.raises(AgentRequestFailed) as e:
        agent.request("release_quarantine", buf=h)
    assert e.value.errname == "EBUSY"  # a live mapping can still reach retired pages
    fresh_map_first = agent.request("host_read", buf=h, first=0, count=4)["records"]
    assert fresh_map_first  # a fresh mapping is a different VMA of the same file...

    # ZAP_ONLY: same pages, same generation, refaulted
    pf = agent.request("info", buf=h, pfns=True)
    assert agent.request("move", buf=h, mode="ZAP_ONLY")["generation"] == 3
    kept = agent.request("host_read", buf=h, full=True)["records"]
    assert _gens(kept) == {(3, stamp.LIVE)}
    pf2 = agent.request("info", buf=h, pfns=True)
    assert pf2["pfns"] == pf["pfns"] and pf2["faults"] > pf["faults"] and pf2["stale_mapped"] == 0
    freed = agent.request("release_quarantine", buf=h)["freed_pages"]
    assert freed == 512 and agent.request("info", buf=h)["quarantined_pages"] == 0
    agent.request("close", buf=h)


@pytest.mark.parametrize("caching,memtype", [("WB", "WB"), ("WC", "WC"), ("UC", "UC-")])
def test_caching_mode_memtype_from_the_lab_kernel(agent, caching, memtype):
    b = agent.request("create", kind="vmlab", size=MiB, caching=caching, alloc="COMPOUND")
    pte = agent.request("host_pte", buf=b["buf"], page=3)
    assert pte["memtype"] == memtype, pte
    assert pte["page_memtype"] == memtype, pte  # the linear map was changed too (set_memory_*)
    info = agent.request("info", buf=b["buf"], pfns=True)
    assert pte["pfn"] == info["pfns"][3]
    assert info["vm_prot"] == {"WB": "CACHED", "WC": "WC", "UC": "UC"}[caching]
    agent.request("close", buf=b["buf"])


def test_migrate_changes_caching(agent):
    b = agent.request("create", kind="vmlab", size=MiB, caching="WB", alloc="ORDER0")
    agent.request("move", buf=b["buf"], mode="MIGRATE", caching="WC")
    assert agent.request("host_pte", buf=b["buf"])["memtype"] == "WC"
    assert agent.request("info", buf=b["buf"])["caching"] == "WC"
    recs = agent.request("host_read", buf=b["buf"], full=True)["records"]
    assert _gens(recs) == {(2, stamp.LIVE)}
    agent.request("close", buf=b["buf"])


BAD = [
    ("zero size", "CREATE", [0, 0, 0, 0, -1, 0], None, {"EINVAL"}),
    ("odd size", "CREATE", [4095, 0, 0, 0, -1, 0], None, {"EINVAL"}),
    ("not a power of two", "CREATE", [3 * 4096, 0, 0, 0, -1, 0], None, {"EINVAL"}),
    ("huge size", "CREATE", [1 << 40, 0, 0, 0, -1, 0], None, {"EINVAL", "E2BIG", "ENOMEM"}),
    ("overflowing size", "CREATE", [(1 << 64) - 4096, 0, 0, 0, -1, 0], None, {"EINVAL", "E2BIG", "EOVERFLOW"}),
    ("unknown caching", "CREATE", [4096, 7, 0, 0, -1, 0], None, {"EINVAL"}),
    ("unknown alloc", "CREATE", [4096, 0, 9, 0, -1, 0], None, {"EINVAL"}),
    ("unknown create flag", "CREATE", [4096, 0, 0, 0x80, -1, 0], None, {"EINVAL"}),
    ("wrong id (info)", "INFO", [987654, 0, 0, 0, 0, 0, 0] + [0] * 10, None, {"ENOENT", "EINVAL"}),
    ("info flags", "INFO", [1, 0, 0, 1, 0, 0, 0] + [0] * 10, None, {"EINVAL", "ENOENT"}),
    ("wrong id (move)", "MOVE", [987654, 1, 0xFFFFFFFF, 0, 0, 0], None, {"ENOENT", "EINVAL"}),
    ("wrong id (release)", "RELEASE_QUARANTINE", [987654, 0], None, {"ENOENT", "EINVAL"}),
    ("bad pointer create", "CREATE", None, 1, {"EFAULT"}),
    ("bad pointer info", "INFO", None, 0xDEAD0000, {"EFAULT"}),
    ("kernel pointer move", "MOVE", None, (1 << 64) - 4096, {"EFAULT"}),
    ("pte of an unmapped address", "PTE", [4096, 0, 0, 0, 0, 0, 0], None, {"EINVAL", "EFAULT", "ENOENT"}),
]


@pytest.mark.parametrize("what,cmd,fields,ptr,errs", BAD, ids=[b[0] for b in BAD])
def test_bad_arguments_are_refused(agent, what, cmd, fields, ptr, errs):
    r = agent.request("raw", cmd=cmd, fields=fields, ptr=ptr)
    assert r["rc"] == -1 and r["errname"] in errs, r


def test_bad_move_arguments_on_a_real_buffer(agent):
    b = agent.request("create", kind="vmlab", size=MiB)
    for fields in ([b["id"], 9, 0xFFFFFFFF, 0, 0, 0],        # unknown mode
                   [b["id"], 1, 5, 0, 0, 0],                 # unknown caching
                   [b["id"], 1, 0xFFFFFFFF, 1, 0, 0],        # flags
                   [b["id"], 1, 0xFFFFFFFF, 0, 1, 0],        # pad
                   [b["id"], 3, 1, 0, 0, 0]):                # ZAP_ONLY with a caching change
        r = agent.request("raw", cmd="MOVE", fields=fields)
        assert r["rc"] == -1 and r["errname"] == "EINVAL", (fields, r)
    assert agent.request("info", buf=b["buf"])["generation"] == 1
    agent.request("close", buf=b["buf"])


def test_random_ioctls_leave_no_warning(lab, agent):
    lab.run("dmesg -C")
    res = agent.request("fuzz", count=10000, seed=20261125, timeout=900)["errnos"]
    assert sum(res.values()) == 10000
    assert len(res) > 2  # the fuzzer reached several distinct outcomes
    assert agent.request("dmesg_bad")["lines"] == []
    assert agent.request("ping") == {}


def test_rmmod_refused_with_live_buffers_and_no_leak(lab, agent):
    base = agent.request("meminfo")
    b = agent.request("create", kind="vmlab", size=4 * MiB, alloc="NONCOMPOUND")
    agent.request("move", buf=b["buf"], mode="MIGRATE")
    assert agent.request("meminfo")["module_pages"] == base["module_pages"] + 2048
    rc, _, err = lab.run("rmmod vmlab_exporter", check=False)
    assert rc != 0, "rmmod must be refused while a dma-buf is alive"
    agent.request("close", buf=b["buf"])
    agent.close()  # the control fd too
    rc, out, err = lab.run("cat /sys/kernel/debug/vmlab-exporter/pages; rmmod vmlab_exporter", check=False)
    assert rc == 0, err
    assert int(out.split()[0]) == 0
    lab.run("modprobe vmlab_exporter && test -c /dev/vmlab-exporter")


def test_udmabuf_move_is_reported_as_it_happens(agent):
    b = agent.request("create", kind="udmabuf", size=MiB)
    assert b["kind"] == "udmabuf"
    recs = agent.request("host_read", buf=b["buf"], full=True)["records"]
    assert _gens(recs) == {(1, stamp.LIVE)} and all(r[1] == "ok" for r in recs)
    agent.request("host_map", buf=b["buf"])
    agent.request("host_read", buf=b["buf"])
    m = agent.request("move", buf=b["buf"], mode="MIGRATE")
    assert m["generation"] == 2 and "punched" in m["what"]
    kept = agent.request("host_read", buf=b["buf"])["records"]
    # measured on 6.12: udmabuf pinned the memfd's folios at create time, so the dma-buf
    # still shows generation 1 after the memfd was punched and rewritten.
    assert _gens(kept) == {(1, stamp.LIVE)}
    with pytest.raises(AgentRequestFailed) as e:
        agent.request("move", buf=b["buf"], mode="ZAP_ONLY")
    assert e.value.errname in ("EOPNOTSUPP", "ENOTSUP")
    agent.request("close", buf=b["buf"])


def test_dma_heap_has_no_move(agent):
    b = agent.request("create", kind="dmaheap", size=MiB)
    recs = agent.request("host_read", buf=b["buf"], full=True)["records"]
    assert _gens(recs) == {(1, stamp.LIVE)} and all(r[1] == "ok" for r in recs)
    with pytest.raises(AgentRequestFailed) as e:
        agent.request("move", buf=b["buf"], mode="MIGRATE")
    assert e.value.errname in ("EOPNOTSUPP", "ENOTSUP") and "unsupported" in str(e.value)
    agent.request("close", buf=b["buf"])
