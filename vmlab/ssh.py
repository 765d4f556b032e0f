"""SSH to the lab host and to guests, with paramiko and generated ed25519 keys only.

A guest is reached through the lab host: a direct-tcpip channel from the lab's SSH
session to the guest's forwarded port becomes the socket of the guest's session, so no
ssh binary and no port on the controller are needed.
"""
from __future__ import annotations

import logging
import os
import select
import shlex
import socket
import threading
import time
from pathlib import Path

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .errors import RemoteError, UserError, WaitTimeout

log = logging.getLogger("vmlab.ssh")
logging.getLogger("paramiko").setLevel(logging.CRITICAL)


def generate_key(path: Path) -> str:
    """Write a new ed25519 private key (0600) at ``path``; return the public key's base64."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return public_key_b64(path)


def public_key_b64(path: Path) -> str:
    return paramiko.Ed25519Key.from_private_key_file(str(path)).get_base64()


class _AcceptOwnVM(paramiko.MissingHostKeyPolicy):
    """Our VMs make fresh host keys at every boot and are reached only via 127.0.0.1 or
    through the lab's own session; the key is recorded in the log, not pinned."""

    def missing_host_key(self, client, hostname, key):
        log.debug("host key of %s: %s %s", hostname, key.get_name(), key.get_base64()[:24])


class SSHSession:
    """One authenticated SSH session (paramiko client) to a VM."""

    def __init__(self, name: str, client: paramiko.SSHClient):
        self.name = name
        self.client = client

    @classmethod
    def connect(cls, name: str, host: str, port: int, key_path: Path, timeout: float,
                sock_factory=None, alive=None, known_hosts: Path | None = None,
                user: str = "root") -> "SSHSession":
        """Retry until the server accepts our key or ``timeout``; ``alive`` (callable) aborts
        the wait early when the VM died. ``known_hosts``: a machine that is not one of our
        VMs (a test box): its host key must be there, or the connection is refused at
        once (UserError), never retried and never accepted on first use."""
        try:
            pkey = paramiko.PKey.from_path(str(key_path)) if hasattr(paramiko.PKey, "from_path") \
                else paramiko.Ed25519Key.from_private_key_file(str(key_path))
        except (paramiko.PasswordRequiredException, TypeError):
            # TypeError: cryptography's words for a passphrase that was not given
            raise UserError(f"{name}: {key_path} is protected by a passphrase: vmlab logs in "
                            f"unattended; give it a key without one (ssh-keygen -t ed25519 -N '')") from None
        except (paramiko.SSHException, OSError, ValueError) as e:
            raise UserError(f"{name}: {key_path} is not a private key vmlab can use: {e}") from None
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            client = paramiko.SSHClient()
            if known_hosts is not None:
                client.load_host_keys(str(known_hosts))
                client.set_missing_host_key_policy(paramiko.RejectPolicy())
            else:
                client.set_missing_host_key_policy(_AcceptOwnVM())
            try:
                sock = sock_factory() if sock_factory else None
                client.connect(host, port=port, username=user, pkey=pkey, sock=sock,
                               timeout=10, banner_timeout=20, auth_timeout=20,
                               allow_agent=False, look_for_keys=False)
                client.get_transport().set_keepalive(15)
                return cls(name, client)
            except paramiko.SSHException as e:
                client.close()
                if known_hosts is not None and isinstance(e, (paramiko.BadHostKeyException,
                                                              paramiko.AuthenticationException)):
                    # a box that answers with another key, or refuses ours: not a boot
                    # that is still coming up, so no retry
                    raise UserError(f"{name}: {host}:{port}: {e} (known hosts: {known_hosts})") from e
                if known_hosts is not None and "not found in known_hosts" in str(e):
                    raise UserError(f"{name}: {host}:{port} is not in {known_hosts}: vmlab never "
                                    f"accepts a box's host key on first use (add it: "
                                    f"ssh-keyscan -p {port} {host} >> {known_hosts}, after checking it)") from e
                last = f"{type(e).__name__}: {e}"
            except (OSError, EOFError) as e:
                last = f"{type(e).__name__}: {e}"
                client.close()
            # asked after a refused attempt, not before the first: a running VM's first
            # attempt succeeds, and the check is an exec in the lab for a guest
            if alive is not None and not alive():
                raise RemoteError(f"{name}: VM exited while waiting for SSH")
            if time.monotonic() >= deadline:
                raise WaitTimeout(f"SSH to {name} ({host}:{port})", timeout, last)
            time.sleep(1.0)

    @property
    def transport(self) -> paramiko.Transport:
        return self.client.get_transport()

    def run(self, command: str, *, timeout: float = 60, check: bool = True,
            input: bytes | str | None = None) -> tuple[int, str, str]:
        """Run a shell command; returns (rc, stdout, stderr). Bounded by ``timeout``."""
        chan = self._exec(command, timeout)
        try:
            if input is not None:
                chan.sendall(input.encode() if isinstance(input, str) else input)
            chan.shutdown_write()
            rd = ChannelReader(chan, f"{self.name}: {command[:80]}")
            rd.read_until_exit(time.monotonic() + timeout)
        finally:
            chan.close()
        o, e = rd.out.decode(errors="replace"), rd.err.decode(errors="replace")
        if check and rd.rc != 0:
            raise RemoteError(f"{self.name}: '{command[:120]}' exited {rd.rc}: "
                              f"{(e or o).strip().splitlines()[-1:] or ''}")
        return rd.rc, o, e

    def read_bytes(self, path: str, timeout: float = 120) -> bytes:
        """A file's exact bytes (``run`` decodes text; screendumps are binary)."""
        rc, out = exec_bytes(self, f"cat {shlex.quote(path)}", timeout)
        if rc != 0:
            raise RemoteError(f"{self.name}: cannot read {path} (exit {rc})")
        return out

    def _exec(self, command: str, timeout: float) -> paramiko.Channel:
        t = self.transport
        if t is None or not t.is_active():
            raise RemoteError(f"{self.name}: SSH session is gone")
        limit = min(10.0, timeout)
        chan = t.open_session(timeout=limit)
        # paramiko waits for the exec reply without a bound: closing the channel after
        # ``limit`` wakes it (the wait ends with "Channel closed")
        timer = threading.Timer(limit, chan.close)
        timer.daemon = True
        timer.start()
        try:
            chan.exec_command(command)
        except paramiko.SSHException as e:
            chan.close()
            if not timer.is_alive():
                raise WaitTimeout(f"{self.name}: start of '{command[:60]}'", limit) from e
            raise RemoteError(f"{self.name}: cannot run '{command[:60]}': {e}") from e
        finally:
            timer.cancel()
        chan.settimeout(timeout)  # bounds sendall() of input too
        return chan

    def put(self, data: bytes, path: str, mode: int = 0o644) -> None:
        tmp, dst = shlex.quote(path + ".tmp"), shlex.quote(path)
        # a minute, and a second more per MiB (an image over a slow link)
        # a transfer cut short (vmlab killed, the link lost) leaves a short .tmp that cat
        # still calls a success: only the whole file is renamed into place
        self.run(f"cat > {tmp} && [ \"$(wc -c < {tmp})\" -eq {len(data)} ] && chmod {mode:o} {tmp} "
                 f"&& mv {tmp} {dst}", input=data, timeout=60 + len(data) / (1 << 20))

    def open_tcp(self, host: str, port: int, timeout: float = 10) -> paramiko.Channel:
        """A direct-tcpip channel to host:port as seen from the VM."""
        return self.transport.open_channel("direct-tcpip", (host, port), ("127.0.0.1", 0),
                                           timeout=timeout)

    def open_exec(self, command: str) -> paramiko.Channel:
        return self._exec(command, 10)

    def active(self) -> bool:
        t = self.transport
        return t is not None and t.is_active()

    def close(self) -> None:
        self.client.close()


class ChannelReader:
    """The one way vmlab reads a paramiko channel: every pass checks the same monotonic
    deadline whether or not data arrived, so a stream that never stops (``yes``) times
    out exactly like a silent one. stdout accumulates in ``out`` (or is handed to
    ``on_out``), stderr in ``err`` (or ``on_err``); ``rc`` is set once the command exits.
    """

    POLL = 0.05
    BURST = 4 << 20

    def __init__(self, chan: paramiko.Channel, what: str, *, on_out=None, on_err=None):
        self.chan, self.what = chan, what
        self.out, self.err = bytearray(), bytearray()
        self.on_out, self.on_err = on_out, on_err
        self.rc: int | None = None

    def _drain(self) -> bool:
        """Take what is ready now, at most ``BURST`` bytes per stream, so a stream that is
        always ready still comes back to the deadline check."""
        c = self.chan
        got = self._take(c.recv_ready, c.recv, self.on_out or self.out.extend)
        return self._take(c.recv_stderr_ready, c.recv_stderr, self.on_err or self.err.extend) or got

    def _take(self, ready, recv, sink) -> bool:
        n = 0
        while n < self.BURST and ready():
            data = recv(1 << 20)
            if not data:
                break
            n += len(data)
            sink(data)
        return n > 0

    def pump(self, deadline: float, *, stop=None, on_tick=None, tick: float = 3.0,
             soft: bool = False) -> str:
        """Read until ``stop()`` is true ("stop"), the remote command exits and its output
        is drained ("exit"), or ``deadline`` passes: WaitTimeout, or "deadline" when
        ``soft``. ``on_tick`` runs every ``tick`` seconds (a liveness check that may raise).
        A channel whose SSH session died raises RemoteError
        instead of waiting."""
        start = time.monotonic()
        next_tick = start + tick
        while True:
            self._drain()
            if stop is not None and stop():
                return "stop"
            if self.chan.exit_status_ready() and not self._drain():
                self.rc = self.chan.recv_exit_status()
                return "exit"
            if self.chan.closed and not self.chan.exit_status_ready():
                raise RemoteError(f"{self.what}: the SSH channel closed without an exit status")
            now = time.monotonic()
            if now >= deadline:
                if soft:
                    return "deadline"
                raise WaitTimeout(self.what, deadline - start,
                                  bytes((self.err or self.out)[-300:]).decode(errors="replace"))
            if on_tick is not None and now >= next_tick:
                on_tick()
                next_tick = time.monotonic() + tick
            select.select([self.chan], [], [], min(self.POLL, max(0.0, deadline - now)))

    def read_until_exit(self, deadline: float, **kw) -> int:
        self.pump(deadline, **kw)
        return self.rc


def exec_bytes(session, command: str, timeout: float) -> tuple[int, bytes]:
    """(exit status, stdout's exact bytes) of ``command`` on any session with open_exec
    (SSH, or this machine's), bounded by ``timeout``."""
    chan = session.open_exec(command)
    try:
        chan.shutdown_write()
        rd = ChannelReader(chan, f"{getattr(session, 'name', '?')}: {command[:60]}")
        rd.read_until_exit(time.monotonic() + timeout)
    finally:
        chan.close()
    return rd.rc, bytes(rd.out)


class ChannelForward:
    """A local unix socket (mode 0600) whose connections are piped to channels opened by
    ``factory`` — how the controller's QMP client reaches a QMP socket inside the lab."""

    def __init__(self, path: Path, factory, name: str):
        self.path, self.factory, self.name = Path(path), factory, name
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        old = os.umask(0o177)
        try:
            self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.srv.bind(str(self.path))
        finally:
            os.umask(old)
        self.srv.listen(4)
        self.srv.settimeout(0.5)
        t = threading.Thread(target=self._accept, name=f"fwd-{name}", daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.srv.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                chan = self.factory()
            except Exception as e:  # the client sees EOF; the reason goes to the log
                log.error("%s: cannot open channel: %s", self.name, e)
                conn.close()
                continue
            t = threading.Thread(target=self._pipe, args=(conn, chan), daemon=True)
            t.start()
            self._threads.append(t)

    def _pipe(self, conn: socket.socket, chan: paramiko.Channel) -> None:
        try:
            while not self._stop.is_set():
                r, _, _ = select.select([conn, chan], [], [], 0.5)
                if conn in r:
                    data = conn.recv(65536)
                    if not data:
                        break
                    chan.sendall(data)
                if chan in r:
                    data = chan.recv(65536)
                    if not data:
                        break
                    conn.sendall(data)
        except OSError:
            pass
        finally:
            chan.close()
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self.srv.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
