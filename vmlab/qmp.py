"""QMP with a bound on every wait.

qemu.qmp's synchronous ``connect()`` has no timeout, so a QEMU that never answers (or a
relay whose far end is gone) would hang vmlab forever. ``QMP`` adds the two bounded ways
in: ``serve()`` + ``accept_while()`` (vmlab listens before QEMU starts and QEMU connects,
as QEMU's own python/qemu/machine does: no poll-for-the-socket race), and
``connect_within()`` for a QEMU that is already listening. Both use the wrapper's event
loop and client, pinned by the qemu.qmp version range in pyproject.toml.
"""
from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Callable

from qemu.qmp.legacy import QEMUMonitorProtocol

from .errors import InfraError, WaitTimeout

# qemu.qmp logs every failed negotiation at ERROR; vmlab reports those itself, once.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


class QMPGone(InfraError):
    """The QEMU at the other end exited before the monitor came up."""


class QMP(QEMUMonitorProtocol):
    @classmethod
    def serve(cls, path: str | Path, nickname: str | None = None) -> "QMP":
        """Listen on a new unix socket, mode 0600 from the start (umask while binding)."""
        path = str(path)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        old = os.umask(0o177)
        try:
            q = cls(path, server=True, nickname=nickname)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        return q

    def accept_while(self, alive: Callable[[], bool], timeout: float, what: str) -> None:
        """Wait for QEMU to connect; fail at once when ``alive()`` turns false."""
        async def go():
            task = asyncio.ensure_future(self._qmp.accept())
            loop = asyncio.get_running_loop()
            end = loop.time() + timeout
            try:
                while True:
                    done, _ = await asyncio.wait({task}, timeout=0.1)
                    if task in done:
                        try:
                            return task.result()
                        except Exception as e:
                            # QEMU opens its monitor chardev before it checks the rest of
                            # its command line: an early exit shows up as EOF here first
                            for _ in range(50):
                                if not alive():
                                    raise QMPGone(f"{what}: QEMU exited before QMP came up") from e
                                await asyncio.sleep(0.1)
                            raise InfraError(f"{what}: QMP negotiation failed: {e}") from e
                    if not alive():
                        raise QMPGone(f"{what}: QEMU exited before connecting to QMP")
                    if loop.time() >= end:
                        raise WaitTimeout(f"{what}: QMP connection", timeout)
            finally:
                if not task.done():
                    task.cancel()
                    try:
                        await task
                    except BaseException:
                        pass
        self._qmp.await_greeting = True
        self._qmp.negotiate = True
        self._aloop.run_until_complete(go())

    def connect_within(self, timeout: float, what: str) -> None:
        """Connect and negotiate, bounded (the socket may be a relay that never answers)."""
        self._qmp.await_greeting = True
        self._qmp.negotiate = True
        try:
            self._sync(self._qmp.connect(self._address), timeout)
        except asyncio.TimeoutError:
            raise WaitTimeout(f"{what}: QMP greeting", timeout)

    def close(self) -> None:
        """Disconnect, bounded: a peer that never answers must not hold vmlab."""
        try:
            self._sync(self._qmp.disconnect(), 5)
        except Exception:  # timed out or already broken: the socket goes with the process
            pass

    def quit_within(self, timeout: float) -> None:
        """``quit`` that never waits longer than ``timeout`` for an answer."""
        old = self._timeout
        self.settimeout(timeout)
        try:
            self.cmd("quit")
        finally:
            self.settimeout(old)


def connect(path: str, nickname: str, timeout: float) -> QMP:
    """A client of the QMP socket at ``path``, connected within ``timeout`` (closed again
    when it cannot be)."""
    q = QMP(path, nickname=nickname)
    try:
        q.connect_within(timeout, f"QMP of {nickname}")
    except BaseException:
        q.close()
        raise
    return q
