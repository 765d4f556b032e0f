"""The controller's client of the host agent: create, export, move and inspect buffers on
the lab host (vmlab exporter, udmabuf, dma-heap), as JSON lines over one SSH channel."""
from __future__ import annotations

import json
import logging
import select
import threading
import time
from enum import Enum
from pathlib import Path

from .errors import RemoteError, WaitTimeout

log = logging.getLogger("vmlab.exporter")


class MoveMode(str, Enum):
    MIGRATE = "MIGRATE"
    MIGRATE_NO_ZAP = "MIGRATE_NO_ZAP"
    ZAP_ONLY = "ZAP_ONLY"


class AgentRequestFailed(RemoteError):
    def __init__(self, op: str, resp: dict):
        self.op, self.resp = op, resp
        self.errname = resp.get("errname") or ""
        super().__init__(f"host agent: {op}: {resp.get('error')}")


class HostAgent:
    """One ``hostagent.py serve`` process on the lab host; its stderr goes to ``log_path``."""

    def __init__(self, lab, log_path: Path):
        self.lab = lab
        self.log_path = Path(log_path)
        self.chan = lab.session.open_exec("exec python3 -u /mnt/vmlab/hostagent.py serve")
        self._buf = b""
        self._lock = threading.Lock()
        self._logf = open(self.log_path, "ab")
        self.request("ping", timeout=60)

    def _drain_stderr(self) -> None:
        while self.chan.recv_stderr_ready():
            self._logf.write(self.chan.recv_stderr(65536))
        self._logf.flush()

    def request(self, op: str, timeout: float = 120, **kw) -> dict:
        with self._lock:
            self.chan.sendall((json.dumps({"op": op, **kw}) + "\n").encode())
            deadline = time.monotonic() + timeout
            while b"\n" not in self._buf:
                self._drain_stderr()
                if self.chan.recv_ready():
                    data = self.chan.recv(1 << 20)
                    if not data:
                        raise RemoteError(f"host agent exited during {op} (log: {self.log_path})")
                    self._buf += data
                    continue
                if self.chan.exit_status_ready():
                    self._drain_stderr()
                    raise RemoteError(f"host agent exited during {op} (log: {self.log_path})")
                if time.monotonic() > deadline:
                    raise WaitTimeout(f"host agent op {op}", timeout)
                select.select([self.chan], [], [], 0.2)
            line, self._buf = self._buf.split(b"\n", 1)
            self._drain_stderr()
        resp = json.loads(line)
        if not resp.pop("ok", False):
            raise AgentRequestFailed(op, resp)
        return resp

    def close(self) -> None:
        try:
            self.chan.shutdown_write()
            deadline = time.monotonic() + 10
            while not self.chan.exit_status_ready() and time.monotonic() < deadline:
                self._drain_stderr()
                time.sleep(0.1)
            self._drain_stderr()
        except Exception as e:
            log.warning("closing host agent: %s", e)
        finally:
            self.chan.close()
            self._logf.close()
