"""The live watcher's clock: a line is stamped when it arrives, not when the controller
next looks (it may be waiting for the host agent's answer to a move meanwhile)."""
from __future__ import annotations

import json
import shlex
import sys
import time
from types import SimpleNamespace

from vmlab.local_session import LocalSession
from vmlab.watch import Watch


class _Session(LocalSession):
    """Runs a stand-in for the guest agent's watch mode instead of the command asked for."""

    def __init__(self, script: str):
        self.script = script

    def open_exec(self, command: str):
        assert " watch " in command
        return super().open_exec(f"{shlex.quote(sys.executable)} -u -c {shlex.quote(self.script)}")


def _lines(*timed) -> str:
    """A script that prints each (delay, event) as a JSON line after its delay."""
    body = "".join(f"time.sleep({d}); print(json.dumps({json.dumps(ev)}))\n" for d, ev in timed)
    return "import json, time\n" + body + "time.sleep(4)\n"


def test_a_line_is_stamped_on_arrival_while_the_controller_is_busy():
    ok = {"page": 0, "state": 1, "status": "ok"}
    w = Watch(SimpleNamespace(session=_Session(_lines((0.0, dict(ok, generation=1)),
                                                      (0.6, dict(ok, generation=2))))), "uc")
    try:
        t_sent = time.monotonic()
        time.sleep(1.5)            # the move's round trip: nobody reads the watcher here
        got = w.wait_generation(2, t_sent, timeout=5)
        assert got["seen"] and got["latency_s"] < 1.2, got
        # every line is handed to a judgement once: the one before the move too
        assert [e["generation"] for e in w.take_unjudged()] == [1, 2]
        assert w.take_unjudged() == []
    finally:
        res = w.close()
    assert res["events"] == 2


def test_a_watcher_that_never_shows_the_generation_is_not_seen():
    w = Watch(SimpleNamespace(session=_Session(_lines((0.0, {"page": 0, "generation": 1, "state": 1,
                                                             "status": "ok"})))), "uc")
    try:
        t0 = time.monotonic()
        assert w.wait_generation(2, t0, timeout=0.5) == {"seen": False, "latency_s": None}
        assert time.monotonic() - t0 < 2
        assert w.last(1)[0]["generation"] == 1 and "rx" not in w.last(1)[0]
    finally:
        w.close()


def test_a_watcher_whose_reader_died_is_lost_not_stale():
    """A line that is JSON but no object is skipped; a session that dies ends the reader,
    and then the watcher has exited (GUEST_FAULT for the move), never "alive but never
    showed the generation" (STALE)."""
    w = Watch(SimpleNamespace(session=_Session(_lines((0.0, [1, 2]), (0.0, {"page": 0, "generation": 1,
                                                                           "state": 1, "status": "ok"})))), "uc")
    try:
        assert [e["generation"] for e in w.take_unjudged()] == [1]
        w.reader.pump = lambda *a, **k: (_ for _ in ()).throw(OSError("session died"))
        w._stop.set()
        w._thread.join(5)            # the reader as it was: stopped by us, not lost
        assert w.lost is None
        w._stop.clear()
        import threading
        w._thread = threading.Thread(target=w._read, daemon=True)
        w._thread.start()
        w._thread.join(5)
        assert w.exited() and "session died" in w.lost
        assert w.wait_generation(2, time.monotonic(), timeout=5) == {"seen": False, "latency_s": None}
    finally:
        w.close()
