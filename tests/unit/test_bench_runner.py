"""The benches' runner of vmlab as its own process, and the cold bench's account of a log.
The process is a stand-in ``vmlab.cli`` on PYTHONPATH: the runner's boundary."""
from __future__ import annotations

import os
import time

import pytest

from vmlab import bench
from vmlab.errors import VmlabError, WaitTimeout

_CLI = """import signal, sys, time
def main():
    print("[vmlab 13:00:00Z    0.1s] step one", file=sys.stderr, flush=True)
    sys.stderr.buffer.write(b"not utf-8: \\xff\\xfe\\n"); sys.stderr.flush()
    if sys.argv[1:] == ["slow"]:
        def bye(*_):
            print("[vmlab 13:00:01Z    1.0s] interrupted: stopping what I started", file=sys.stderr, flush=True)
            sys.exit(130)
        signal.signal(signal.SIGINT, bye)
        time.sleep(60)
    sys.exit(int(sys.argv[1]) if sys.argv[1:] and sys.argv[1].isdigit() else 0)
main()
"""


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)     # python -m looks in the working directory first
    pkg = tmp_path / "fake" / "vmlab"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "cli.py").write_text(_CLI)
    return dict(os.environ, PYTHONPATH=str(tmp_path / "fake"))


def test_a_vmlab_process_is_timed_logged_and_echoed(env, tmp_path):
    said = []
    secs = bench._vmlab_process(("0",), env, "t", log_to=tmp_path / "log", echo=said.append)
    assert secs > 0 and said == ["t: [vmlab 13:00:00Z    0.1s] step one"]
    assert "not utf-8: \ufffd\ufffd" in (tmp_path / "log").read_text()   # kept, not fatal
    with pytest.raises(VmlabError, match="exited 2"):
        bench._vmlab_process(("2",), env, "t")
    assert bench._vmlab_process(("2",), env, "t", ok=(2,)) > 0


def test_a_vmlab_process_past_its_timeout_is_interrupted_like_a_user_would(env, tmp_path):
    t = time.monotonic()
    with pytest.raises(WaitTimeout):
        bench._vmlab_process(("slow",), env, "t", timeout=2, log_to=tmp_path / "log")
    assert time.monotonic() - t < 30                      # SIGINT, not the minute to SIGKILL
    assert "interrupted: stopping what I started" in (tmp_path / "log").read_text()


def test_a_cold_runs_milestones_come_from_its_progress_lines():
    log = ("[vmlab 13:44:50Z    1.0s] building lab image lab-trixie-1 (mmdebstrap)\n"
           "[vmlab 13:46:10Z   81.2s] lab image built in 80.1s\n"
           "noise\n"
           "[vmlab 13:46:40Z  111.0s] baseline read: {'REFAULTED': 256} -> REFAULTED\n"
           "[vmlab 13:46:55Z  126.4s] PASSED: results in /tmp/x\n")
    assert bench._milestones(log) == [
        {"at_s": 81.2, "line": "lab image built in 80.1s"},
        {"at_s": 111.0, "line": "baseline read: {'REFAULTED': 256} -> REFAULTED"},
        {"at_s": 126.4, "line": "PASSED: results in /tmp/x"}]


def test_p99_is_the_nearest_rank_not_simply_the_largest():
    from vmlab.bench import _stats
    assert _stats([float(x) for x in range(1, 101)])["p99"] == 99    # of 100: the 99th
    assert _stats([float(x) for x in range(1, 21)])["p99"] == 20     # of 20 it is the max
    assert _stats([0.5])["p99"] == 0.5 and _stats([]) == {"n": 0}
