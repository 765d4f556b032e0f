"""The guest's live watcher: the guest agent in watch mode, its JSON lines read over one
SSH channel as they come, each stamped with the controller's clock on arrival."""
from __future__ import annotations

import json
import time

from . import oracle
from .ssh import ChannelReader

AGENT = "vmlab-guest-agent"


class Watch:
    """The guest agent in watch mode on pages 0 and last, read live over one SSH channel."""

    def __init__(self, guest, mapping: str):
        self.chan = guest.session.open_exec(
            f"{AGENT} watch --duration 3600 --interval-us 100 --caching {mapping}")
        self.buf = bytearray()
        self.events: list[dict] = []
        self.reader = ChannelReader(self.chan, "guest watcher", on_out=self._feed)
        self._pump(0.5)

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
            ev["rx"] = time.monotonic()
            self.events.append(ev)

    def _pump(self, seconds: float) -> None:
        if not self.exited():
            self.reader.pump(time.monotonic() + seconds, soft=True)

    def _first(self, gen: int, t_sent: float) -> dict | None:
        return next((e for e in self.events if e.get("generation") == gen and e.get("status") == "ok"
                     and e["rx"] >= t_sent), None)

    def wait_generation(self, gen: int, t_sent: float, timeout: float) -> dict:
        """Until the watcher shows generation ``gen`` (or exits, or ``timeout``): the pump
        returns on the line that shows it, not at the end of a polling slice."""
        end = time.monotonic() + timeout
        while True:
            hit = self._first(gen, t_sent)
            if hit:
                return {"seen": True, "latency_s": round(hit["rx"] - t_sent, 6)}
            if self.exited() or time.monotonic() >= end:
                return {"seen": False, "latency_s": None}
            self.reader.pump(end, stop=lambda: self._first(gen, t_sent) is not None, soft=True)

    def exited(self) -> bool:
        return self.chan.exit_status_ready() or self.chan.closed

    def last(self, n: int) -> list[dict]:
        return [{k: v for k, v in e.items() if k != "rx"} for e in self.events[-n:]]

    def events_between(self, t0: float, t1: float) -> list[dict]:
        if not self.exited():  # take what has arrived, without waiting for more
            self.reader.pump(time.monotonic(), soft=True)
        return [e for e in self.events if t0 <= e["rx"] <= t1]

    def close(self) -> dict:
        try:
            self.chan.close()
        except Exception:
            pass
        changes = [e for e in self.events if "generation" in e]
        return {"events": len(changes), "stale_observations":
                oracle.watch_stale(changes, generation=0)["stale_observations"]}
