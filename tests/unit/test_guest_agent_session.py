"""The framing of `vmlab-guest-agent serve` replies, against a fake channel (the real
agent runs in every lab test's guest)."""
import pytest

from vmlab.errors import RemoteError
from vmlab.guest_agent import GuestAgent


class FakeChan:
    """A channel that answers each command line with scripted bytes, split in pieces."""

    def __init__(self, replies, pieces=3):
        self.replies, self.pieces, self.pending, self.sent, self.closed = list(replies), pieces, b"", [], False

    def sendall(self, data):
        self.sent.append(data)
        r = self.replies.pop(0)
        self.pending += r

    def recv_ready(self):
        return bool(self.pending)

    def recv(self, n):
        k = max(1, len(self.pending) // self.pieces)
        out, self.pending = self.pending[:k], self.pending[k:]
        return out

    def recv_stderr_ready(self):
        return False

    def recv_stderr(self, n):
        return b""

    def exit_status_ready(self):
        return False

    def shutdown_write(self):
        pass

    def close(self):
        self.closed = True

    def fileno(self):
        if not hasattr(self, "_r"):
            import os
            self._r, w = os.pipe()   # always readable: select() returns at once
            os.write(w, b"x")
        return self._r


class FakeSession:
    def __init__(self, chan):
        self.chan = chan

    def open_exec(self, command):
        assert command == "exec vmlab-guest-agent serve"
        return self.chan


def test_replies_are_framed_and_split_anywhere():
    out = b'{"records": [1, 2]}\n'
    chan = FakeChan([b"VMLAB-REPLY 0 %d 5\n%swarn\n" % (len(out), out),
                     b"VMLAB-REPLY 3 2 0\n{}"], pieces=7)
    ga = GuestAgent(FakeSession(chan))
    assert ga.run("read --caching uc", timeout=5) == (0, out.decode(), "warn\n")
    assert ga.run("read --caching wb", timeout=5) == (3, "{}", "")
    assert chan.sent == [b"read --caching uc\n", b"read --caching wb\n"]


def test_a_garbled_reply_closes_the_channel_for_good():
    chan = FakeChan([b"hello there\n"])
    ga = GuestAgent(FakeSession(chan))
    with pytest.raises(RemoteError, match="garbled"):
        ga.run("version", timeout=5)
    assert chan.closed
    with pytest.raises(RemoteError, match="closed after an earlier failure"):
        ga.run("version", timeout=5)


def test_one_line_per_command():
    ga = GuestAgent(FakeSession(FakeChan([])))
    with pytest.raises(ValueError):
        ga.run("read\nwrite", timeout=5)
