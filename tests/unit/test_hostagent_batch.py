"""The host agent's batch op, on a real ``hostagent.py serve`` process on this machine
(requests that need no exporter: ping, an unknown op, a bad request): answers in
order, each as it would be alone, the batch ended by a failure unless it may fail."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.prereq import missing

ROOT = Path(__file__).resolve().parents[2]
AGENT = ROOT / "vmlab" / "hostagent.py"


@pytest.fixture
def agent(tmp_path):
    p = subprocess.Popen([sys.executable, "-S", "-u", str(AGENT), "serve"],
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=open(tmp_path / "agent.log", "wb"))
    yield p
    p.stdin.close()
    assert p.wait(timeout=30) == 0


def ask(p, req) -> dict:
    p.stdin.write((json.dumps(req) + "\n").encode())
    p.stdin.flush()
    line = p.stdout.readline()
    assert line, "the agent exited"
    return json.loads(line)


def test_answers_in_order_and_a_failure_ends_the_batch_unless_it_may_fail(agent):
    got = ask(agent, {"op": "batch", "requests": [
        {"op": "ping"}, {"op": "nonsense", "may_fail": True}, {"op": "ping"},
        {"op": "nonsense"}, {"op": "ping"}]})
    assert got["ok"]
    answers = got["answers"]
    assert [a["ok"] for a in answers] == [True, False, True, False]     # the 5th never ran
    assert answers[1]["errname"] == "EINVAL" and "nonsense" in answers[1]["error"]
    assert len(got["elapsed_s"]) == 4 and all(t >= 0 for t in got["elapsed_s"])
    assert ask(agent, {"op": "ping"}) == {"ok": True}     # still in step


@pytest.mark.parametrize("requests", [None, "ping", [{"op": "ping"}, "ping"],
                                      [{"op": "batch", "requests": []}]])
def test_a_malformed_batch_is_refused_whole(agent, requests):
    got = ask(agent, {"op": "batch", "requests": requests})
    assert not got["ok"] and got["errname"] == "EINVAL"
    assert ask(agent, {"op": "ping"}) == {"ok": True}


def test_a_line_that_is_no_request_is_an_error_not_an_exit(agent):
    for line in (b"not json\n", b"[1, 2]\n"):
        agent.stdin.write(line)
        agent.stdin.flush()
        got = json.loads(agent.stdout.readline())
        assert not got["ok"] and got["errname"] == "EINVAL"
    assert ask(agent, {"op": "ping"}) == {"ok": True}


def test_the_controller_maps_answers_to_results_and_the_unrun_to_none(agent, tmp_path):
    """exporter.HostAgent.batch over the same process (its channel faked by the pipes)."""
    from vmlab import exporter

    class Pipes:
        def request(self, op, timeout=120, **kw):
            resp = ask(agent, {"op": op, **kw})
            assert resp.pop("ok")
            return resp
    h = exporter.HostAgent.__new__(exporter.HostAgent)
    h.request = Pipes().request
    out = exporter.HostAgent.batch(h, [{"op": "ping"}, {"op": "nope"}, {"op": "ping"}])
    assert out[0] == {}
    assert isinstance(out[1], exporter.AgentRequestFailed) and out[1].errname == "EINVAL"
    assert out[2] is None
    assert len(h.batch_elapsed) == 2
    assert exporter.HostAgent.batch(h, []) == []


def test_may_fail_names_the_errors_the_rest_may_follow(agent):
    got = ask(agent, {"op": "batch", "requests": [
        {"op": "nonsense", "may_fail": ["EBUSY"]}, {"op": "ping"}]})
    assert [a["ok"] for a in got["answers"]] == [False]        # EINVAL is not EBUSY
    got = ask(agent, {"op": "batch", "requests": [
        {"op": "nonsense", "may_fail": ["EINVAL"]}, {"op": "ping"}]})
    assert [a["ok"] for a in got["answers"]] == [False, True]


def test_shutdown_closes_and_gives_the_kernel_log_as_lines(agent):
    if not os.access("/dev/kmsg", os.R_OK):
        missing("/dev/kmsg is not readable: the kernel log needs root (CI runs as root)")
    got = ask(agent, {"op": "shutdown"})
    assert got["ok"]
    lines = got["text"].splitlines()
    assert lines, "an empty kernel log"
    assert all(ln.startswith("[") and "] " in ln for ln in lines), lines[:3]
    secs = [float(ln[1:ln.index("]")]) for ln in lines]
    assert secs == sorted(secs)
    assert ask(agent, {"op": "ping"}) == {"ok": True}


def test_kernel_state_reads_the_lines_logged_since_its_mark(agent):
    """op_kernel_state on this machine's own kernel log: a line written to /dev/kmsg after
    the mark is read at the end, one written before it is not, and nothing twice."""
    if not os.access("/dev/kmsg", os.R_OK | os.W_OK):
        missing("/dev/kmsg is not readable: the kernel log needs root (CI runs as root)")
    tag = f"vmlab-test-{os.getpid()}-{time.monotonic_ns()}"
    r = ask(agent, {"op": "kernel_state", "since_mark": True})
    assert r["ok"] is False and "no mark" in r["error"]
    with open("/dev/kmsg", "w") as k:
        k.write(f"{tag} before the mark\n")
    r = ask(agent, {"op": "kernel_state", "mark": True})
    assert r["ok"] and isinstance(r["taint"], int) and "text" not in r
    with open("/dev/kmsg", "w") as k:
        k.write(f"{tag} after the mark\n")
    r = ask(agent, {"op": "kernel_state", "since_mark": True})
    assert r["ok"] and f"{tag} after the mark" in r["text"] and f"{tag} before" not in r["text"]
    assert r["overruns"] == 0
    assert tag not in ask(agent, {"op": "kernel_state", "since_mark": True})["text"]


def test_shutdown_says_what_came_since_the_marks_last_read(agent):
    """What the teardown makes the lab's kernel say (the buffers' close at shutdown, a
    line written here): the lines since the health check's read of the mark."""
    if not os.access("/dev/kmsg", os.R_OK | os.W_OK):
        missing("/dev/kmsg is not readable: the kernel log needs root (CI runs as root)")
    tag = f"vmlab-test-{os.getpid()}-{time.monotonic_ns()}"
    assert ask(agent, {"op": "kernel_state", "mark": True})["ok"]
    with open("/dev/kmsg", "w") as k:
        k.write(f"{tag} during the run\n")
    assert f"{tag} during the run" in ask(agent, {"op": "kernel_state", "since_mark": True})["text"]
    with open("/dev/kmsg", "w") as k:
        k.write(f"{tag} at teardown\n")
    r = ask(agent, {"op": "shutdown"})
    assert r["ok"] and f"{tag} at teardown" in r["text"] and f"{tag} during the run" in r["text"]
    sm = r["since_mark"]
    assert f"{tag} at teardown" in sm["text"] and "during the run" not in sm["text"]
    assert sm["overruns"] == 0 and sm["truncated"] is False
    # the mark went with the shutdown
    assert ask(agent, {"op": "kernel_state", "since_mark": True})["ok"] is False
    assert "since_mark" not in ask(agent, {"op": "shutdown"})
