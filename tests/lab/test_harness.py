"""Issue: vmlab inside a pytest suite. The plugin's fixtures are this suite's harness too:
tests here use vmlab_buffer (buffers hot-plugged into one running guest) and vmlab_run
(an experiment in the session's lab); and a test file written as a user would, outside
tests/, runs with plain pytest."""
from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from .conftest import ROOT, qemu_pids, results_dir


@pytest.fixture(scope="module", autouse=True)
def _labs_end_with_this_module(_vmlab_session):
    """The session's lab stops when this module is done, not at the end of the session:
    an idle TCG lab would slow every lab test after it."""
    yield
    _vmlab_session.close()


def test_buffers_hot_plugged_and_unplugged_twice_in_one_guest(vmlab_buffer, vmlab_guest):
    """Two buffers at once, each its own device; then a third, twice, in the same guest."""
    a, b = vmlab_buffer(size="1M"), vmlab_buffer(size="64K")
    assert a.bdf != b.bdf
    assert a.move("MIGRATE")["pages"] == {"REFAULTED": 256}
    assert b.read()["pages"] == {"REFAULTED": 16}          # b did not move
    assert b.move("MIGRATE_NO_ZAP")["verdict"] == "STALE"   # the oracle's self-check
    assert a.read()["verdict"] == "REFAULTED"               # and a is unaffected
    bdfs = []
    for _ in range(2):
        c = vmlab_buffer(size="256K")
        bdfs.append(c.bdf)
        assert c.move("MIGRATE")["verdict"] == "REFAULTED"
        c.close()
        rc, _, _ = vmlab_guest.run(f"test -e /sys/bus/pci/devices/{c.bdf}", timeout=30, check=False)
        assert rc != 0, f"{c.bdf} still in the guest after the unplug"
    assert vmlab_guest.alive()


def _bar2_start(guest, bdf: str) -> int:
    rc, out, _ = guest.run(f"sed -n 3p /sys/bus/pci/devices/{bdf}/resource", timeout=30, check=False)
    assert rc == 0, f"no resource file for {bdf}"
    return int(out.split()[0], 16)


def test_a_64_mib_buffer_hot_plugs_below_4_gib_like_a_boot_time_bar(vmlab_buffer, vmlab_guest):
    """Each root port reserves a 32-bit prefetchable window, so a hot-plugged BAR lands in
    the PCI hole below 4 GiB where SeaBIOS puts a boot-time one (the same MTRR type under
    the guest's PAT request: catalog caching-wc-uc checks the memtype). Measured: 64-bit
    windows instead lay in the e820 range QEMU reserves for AMD's HyperTransport, and the
    guest refused a 64 MiB BAR there ("can't assign; no space")."""
    small = vmlab_buffer(size="1M")
    assert _bar2_start(vmlab_guest, small.bdf) < 1 << 32
    small.close()
    big = vmlab_buffer(size="64M")
    start = _bar2_start(vmlab_guest, big.bdf)
    assert start < 1 << 32 and start % (64 << 20) == 0, hex(start)
    assert big.move("MIGRATE")["pages"] == {"REFAULTED": 16384}
    big.close()


def test_the_guest_agents_kernel_state_is_what_the_guests_dmesg_prints(vmlab_guest):
    """The health check may take a run's start from the guest agent and its end over an
    exec (or the other way round): the two must be the same text, or every boot line
    would look new."""
    from vmlab.guest_agent import GuestAgent
    from vmlab.health import parse_kernel_state
    ga = GuestAgent(vmlab_guest.session)
    try:
        for _ in range(3):      # a line logged between the two reads: read both again
            rc, out, err = ga.run("kernel-state", 60)
            assert rc == 0, err
            by_agent = parse_kernel_state(out)
            _, out, _ = vmlab_guest.run("cat /proc/sys/kernel/tainted; dmesg", timeout=60)
            by_exec = parse_kernel_state(out)
            if by_agent == by_exec:
                break
        assert by_agent == by_exec
        assert "Linux version" in by_agent["dmesg"]
    finally:
        ga.close()


def test_zap_only_through_vmlab_run(vmlab_run):
    res = vmlab_run(ROOT / "configs" / "experiments" / "zap-only.yaml")
    assert res["passed"] is True
    assert [m["verdict"] for m in res["moves"]] == ["REFAULTED", "REFAULTED", "NOT_ZAPPED"]
    assert res["moves"][0]["zap_evidence"]["ok"] and res["moves"][2]["zap_evidence"]["ok"] is False


@pytest.mark.nightly   # a lab of its own (about 45 s): the core tier must stay under 30 min cold
def test_a_user_test_file_runs_with_plain_pytest(tmp_path):
    out = results_dir("plugin-user-file")
    r = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider",
                        str(ROOT / "examples" / "pytest" / "test_my_kvm.py"),
                        "--vmlab-results", str(out), "--junitxml", str(tmp_path / "junit.xml")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=1500,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "3 passed" in r.stdout
    cases = ET.parse(tmp_path / "junit.xml").getroot().iter("testcase")
    for case in cases:
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        d = props["vmlab_results"]
        assert d.startswith(str(out)), props
    buffers = json.loads(next(out.glob("*comes_and_goes_twice*")).joinpath("buffers.json").read_text())
    assert len(buffers) == 2 and all(b["moves"][0]["verdict"] == "REFAULTED" for b in buffers)
    run_dir = next(next(out.glob("*as_vmlab_run_would*")).glob("run-1-mine"))
    assert json.loads((run_dir / "results.json").read_text())["passed"] is True
    [lab_dir] = (out / "_labs").glob("trixie-*")          # one lab for the whole file
    assert (lab_dir / "lab-console.log").exists()
    assert qemu_pids(str(out)) == []
