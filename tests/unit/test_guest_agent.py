"""Tests of guest-images/agent/vmlab-guest-agent.c against regular files (--path).

The agent is built once per module with the documented gcc line; nothing here
needs a VM, a PCI device or root.
"""
from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.prereq import need_tools

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vmlab import oracle, stamp  # noqa: E402

SRC = ROOT / "guest-images" / "agent" / "vmlab-guest-agent.c"
SRCS = sorted(SRC.parent.glob("*.c"))
UAPI = ROOT / "host-tools" / "vmlab-exporter" / "include" / "uapi"
VECTORS = ROOT / "host-tools" / "stamp-vectors.txt"
PAGE = stamp.PAGE_SIZE


@pytest.fixture(scope="module")
def agent(tmp_path_factory) -> Path:
    need_tools("gcc")
    out = tmp_path_factory.mktemp("agent") / "vmlab-guest-agent"
    # the agent is every guest-images/agent/*.c compiled together (gpu.c holds "gpu ...")
    cmd = ["gcc", "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-I", str(UAPI),
           "-o", str(out), *map(str, SRCS)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"build failed:\n{r.stderr}"
    return out


def run(agent: Path, *args, check_rc: int | None = 0, timeout: float = 30):
    r = subprocess.run([str(agent), *map(str, args)], capture_output=True, text=True,
                       timeout=timeout)
    if check_rc is not None:
        assert r.returncode == check_rc, (r.returncode, r.stdout, r.stderr)
    return r


def run_json(agent: Path, *args, check_rc: int = 0):
    r = run(agent, *args, check_rc=check_rc)
    lines = r.stdout.splitlines()
    assert len(lines) == 1, r.stdout
    return json.loads(lines[0])


def make_buffer(path: Path, specs) -> Path:
    """specs: list of (buffer_id, generation, state) per page; page_index = position."""
    path.write_bytes(b"".join(stamp.stamp_page(bid, gen, i, st)
                              for i, (bid, gen, st) in enumerate(specs)))
    return path


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# -- build / trivial commands ------------------------------------------------------

def test_version(agent):
    assert run_json(agent, "version") == {"agent": "vmlab-guest-agent", "version": 1}


def test_makefile_out_override(tmp_path):
    need_tools("make", "gcc")
    out = tmp_path / "sub" / "agent-from-make"
    out.parent.mkdir()
    r = subprocess.run(["make", "-C", str(SRC.parent), f"OUT={out}"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert run_json(out, "version")["agent"] == "vmlab-guest-agent"


# -- vectors ----------------------------------------------------------------------

def test_vectors_pass(agent):
    res = run_json(agent, "vectors", VECTORS)
    n = sum(1 for ln in VECTORS.read_text().splitlines() if ln.strip() and not ln.startswith("#"))
    assert res["vectors"] == n == len(stamp.VECTOR_INPUTS)
    assert res["failed"] == 0


def test_vectors_corrupted_fails(agent, tmp_path):
    lines = VECTORS.read_text().splitlines()
    # flip the last hex digit of the fnv1a64 of the first vector, and the checksum of another
    out = []
    data_idx = [i for i, ln in enumerate(lines) if ln.strip() and not ln.startswith("#")]
    for i, ln in enumerate(lines):
        if i == data_idx[0]:
            ln = ln[:-1] + ("0" if ln[-1] != "0" else "1")
        elif i == data_idx[3]:
            f = ln.split()
            f[4] = f"{int(f[4], 16) ^ 0x10:08x}"
            ln = " ".join(f)
        out.append(ln)
    bad = tmp_path / "bad-vectors.txt"
    bad.write_text("\n".join(out) + "\n")
    r = run(agent, "vectors", bad, check_rc=1)
    res = json.loads(r.stdout)
    assert res["vectors"] == len(data_idx)
    assert res["failed"] == 2
    assert res["failed_lines"] == [data_idx[0] + 1, data_idx[3] + 1]
    err = r.stderr.splitlines()
    assert len(err) == 1 and err[0].startswith("vmlab-guest-agent: ")


def test_vectors_regenerated_from_python(agent, tmp_path):
    f = tmp_path / "v.txt"
    f.write_text("# regenerated\n" + "\n".join(stamp.vector_lines()) + "\n")
    assert run_json(agent, "vectors", f) == {"vectors": len(stamp.VECTOR_INPUTS), "failed": 0,
                                             "failed_lines": []}


# -- read -------------------------------------------------------------------------

SPECS = [(7, 1, stamp.LIVE), (7, 1, stamp.LIVE), (7, 2, stamp.LIVE), (7, 2, stamp.RETIRED),
         (7, 3, stamp.LIVE), (0xFFFFFFFFFFFFFFF0, 0xFFFFFFFFFFFFFFFF, stamp.RETIRED)]


def test_read_generations_and_states(agent, tmp_path):
    f = make_buffer(tmp_path / "buf", SPECS)
    res = run_json(agent, "read", "--path", f)
    assert res["caching"] == "uc" and res["memtype"] == "n/a"
    assert res["pages"] == len(SPECS)
    assert isinstance(res["read_ns"], int) and res["read_ns"] >= 0
    # pages 0 and 1 differ only in their index: one run of two
    assert res["runs"][0] == [0, 2, "ok", 7, 1, 0, stamp.LIVE, 0] and len(res["runs"]) == 5
    recs = oracle.records(res)
    assert [r[0] for r in recs] == list(range(len(SPECS)))
    for rec, (i, (bid, gen, st)) in zip(recs, enumerate(SPECS)):
        assert rec == [i, "ok", bid, gen, i, st, 0]
    assert res["summary"] == {"ok/1/1": 2, "ok/2/1": 1, "ok/2/2": 1, "ok/3/1": 1,
                              f"ok/{0xFFFFFFFFFFFFFFFF}/2": 1}


def test_read_range_and_caching_flag(agent, tmp_path):
    f = make_buffer(tmp_path / "buf", SPECS)
    res = run_json(agent, "read", "--path", f, "--first", 2, "--count", 3, "--caching", "wc")
    assert res["caching"] == "wc" and res["memtype"] == "n/a"
    assert res["pages"] == 3
    assert [(r[0], r[3], r[5]) for r in oracle.records(res)] == [(2, 2, 1), (3, 2, 2), (4, 3, 1)]
    r = run(agent, "read", "--path", f, "--first", 5, "--count", 2, check_rc=1)
    assert r.stderr.startswith("vmlab-guest-agent: ") and len(r.stderr.splitlines()) == 1


def test_read_detects_corruption(agent, tmp_path):
    f = make_buffer(tmp_path / "buf", [(3, 1, stamp.LIVE)] * 4)
    flip(f, 1 * PAGE + stamp.PATTERN_OFF + 100)   # pattern: covered by the checksum
    flip(f, 2 * PAGE + 0)                          # magic
    flip(f, 3 * PAGE + stamp.GUEST_OFF + 500)      # guest area: not checked
    res = run_json(agent, "read", "--path", f)
    assert [r[1] for r in oracle.records(res)] == ["ok", "bad_csum", "bad_magic", "ok"]
    # python mirror agrees
    data = f.read_bytes()
    p1 = stamp.parse_page(data[PAGE:2 * PAGE])
    assert p1.magic_ok and not p1.checksum_ok
    assert not stamp.parse_page(data[2 * PAGE:3 * PAGE]).magic_ok
    assert res["summary"] == {"ok/1/1": 2, "bad_csum/1/1": 1, "bad_magic/1/1": 1}


def test_read_bad_pattern(agent, tmp_path):
    """Pattern changed but checksum recomputed: only the pattern check catches it."""
    page = bytearray(stamp.stamp_page(3, 1, 0))
    page[stamp.PATTERN_OFF + 8] ^= 0xFF
    struct.pack_into("<I", page, stamp.CSUM_OFF, stamp.checksum(bytes(page)))
    f = tmp_path / "buf"
    f.write_bytes(bytes(page))
    res = run_json(agent, "read", "--path", f)
    assert oracle.records(res)[0][1] == "bad_pattern"


def test_bad_file_size(agent, tmp_path):
    f = tmp_path / "odd"
    f.write_bytes(b"\0" * (PAGE + 1))
    r = run(agent, "read", "--path", f, check_rc=1)
    assert r.stdout == "" and r.stderr.startswith("vmlab-guest-agent: ")
    r = run(agent, "read", "--path", tmp_path / "missing", check_rc=1)
    assert "missing" in r.stderr


# -- write ------------------------------------------------------------------------

def test_write_tag_then_read(agent, tmp_path):
    f = make_buffer(tmp_path / "buf", [(9, 4, stamp.LIVE)] * 5)
    tag = 0xDEADBEEFCAFEF00D  # > 2**53
    res = run_json(agent, "write", "--path", f, "--tag", tag, "--first", 1, "--count", 3)
    assert res == {"written": 3, "tag": tag, "store": "plain", "readback_ok": True}
    res = run_json(agent, "read", "--path", f)
    assert [r[6] for r in oracle.records(res)] == [0, tag, tag, tag, 0]
    assert all(r[1] == "ok" for r in oracle.records(res))  # guest area is outside the checksum
    data = f.read_bytes()
    parsed = [stamp.parse_page(data[i * PAGE:(i + 1) * PAGE]) for i in range(5)]
    assert [p.tag for p in parsed] == [0, tag, tag, tag, 0]
    assert all(p.valid for p in parsed)
    # hex tag and whole buffer
    res = run_json(agent, "write", "--path", f, "--tag", "0x2a")
    assert res == {"written": 5, "tag": 42, "store": "plain", "readback_ok": True}
    assert [stamp.parse_page(f.read_bytes()[i * PAGE:]).tag for i in range(5)] == [42] * 5
    # the same tag through one 32-byte VEX store per page; the 24 bytes after it unchanged
    before = f.read_bytes()
    res = run_json(agent, "write", "--path", f, "--tag", 7, "--store", "avx")
    assert res == {"written": 5, "tag": 7, "store": "avx", "readback_ok": True}
    after = f.read_bytes()
    assert [stamp.parse_page(after[i * PAGE:]).tag for i in range(5)] == [7] * 5
    off = stamp.GUEST_OFF
    assert all(after[i * PAGE + off + 8:i * PAGE + off + 32] == before[i * PAGE + off + 8:i * PAGE + off + 32]
               for i in range(5))
    assert run(agent, "write", "--path", f, "--tag", 1, "--store", "sse", check_rc=2).returncode == 2


# -- map --------------------------------------------------------------------------

def test_map_path(agent, tmp_path):
    f = make_buffer(tmp_path / "buf", [(1, 1, stamp.LIVE)] * 3)
    res = run_json(agent, "map", "--path", f, "--caching", "wb")
    assert res["caching"] == "wb" and res["memtype"] == "n/a" and res["pat_line"] is None
    assert res["size"] == 3 * PAGE


# -- pat line parsing (via --pat-file) ------------------------------------------------

PAT_SAMPLE = """PAT memtype list:
PAT: [mem 0x000000000009f000-0x00000000000a1000] write-back
PAT: [mem 0x00000000fd000000-0x00000000fe000000] write-combining
PAT: [mem 0x0000004000000000-0x0000004000001000] uncached-minus
"""


@pytest.mark.parametrize("phys,memtype", [
    (0xFD000000, "write-combining"), (0xFDFFFFFF, "write-combining"),
    (0xFE000000, None), (0x4000000000, "uncached-minus"), (0x9F000, "write-back"),
    (0x1234, None),
])
def test_pat_lookup(agent, tmp_path, phys, memtype):
    f = tmp_path / "pat"
    f.write_text(PAT_SAMPLE)
    res = run_json(agent, "pat", "--pat-file", f, "--phys", hex(phys))
    assert res["lines"] == PAT_SAMPLE.splitlines()
    if memtype is None:
        assert res["memtype"] == "unknown" and res["pat_line"] is None
    else:
        assert res["memtype"] == memtype
        assert res["pat_line"].startswith("PAT: [mem ") and res["pat_line"].endswith(memtype)


# -- watch ------------------------------------------------------------------------

def _watch_lines(stdout: str):
    return [json.loads(ln) for ln in stdout.splitlines()]


def test_watch_sees_generation_change(agent, tmp_path):
    n = 4
    f = make_buffer(tmp_path / "buf", [(5, 1, stamp.LIVE)] * n)
    proc = subprocess.Popen([str(agent), "watch", "--path", str(f), "--duration", "1",
                             "--interval-us", "200"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    first = [json.loads(proc.stdout.readline()) for _ in range(2)]  # initial observations

    def rewrite():
        time.sleep(0.2)
        with open(f, "r+b") as fh:
            for i in range(n):
                fh.seek(i * PAGE)
                fh.write(stamp.stamp_page(5, 2, i, stamp.LIVE))
            fh.flush()

    t = threading.Thread(target=rewrite)
    t.start()
    rest, err = proc.communicate(timeout=10)
    t.join()
    assert proc.returncode == 0, err
    lines = first + _watch_lines(rest)
    assert {(ln["page"], ln["generation"], ln["status"]) for ln in first} == \
        {(0, 1, "ok"), (n - 1, 1, "ok")}
    done = lines[-1]
    assert done["done"] is True and done["reads"] > 2
    assert 0.9e9 <= done["duration_ns"] < 5e9
    events = lines[:-1]
    assert all(not ln.get("done") for ln in events)
    for page in (0, n - 1):
        ev = [ln for ln in events if ln["page"] == page]
        assert ev[0]["generation"] == 1 and ev[0]["status"] == "ok"
        # may pass through a torn state, but must settle on generation 2 / ok
        assert ev[-1]["generation"] == 2 and ev[-1]["status"] == "ok" and ev[-1]["state"] == 1
        assert all(a["t_ns"] <= b["t_ns"] for a, b in zip(ev, ev[1:]))


def test_watch_pages_option_and_sigterm(agent, tmp_path):
    f = make_buffer(tmp_path / "buf", [(5, 1, stamp.LIVE), (5, 1, stamp.RETIRED),
                                      (5, 3, stamp.LIVE)])
    proc = subprocess.Popen([str(agent), "watch", "--path", str(f), "--duration", "30",
                             "--pages", "1,2"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    first = [json.loads(proc.stdout.readline()) for _ in range(2)]
    proc.send_signal(signal.SIGTERM)
    rest, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert sorted((ln["page"], ln["generation"], ln["state"]) for ln in first) == \
        [(1, 1, 2), (2, 3, 1)]
    done = _watch_lines(rest)[-1]
    assert done["done"] is True and done["duration_ns"] < 20e9


def test_watch_sigbus_reported(agent, tmp_path):
    """Truncating the mapped file makes the next load SIGBUS: exit 3 with a JSON error."""
    f = make_buffer(tmp_path / "buf", [(5, 1, stamp.LIVE)] * 2)
    proc = subprocess.Popen([str(agent), "watch", "--path", str(f), "--duration", "10",
                             "--interval-us", "100"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    [json.loads(proc.stdout.readline()) for _ in range(2)]
    os.truncate(f, 0)
    rest, err = proc.communicate(timeout=10)
    assert proc.returncode == 3, (rest, err)
    last = _watch_lines(rest)[-1]
    assert last["error"] == "SIGBUS" and last["page"] in (0, 1)


def test_a_sigbus_sent_with_kill_is_no_fault_of_the_mapping(agent, tmp_path):
    """Only a fault the kernel raised on the mapping is a guest fault: a SIGBUS from
    kill() kills the agent (the controller sees it die), it is not blamed on a page."""
    import signal
    f = make_buffer(tmp_path / "buf", [(5, 1, stamp.LIVE)] * 2)
    proc = subprocess.Popen([str(agent), "watch", "--path", str(f), "--duration", "10",
                             "--interval-us", "100"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    [json.loads(proc.stdout.readline()) for _ in range(2)]
    proc.send_signal(signal.SIGBUS)
    rest, err = proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGBUS, (rest, err)
    assert not any("error" in ln for ln in _watch_lines(rest)), rest


# -- usage errors -----------------------------------------------------------------

@pytest.mark.parametrize("args", [
    [], ["frobnicate"], ["read", "--bogus", "1"], ["read", "--caching", "nc"],
    ["read", "--first"], ["read", "--count", "abc"], ["write", "--path", "x"],
    ["watch", "--path", "x"], ["vectors"], ["read", "stray"], ["write", "--tag", "-1"],
    # strtoull skips blanks and takes a sign: " -1" was 2^64 - 1
    ["write", "--tag", " -1"], ["write", "--tag", "+1"], ["read", "--first", " 1"],
])
def test_usage_errors(agent, args):
    r = run(agent, *args, check_rc=2)
    assert r.stdout == ""
    err = r.stderr.splitlines()
    assert len(err) == 1 and err[0].startswith("vmlab-guest-agent: "), r.stderr


def test_find_without_device(agent):
    """On a machine without ivshmem (like the test host) find fails cleanly with exit 1."""
    r = run(agent, "find", "--device", "0000:ff:1f.7", check_rc=1)
    assert r.stdout == ""
    assert r.stderr.startswith("vmlab-guest-agent: ") and len(r.stderr.splitlines()) == 1


# -- gpu (only what runs without a virtio-gpu) ----------------------------------------

def test_gpu_probe_missing_card(agent):
    r = run(agent, "gpu", "probe", "--card", "/nonexistent", check_rc=1)
    assert r.stdout == ""
    err = r.stderr.splitlines()
    assert len(err) == 1, r.stderr
    assert err[0].startswith("vmlab-guest-agent: gpu probe: ") and "/nonexistent" in err[0]


@pytest.mark.parametrize("sub", ["probe", "host-blob"])
def test_gpu_not_a_drm_device(agent, sub):
    """A non-DRM node fails at the first ioctl, which the error line names."""
    r = run(agent, "gpu", sub, "--card", "/dev/null", check_rc=1)
    assert r.stdout == ""
    err = r.stderr.splitlines()
    assert len(err) == 1 and err[0].startswith(f"vmlab-guest-agent: gpu {sub}: "), r.stderr
    assert "DRM_IOCTL_VERSION" in err[0]


@pytest.mark.parametrize("args", [
    ["gpu"], ["gpu", "frobnicate"], ["gpu", "blob-scanout"],
    ["gpu", "blob-scanout", "--width", "64"], ["gpu", "probe", "--bogus", "1"],
    ["gpu", "probe", "--card"], ["gpu", "blob-scanout", "--seed", "-1"],
    ["gpu", "blob-scanout", "--seed", "1", "--rewrite-seed", "2"],
    ["gpu", "blob-scanout", "--seed", "1", "--hold", "soon"],
    ["gpu", "blob-scanout", "--seed", "1", "--width", "0"],
    ["gpu", "host-blob", "--size", "0"], ["gpu", "host-blob", "--seed", "1", "stray"],
])
def test_gpu_usage_errors(agent, args):
    r = run(agent, *args, check_rc=2)
    assert r.stdout == ""
    err = r.stderr.splitlines()
    assert len(err) == 1 and err[0].startswith("vmlab-guest-agent: usage: "), r.stderr


# -- serve: one process, framed replies ------------------------------------------------

def _serve(agent: Path, lines: list[str], *, sigchld_ignored: bool = False):
    """Feed ``lines`` to `serve`; returns [(status, stdout, stderr)] parsed from the frames."""
    pre = (lambda: signal.signal(signal.SIGCHLD, signal.SIG_IGN)) if sigchld_ignored else None
    r = subprocess.run([str(agent), "serve"], input="".join(ln + "\n" for ln in lines).encode(),
                       capture_output=True, timeout=60, preexec_fn=pre)
    assert r.returncode == 0, r.stderr
    data, out = r.stdout, []
    while data:
        head, _, data = data.partition(b"\n")
        tag, status, n_out, n_err = head.split(b" ")
        assert tag == b"VMLAB-REPLY"
        n_out, n_err = int(n_out), int(n_err)
        out.append((int(status), data[:n_out].decode(), data[n_out:n_out + n_err].decode()))
        data = data[n_out + n_err:]
    return out


@pytest.mark.parametrize("sigchld_ignored", [False, True])
def test_serve_frames_each_command_with_its_own_status(agent, tmp_path, sigchld_ignored):
    """The same statuses and output as separate processes, even when the agent was
    started with SIGCHLD ignored (a made-up status 0 would turn a fault into a pass)."""
    # a generation per page, so no two pages make one run: > 64 KiB of JSON, more than a pipe holds
    big = make_buffer(tmp_path / "big", [(9, 10**15 + g, stamp.LIVE) for g in range(1024)])
    gone = tmp_path / "gone"
    replies = _serve(agent, ["version", f"read --path {big}", f"read --path {gone}",
                             "frobnicate", "watch --path x", " ".join(["version"] * 40),
                             "version"], sigchld_ignored=sigchld_ignored)
    assert len(replies) == 7, replies
    assert replies[0][0] == 0 and json.loads(replies[0][1])["agent"] == "vmlab-guest-agent"
    status, out, _ = replies[1]
    assert status == 0 and len(out) > 65536 and len(oracle.records(json.loads(out))) == 1024
    assert replies[2][0] != 0 and gone.name in replies[2][2]          # die() in the child
    assert replies[3][0] == 2 and "unknown command" in replies[3][2]
    assert replies[4][0] == 2 and "one-shot" in replies[4][2]
    assert replies[5][0] == 2 and "32 words" in replies[5][2]
    assert replies[6][0] == 0                                          # still serving


def test_serve_skips_the_rest_of_an_over_long_line(agent):
    replies = _serve(agent, ["version " + "x" * 5000, "version"])
    assert [r[0] for r in replies] == [2, 0] and "longer than" in replies[0][2]


def test_watch_reports_an_unstamped_page_as_a_hole(agent, tmp_path):
    """A page of zeros (or of ones) has no stamp at all: a VMM's unmap window, reported as
    "hole", which the oracle never counts as stale."""
    f = make_buffer(tmp_path / "buf", [(5, 1, stamp.LIVE)] * 3)
    with open(f, "r+b") as fh:
        fh.seek(0)
        fh.write(bytes(PAGE))
        fh.seek(2 * PAGE)
        fh.write(b"\xff" * PAGE)
    r = subprocess.run([str(agent), "watch", "--path", str(f), "--duration", "0.2",
                        "--pages", "0,1,2"], capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    ev = {ln["page"]: ln["status"] for ln in _watch_lines(r.stdout) if "page" in ln}
    assert ev == {0: "hole", 1: "ok", 2: "hole"}


@pytest.mark.parametrize("args,msg", [
    (["--pci-id", "1af4"], "bad --pci-id"),
    (["--pci-id", "1af4:zz"], "bad --pci-id"),
    (["--pci-id", "12345:1"], "bad --pci-id"),
    (["--bar", "6"], "--bar is 0..5"),
])
def test_device_options_are_checked(agent, args, msg):
    r = subprocess.run([str(agent), "find", *args], capture_output=True, text=True, timeout=10)
    assert r.returncode == 2 and msg in r.stderr, r.stderr


def test_virtio_start_needs_a_device(agent):
    r = subprocess.run([str(agent), "virtio-start", "--pci-id", "1af4:1055", "--bar", "4"],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 1 and "no PCI device 1af4:1055" in r.stderr, r.stderr
    r = subprocess.run([str(agent), "virtio-start", "--path", "/dev/null"],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 2 and "--path makes no sense" in r.stderr, r.stderr


# -- kernel-state ------------------------------------------------------------------

def test_kernel_state_prints_the_log_as_busybox_dmesg_does(agent, tmp_path):
    """The taint mask, then each line without its "<level>" (only at a line's start), and
    a newline at the end: busybox dmesg's output, so the health check may compare a start
    taken from the agent with an end taken over an exec."""
    raw = tmp_path / "klog"
    raw.write_bytes(b"<6>[    1.000000] Linux version 6.12\n<4>[    2.000000] WARNING: x <y> z\n"
                    b"no level <3> here\n<12>[    3.000000] last")
    r = run(agent, "kernel-state", "--path", raw)
    taint, _, log = r.stdout.partition("\n")
    assert taint == open("/proc/sys/kernel/tainted").read().strip()
    assert log == ("[    1.000000] Linux version 6.12\n[    2.000000] WARNING: x <y> z\n"
                   "no level <3> here\n[    3.000000] last\n")
    # the real log, when this machine lets us read it: the taint line, then text
    r = run(agent, "kernel-state", check_rc=None)
    if r.returncode == 0:
        assert r.stdout.split("\n", 1)[0].isdigit()


def test_serve_over_a_channel_is_idle_until_a_failure_or_close(agent, tmp_path):
    """GuestAgent.idle (every command answered, so no child of it maps anything: a run
    then skips the guest-wide pkill) holds after commands that ran, whatever their
    status, and ends with a command that did not answer, and with close."""
    from vmlab.errors import WaitTimeout
    from vmlab.guest_agent import GuestAgent
    from vmlab.local_session import LocalSession
    ga = GuestAgent(LocalSession(), binary=str(agent))
    assert ga.idle and ga.run("version", timeout=30)[0] == 0
    assert ga.run(f"read --path {tmp_path / 'gone'}", timeout=30)[0] != 0 and ga.idle
    ga.close(wait=10)
    assert not ga.idle
    # a "serve" that never answers: the command times out and the channel is closed
    stuck = tmp_path / "stuck-agent"
    stuck.write_text("#!/bin/sh\nexec sleep 30\n")
    stuck.chmod(0o755)
    ga = GuestAgent(LocalSession(), binary=str(stuck))
    with pytest.raises(WaitTimeout):
        ga.run("version", timeout=0.5)
    assert not ga.idle
