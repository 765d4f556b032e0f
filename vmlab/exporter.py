"""The controller's client of the host agent: create, export, move and inspect buffers on
the lab host (vmlab exporter, udmabuf, dma-heap), as JSON lines over one SSH channel."""
from __future__ import annotations

import json
import logging
import shlex
import threading
import time
from enum import Enum
from pathlib import Path

from .errors import RemoteError, WaitTimeout
from .ssh import ChannelReader

log = logging.getLogger("vmlab.exporter")


class MoveMode(str, Enum):
    MIGRATE = "MIGRATE"
    MIGRATE_NO_ZAP = "MIGRATE_NO_ZAP"
    MIGRATE_SILENT = "MIGRATE_SILENT"
    ZAP_ONLY = "ZAP_ONLY"


class AgentRequestFailed(RemoteError):
    def __init__(self, op: str, resp: dict):
        self.op, self.resp = op, resp
        self.errname = resp.get("errname") or ""
        super().__init__(f"host agent: {op}: {resp.get('error')}")


_START = ("import sys; sys.path.insert(0, sys.argv[1].rsplit('/', 1)[0]); import hostagent; "
          "sys.exit(hostagent.main(sys.argv[1:]))")


def agent_command(lab, *, warm: bool = False) -> str:
    """The shell command that starts the host agent in ``lab`` (``warm``: only compiles it).

    It is imported, not run as a script: Python compiles a script on every start (0.7 s
    under TCG) but keeps a module's bytecode; -S: it is stdlib only, and site costs 0.35 s.
    A nested lab (``agent_cache``) runs it from a copy in its /run, named by the share's
    content, where that bytecode can be written (the share is read-only) and a snapshot
    keeps it; a box runs it from the run's directory, its /run is the user's. The path
    stays on the command line: cleanups find the agent by it."""
    src = lab.share_dir
    prep = ""
    if getattr(lab, "agent_cache", False):
        # named by what the share holds now (a kept lab's share is its first run's)
        prep = (f"d=/run/vmlab-agent-$(cat {src}/*.py | sha256sum | cut -c1-16) && "
                f"{{ [ -d $d ] || {{ t=$(mktemp -d $d.XXXXXX) && cp {src}/*.py $t/ && "
                f"{{ mv -T $t $d 2>/dev/null || rm -rf $t; }}; }}; }} && ")
        src = "$d"
    if warm:
        return f"{prep}python3 -S -c 'import sys; sys.path.insert(0, sys.argv[1]); import hostagent' {src}"
    return f"{prep}exec python3 -S -u -c {shlex.quote(_START)} {src}/hostagent.py serve"


class HostAgent:
    """One ``hostagent.py serve`` process on the lab host; its stderr goes to ``log_path``."""

    def __init__(self, lab, log_path: Path):
        self.lab = lab
        self.log_path = Path(log_path)
        self._logf = open(self.log_path, "ab")
        env = f"VMLAB_HUGEPAGES_LEDGER={shlex.quote(lab.hugepages_ledger)} " if lab.hugepages_ledger else ""
        self.chan = lab.session.open_exec(env + agent_command(lab))
        self._buf = bytearray()
        self._late: str | None = None   # a request that timed out: the channel is out of step
        self._lock = threading.Lock()
        self._reader = ChannelReader(self.chan, "host agent", on_out=self._buf.extend,
                                     on_err=self._log)
        self.request("ping", timeout=60)

    def _log(self, data: bytes) -> None:
        self._logf.write(data)
        self._logf.flush()

    def request(self, op: str, timeout: float = 120, **kw) -> dict:
        with self._lock:
            if self._late is not None:
                # an unanswered request's reply would be taken for this one's
                raise RemoteError(f"host agent: {op}: not sent, the answer to {self._late} is "
                                  f"still outstanding (log: {self.log_path})")
            self.chan.sendall((json.dumps({"op": op, **kw}) + "\n").encode())
            self._reader.what = f"host agent op {op}"
            try:
                how = self._reader.pump(time.monotonic() + timeout, stop=lambda: b"\n" in self._buf)
            except WaitTimeout:
                self._late = op
                raise
            if how == "exit":
                raise RemoteError(f"host agent exited during {op} (log: {self.log_path})")
            i = self._buf.index(b"\n")
            line = bytes(self._buf[:i])
            del self._buf[:i + 1]
        resp = json.loads(line)
        if not resp.pop("ok", False):
            raise AgentRequestFailed(op, resp)
        return resp

    def kernel_state(self) -> dict:
        """The lab's taint mask and dmesg (health.kernel_state)."""
        st = self.request("kernel_state", timeout=60)
        return {"taint": int(st["taint"]), "dmesg": st["dmesg"]}

    def close(self) -> None:
        try:
            self.chan.shutdown_write()
            self._reader.what = "host agent exit"
            self._reader.pump(time.monotonic() + 10, soft=True)
        except Exception as e:
            log.warning("closing host agent: %s", e)
        finally:
            self.chan.close()
            self._logf.close()
