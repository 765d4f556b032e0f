"""A test suite of your own against KVM and dma-bufs, with vmlab's pytest fixtures (the
plugin loads itself once vmlab is installed: plain `pytest` runs this file).

    pytest examples/pytest/test_my_kvm.py                  # the lab kernel: trixie (6.12)
    pytest --vmlab-kernel trixie-backports examples/...    # or another suite
"""
import pytest


def test_two_buffers_each_refault_on_its_own(vmlab_buffer):
    a = vmlab_buffer(size="1M")
    b = vmlab_buffer(size="64K", caching="WB")
    assert a.read()["verdict"] == "REFAULTED"
    moved = a.move("MIGRATE")
    assert moved["verdict"] == "REFAULTED" and moved["pages"] == {"REFAULTED": 256}
    # b did not move: every page still its first generation
    assert b.read() == dict(b.read(), verdict="REFAULTED", pages={"REFAULTED": 16})
    # the oracle's self-check: a move without the zap leaves the guest on stale pages
    assert b.move("MIGRATE_NO_ZAP")["verdict"] == "STALE"


def test_a_buffer_comes_and_goes_twice(vmlab_buffer):
    for _ in range(2):
        c = vmlab_buffer(size="256K")
        assert c.move("MIGRATE")["verdict"] == "REFAULTED"
        c.close()


@pytest.mark.vmlab_kernel("trixie")
def test_an_experiment_as_vmlab_run_would(vmlab_run):
    res = vmlab_run({"version": 1, "name": "mine", "guest": {"gpu": "none"},
                     "exporter": {"kind": "vmlab", "size": "256K", "caching": "WB", "alloc": "ORDER0"},
                     "moves": [{"mode": "MIGRATE", "count": 2, "expect": "REFAULTED"},
                               {"mode": "MIGRATE_NO_ZAP", "expect": "STALE"}]})
    assert res["passed"] and [m["verdict"] for m in res["moves"]] == ["REFAULTED"] * 2 + ["STALE"]
