"""The session of ``lab: {kind: local}``: this machine is the lab host, and the box's
steps (lock, checks, dkms, host agent, guests) run here as local processes instead of
over SSH. It speaks the part of ssh.SSHSession and paramiko's Channel that the box code
uses, so BoxLab has one code path for both kinds.

A channel's process gets its own session (a Ctrl-C on vmlab's terminal reaches vmlab,
which tears down in order, not the lock's shell); when vmlab ends, however it ends, the
process's stdin closes: that EOF is what ends a host agent and what starts the box's undo.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
import weakref

from . import proc
from .errors import RemoteError, WaitTimeout


#: seconds after a process's exit for its pipes to reach EOF before its exit counts anyway
EXIT_GRACE = 0.5


class LocalChannel:
    """A local ``sh -c`` with the channel methods ssh.ChannelReader and the box use:
    stdout and stderr gathered by two threads, stdin the channel's write end, and a
    ``fileno()`` that select() sees readable while there is something to take (as a
    paramiko channel's)."""

    def __init__(self, command: str):
        # detached: its own session and no signal blocked (vmlab may be deferring its own)
        self.p = proc.popen(["sh", "-c", command], detach=True, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.closed = False
        self._cond = threading.Condition()
        self._bufs = {"out": bytearray(), "err": bytearray()}
        self._eof = {"out": False, "err": False}
        self._exited = False
        self._timeout: float | None = None
        self._bell_r, self._bell_w = os.pipe()
        os.set_blocking(self._bell_r, False)
        os.set_blocking(self._bell_w, False)
        # the read end lives as long as the channel: a select() after close() must not
        # watch an fd that something else got
        weakref.finalize(self, os.close, self._bell_r)
        for key, f in (("out", self.p.stdout), ("err", self.p.stderr)):
            threading.Thread(target=self._gather, args=(key, f), daemon=True,
                             name=f"local-{key}").start()
        threading.Thread(target=self._reap, daemon=True, name="local-wait").start()

    def _reap(self) -> None:
        self.p.wait()
        with self._cond:
            # what it wrote before it exited, gathered; then its exit counts, as sshd's
            # exit-status does, even while a child it left in the background holds its
            # stdout open
            end = time.monotonic() + EXIT_GRACE
            while not all(self._eof.values()) and time.monotonic() < end:
                self._cond.wait(end - time.monotonic())
            self._exited = True
            self._ring()
            self._cond.notify_all()

    def _settled(self) -> bool:
        """(under the lock) nothing more will come that anyone waits for: the process is
        gone and its output gathered (both pipes at EOF, or EXIT_GRACE after its exit)."""
        return self._exited

    def _gather(self, key: str, f) -> None:
        fd = f.fileno()
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            with self._cond:
                if not data:
                    self._eof[key] = True
                else:
                    self._bufs[key].extend(data)
                if data or self._settled():
                    self._ring()
                self._cond.notify_all()
            if not data:
                return

    def _take(self, key: str, n: int) -> bytes:
        with self._cond:
            end = None if self._timeout is None else time.monotonic() + self._timeout
            while not self._bufs[key] and not self._eof[key]:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    raise socket.timeout(f"no data from {self.p.args[-1][:60]!r}")
                self._cond.wait(left)
            data = bytes(self._bufs[key][:n])
            del self._bufs[key][:n]
            # readable only while there is something to take or to notice (no spinning
            # select() between a process's EOF and its exit)
            if not any(self._bufs.values()) and not self._settled():
                try:
                    while os.read(self._bell_r, 4096):
                        pass
                except BlockingIOError:
                    pass
            return data

    def _ring(self) -> None:
        """(under the lock) make fileno() readable; a full pipe already is."""
        if self._bell_w is not None:
            try:
                os.write(self._bell_w, b"!")
            except BlockingIOError:
                pass

    def fileno(self) -> int:
        return self._bell_r

    def recv_ready(self) -> bool:
        with self._cond:
            return bool(self._bufs["out"])

    def recv_stderr_ready(self) -> bool:
        with self._cond:
            return bool(self._bufs["err"])

    def recv(self, n: int) -> bytes:
        return self._take("out", n)

    def recv_stderr(self, n: int) -> bytes:
        return self._take("err", n)

    def exit_status_ready(self) -> bool:
        with self._cond:
            return self._settled()

    def recv_exit_status(self) -> int:
        return self.p.wait()

    def settimeout(self, t: float | None) -> None:
        self._timeout = t

    def sendall(self, data: bytes) -> None:
        try:
            self.p.stdin.write(data)
            self.p.stdin.flush()
        except (BrokenPipeError, ValueError) as e:
            raise OSError(f"local channel: the process's stdin is closed ({e})") from None

    def shutdown_write(self) -> None:
        try:
            self.p.stdin.close()
        except OSError:
            pass

    def close(self) -> None:
        """EOF to the process and no more reading, as an SSH channel's close: a process
        that ends on EOF ends, and a lock's shell runs its undo."""
        if self.closed:
            return
        self.closed = True
        self.shutdown_write()
        with self._cond:
            # the gathering threads may still run: they must never write to a reused fd
            bell_w, self._bell_w = self._bell_w, None
        os.close(bell_w)

    def kill(self) -> None:
        """For a command that outlived its timeout: its whole process group."""
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except OSError:
            pass
        self.close()
        try:
            self.p.wait(timeout=10)     # a process in D state is left to the kernel
        except subprocess.TimeoutExpired:
            pass


class LocalSession:
    """ssh.SSHSession's interface on this machine."""

    name = "this machine"

    def active(self) -> bool:
        return True

    def open_exec(self, command: str) -> LocalChannel:
        return LocalChannel(command)

    def run(self, command: str, *, timeout: float = 60, check: bool = True,
            input: bytes | str | None = None) -> tuple[int, str, str]:
        """Run a shell command; (rc, stdout, stderr). Bounded by ``timeout``: the command
        and everything it started are killed at the deadline (WaitTimeout)."""
        chan = LocalChannel(command)
        try:
            if input is not None:
                chan.sendall(input.encode() if isinstance(input, str) else input)
            chan.shutdown_write()
            rc = chan.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            chan.kill()
            raise WaitTimeout(f"{self.name}: {command[:80]}", timeout, "still running") from None
        deadline = time.monotonic() + EXIT_GRACE + 5   # its output, after it exited
        while not chan.exit_status_ready() and time.monotonic() < deadline:
            time.sleep(0.01)
        o = chan.recv(1 << 30).decode(errors="replace") if chan.recv_ready() else ""
        e = chan.recv_stderr(1 << 30).decode(errors="replace") if chan.recv_stderr_ready() else ""
        chan.close()
        if check and rc != 0:
            raise RemoteError(f"{self.name}: '{command[:120]}' exited {rc}: "
                              f"{(e or o).strip().splitlines()[-1:] or ''}")
        return rc, o, e

    def put(self, data: bytes, path: str, mode: int = 0o644) -> None:
        tmp = f"{path}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)

    def open_tcp(self, host: str, port: int, timeout: float = 10) -> socket.socket:
        return socket.create_connection((host, port), timeout=timeout)

    def close(self) -> None:
        pass
