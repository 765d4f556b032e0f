"""The guest's live watcher: the guest agent in watch mode, its JSON lines read over one
SSH channel as they come, each stamped with the controller's clock on arrival."""
from __future__ import annotations

import json
import logging
import threading
import time

from . import oracle
from .ssh import ChannelReader

AGENT = "vmlab-guest-agent"
log = logging.getLogger("vmlab.watch")


class Watch:
    """The guest agent in watch mode on pages 0 and last, read live over one SSH channel.

    A thread of its own reads the channel, so a line is stamped when it arrives, also
    while the controller waits for the host agent's answer to a move: read only after
    that answer, a line the guest wrote during the move would carry the move's whole
    round trip as its latency."""

    def __init__(self, guest, mapping: str):
        self.chan = guest.session.open_exec(
            f"{AGENT} watch --duration 3600 --interval-us 100 --caching {mapping}")
        self.buf = bytearray()
        self.events: list[dict] = []
        self._judged = 0               # events[:_judged] have been handed to a move
        self.lost: str | None = None   # why the reader stopped early, if it did
        self._new = threading.Condition()
        self._stop = threading.Event()
        self.reader = ChannelReader(self.chan, "guest watcher", on_out=self._feed)
        self._thread = threading.Thread(target=self._read, name="guest-watcher", daemon=True)
        self._thread.start()
        self._wait_for(lambda: bool(self.events), 2.0)   # its first look at the buffer

    def _read(self) -> None:
        # the agent watches for an hour (--duration 3600); the pump outlasts it
        why = None
        try:
            how = self.reader.pump(time.monotonic() + 7200, stop=self._stop.is_set, soft=True)
            if how == "deadline":
                why = "the watcher's reader ran out of time"
        except Exception as e:      # a dead session, a bad line: the watcher is lost
            why = f"{type(e).__name__}: {e}"
            log.warning("guest watcher: %s", why)
        finally:
            with self._new:
                if why and not self._stop.is_set():
                    self.lost = why
                self._new.notify_all()

    def _feed(self, data: bytes) -> None:
        self.buf += data
        while b"\n" in self.buf:
            i = self.buf.index(b"\n")
            line = bytes(self.buf[:i])
            del self.buf[:i + 1]
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if not isinstance(ev, dict):
                continue
            ev["rx"] = time.monotonic()
            with self._new:
                self.events.append(ev)
                self._new.notify_all()

    def _wait_for(self, cond, timeout: float) -> bool:
        """Until ``cond()`` (checked under the lock the reader appends under), the reader
        ends, or ``timeout``."""
        end = time.monotonic() + timeout
        with self._new:
            while not cond():
                left = end - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return cond()
                self._new.wait(min(left, 0.5))
        return True

    def _first(self, gen: int, t_sent: float) -> dict | None:
        return next((e for e in self.events if e.get("generation") == gen and e.get("status") == "ok"
                     and e["rx"] >= t_sent), None)

    def wait_generation(self, gen: int, t_sent: float, timeout: float) -> dict:
        """Until the watcher shows generation ``gen`` (or exits, or ``timeout``)."""
        self._wait_for(lambda: self._first(gen, t_sent) is not None or self.exited(), timeout)
        with self._new:
            hit = self._first(gen, t_sent)
        if hit:
            return {"seen": True, "latency_s": round(hit["rx"] - t_sent, 6)}
        return {"seen": False, "latency_s": None}

    def exited(self) -> bool:
        """The watcher can no longer vouch for anything: its agent exited, its channel
        closed, or nothing reads its lines any more."""
        return self.chan.exit_status_ready() or self.chan.closed or not self._thread.is_alive()

    def last(self, n: int) -> list[dict]:
        with self._new:
            return [{k: v for k, v in e.items() if k != "rx"} for e in self.events[-n:]]

    def take_unjudged(self) -> list[dict]:
        """Every line that arrived since the last call, each handed out once: what the
        guest saw between two moves is judged with the next, never dropped."""
        with self._new:
            new = self.events[self._judged:]
            self._judged = len(self.events)
        return new

    def close(self) -> dict:
        # the reader first: a channel closed under its select() may take its fd with it
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.chan.close()
        except Exception:
            pass
        with self._new:
            changes = [e for e in self.events if "generation" in e]
        return {"events": len(changes), "stale_observations":
                oracle.watch_stale(changes, generation=0)["stale_observations"]}
