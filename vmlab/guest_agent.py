"""The guest agent as one long-lived process: ``vmlab-guest-agent serve`` on one SSH
channel. Each command runs in a child the agent forks (exactly as its own process would:
same exit codes, same fault guard), and its exit status and output come back framed:

    VMLAB-REPLY <status> <stdout bytes> <stderr bytes>\\n<stdout><stderr>

So a move's verified read is one round trip on an open channel instead of an SSH exec
(a new session, a shell, an exec of the agent) in the guest.
"""
from __future__ import annotations

import re
import time

from .errors import RemoteError
from .ssh import ChannelReader

_HEADER = re.compile(rb"VMLAB-REPLY (-?\d+) (\d+) (\d+)\n")


class GuestAgent:
    def __init__(self, session, binary: str = "vmlab-guest-agent"):
        self.chan = session.open_exec(f"exec {binary} serve")
        self._buf = bytearray()
        self._err = bytearray()
        self._reader = ChannelReader(self.chan, "guest agent", on_out=self._buf.extend,
                                     on_err=self._err.extend)

    def _reply(self):
        """(status, out, err) when a whole reply is buffered, else None."""
        m = _HEADER.match(self._buf)
        if not m:
            if b"\n" in self._buf:
                raise RemoteError(f"guest agent: garbled reply {bytes(self._buf[:64])!r}")
            return None
        # read the groups now: a match on a bytearray slices the live buffer later
        status, n_out, n_err, start = int(m.group(1)), int(m.group(2)), int(m.group(3)), m.end()
        end = start + n_out + n_err
        if len(self._buf) < end:
            return None
        out = bytes(self._buf[start:start + n_out])
        err = bytes(self._buf[start + n_out:end])
        del self._buf[:end]
        return status, out.decode(errors="replace"), err.decode(errors="replace")

    def run(self, command: str, timeout: float, on_tick=None, tick: float = 3.0) -> tuple[int, str, str]:
        """One agent command line ("read --caching uc"): (exit status, stdout, stderr).
        After any failure the channel is closed: a late reply must never be taken for the
        next command's."""
        if self.chan is None:
            raise RemoteError("guest agent: the channel was closed after an earlier failure")
        if "\n" in command:
            raise ValueError("one command line at a time")
        result: list = []

        def done() -> bool:
            if not result:
                r = self._reply()
                if r is not None:
                    result.append(r)
            return bool(result)
        try:
            self.chan.sendall(command.encode() + b"\n")
            self._reader.what = f"guest agent: {command[:60]}"
            how = self._reader.pump(time.monotonic() + timeout, on_tick=on_tick, tick=tick, stop=done)
            if how == "exit":
                raise RemoteError(f"guest agent exited during '{command[:60]}': "
                                  f"{bytes(self._err[-300:]).decode(errors='replace').strip()}")
        except BaseException:
            self.close(wait=0)
            raise
        return result[0]

    @property
    def idle(self) -> bool:
        """Open, and every command it was sent answered: it answers only after reaping
        the command's child, and the serve process itself maps nothing, so no process of
        this agent holds the buffer (after any failure the channel is closed: not idle)."""
        return self.chan is not None

    def close(self, wait: float = 10) -> None:
        """End of input, then up to ``wait`` seconds for the agent to exit."""
        if self.chan is None:
            return
        chan, self.chan = self.chan, None
        try:
            if wait > 0:
                chan.shutdown_write()
                self._reader.what = "guest agent exit"
                self._reader.pump(time.monotonic() + wait, soft=True)
        except Exception:
            pass   # the guest may be gone already: nothing to wait for then
        finally:
            chan.close()
