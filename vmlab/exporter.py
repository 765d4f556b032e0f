"""The controller's client of the host agent: create, export, move and inspect buffers on
the lab host (vmlab exporter, udmabuf, dma-heap), as JSON lines over one SSH channel."""
from __future__ import annotations

import base64
import functools
import hashlib
import json
import logging
import os
import shlex
import threading
import time
from enum import Enum
from pathlib import Path

from .errors import RemoteError, WaitTimeout
from .paths import cache_dir, repo_root
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


# vmlab-attach's source: shipped with the agent (its digest names the agent's copy) and
# built here (attach_binary)
ATTACH_SOURCE = repo_root() / "host-tools/vmlab-attach/vmlab_attach.c"
# The host agent and the stdlib-only modules it imports, shipped through the share.
HOSTAGENT_FILES = [repo_root() / "vmlab" / n for n in ("hostagent.py", "stamp.py", "exporter_uapi.py",
                                                       "vhost_user.py")] + [ATTACH_SOURCE]


@functools.lru_cache(maxsize=None)
def agent_digest() -> str:
    """sha256 of the host agent's files as this vmlab would copy them into a lab."""
    h = hashlib.sha256()
    for f in HOSTAGENT_FILES:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


EX_NO_AGENT = 75                  # vmlab-attach: no agent started, the caller starts one
ATTACH_BIN = "vmlab-attach"
AGENT_COPY_PREFIX = "/run/vmlab-agent-"   # a nested lab's copies of the agent, one per digest


def attach_binary() -> Path:
    """vmlab-attach, built static on this machine (the guest agent's gcc) once per source
    and kept in the cache; a nested lab gets it through its share. Built here, not in
    the lab: gcc under TCG cost seconds of every snapshot's first boot."""
    src = ATTACH_SOURCE
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    out = cache_dir() / "tools" / f"{ATTACH_BIN}-{digest}"
    if not out.exists():
        from .proc import run_cmd
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}")
        try:
            run_cmd(["gcc", "-static", "-O2", "-Wall", "-Wextra", "-o", str(tmp), str(src)], timeout=120)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    return out


def _agent_dir(lab) -> tuple[str, str]:
    """(shell that sets $d to the lab's copy of the agent, "$d"), or ("", the share)."""
    src = lab.share_dir
    if not getattr(lab, "agent_cache", False):
        return "", src
    # named by the digest of what this vmlab puts in a share: a lab whose share holds
    # another's is never reused (reuse.wanted_shape), and hashing it there cost 0.2 s a start
    return (f"d={AGENT_COPY_PREFIX}{agent_digest()} && "
            f"{{ [ -d $d ] || {{ t=$(mktemp -d $d.XXXXXX) && cp {src}/*.py {src}/*.c $t/ && "
            f"{{ [ ! -e {src}/{ATTACH_BIN} ] || cp {src}/{ATTACH_BIN} $t/; }} && "
            f"{{ mv -T $t $d 2>/dev/null || rm -rf $t; }}; }}; }} && "), "$d"


def agent_command(lab) -> str:
    """The shell command that starts the host agent in ``lab``.

    It is imported, not run as a script: Python compiles a script on every start (0.7 s
    under TCG) but keeps a module's bytecode; -S: it is stdlib only, and site costs 0.35 s.
    A nested lab (``agent_cache``) runs it from a copy in its /run, named by the agent's
    digest, where that bytecode can be written (the share is read-only) and a snapshot
    keeps it; there the agent is forked by the copy's fork server (``warm_command``)
    when one answers, and started as here when none does. A box runs it from the run's
    directory, its /run is the user's. The path stays on the command line: cleanups find
    a started agent by it, a forked one by its name (matrix.clean_lab_script)."""
    prep, src = _agent_dir(lab)
    start = f"exec python3 -S -u -c {shlex.quote(_START)} {src}/hostagent.py serve"
    if not prep:
        return start
    return (f"{prep}if [ -x $d/{ATTACH_BIN} ]; then $d/{ATTACH_BIN} agent $d/zygote.sock; "
            f"rc=$?; [ $rc = {EX_NO_AGENT} ] || exit $rc; fi; {start}")


def warm_command(lab) -> str:
    """What a nested lab does once before its snapshot is saved, so that every restore has
    it: the agent's copy (vmlab-attach with it) and bytecode, and the fork server started
    (detached: it outlives this exec) and listening; again, with the fork server already
    answering, nothing. Its log is $d/zygote.log."""
    prep, src = _agent_dir(lab)
    assert prep, "only a nested lab keeps a fork server"
    # $1 the copy, $2 the start line; the pid file is the server's (sh execs python)
    server = ('echo $$ > "$1/zygote.pid"; '
              'exec python3 -S -u -c "$2" "$1/hostagent.py" zygote "$1/zygote.sock"')
    return (f"{prep}python3 -S -c 'import sys; sys.path.insert(0, sys.argv[1]); import hostagent' {src} && "
            f"if ! {{ [ -f $d/zygote.pid ] && kill -0 $(cat $d/zygote.pid) 2>/dev/null; }}; then "
            f"rm -f $d/zygote.sock; setsid -f sh -c {shlex.quote(server)} sh $d {shlex.quote(_START)} "
            f"</dev/null >/dev/null 2>>$d/zygote.log; "
            f"for i in $(seq 150); do [ -S $d/zygote.sock ] && break; sleep 0.2; done; fi; "
            f"[ -S $d/zygote.sock ]")


class HostAgent:
    """One ``hostagent.py serve`` process on the lab host; its stderr goes to ``log_path``."""

    def __init__(self, lab, log_path: Path):
        self.lab = lab
        self.log_path = Path(log_path)
        self._logf = open(self.log_path, "ab")
        # exported: a forked agent gets it through vmlab-attach, not from the exec
        env = f"export VMLAB_HUGEPAGES_LEDGER={shlex.quote(lab.hugepages_ledger)}; " if lab.hugepages_ledger else ""
        self.chan = lab.session.open_exec(env + agent_command(lab))
        self._buf = bytearray()
        self._late: str | None = None   # a request whose answer was not read: out of step
        self.batch_elapsed: list[float] = []   # the last batch's times per request (batch)
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
            # outstanding until its answer is read: a timeout or an interrupt (Ctrl-C in
            # the move loop) leaves the channel out of step for good, and the teardown's
            # requests would read this one's answer as theirs
            self._late = op
            self.chan.sendall((json.dumps({"op": op, **kw}) + "\n").encode())
            self._reader.what = f"host agent op {op}"
            how = self._reader.pump(time.monotonic() + timeout, stop=lambda: b"\n" in self._buf)
            if how == "exit":
                raise RemoteError(f"host agent exited during {op} (log: {self.log_path})")
            i = self._buf.index(b"\n")
            line = bytes(self._buf[:i])
            del self._buf[:i + 1]
            self._late = None
        resp = json.loads(line)
        if not resp.pop("ok", False):
            raise AgentRequestFailed(op, resp)
        return resp

    def batch(self, requests: list[dict], timeout: float = 120) -> list:
        """``requests`` ({"op": ..., **args}, and ``may_fail``: the batch goes on past
        its failure) answered in one round trip, in order. Each answer is a dict, an
        AgentRequestFailed, or None where an earlier failure ended the batch."""
        self.batch_elapsed = []
        if not requests:
            return []
        resp = self.request("batch", timeout=timeout, requests=requests)
        got = resp["answers"]
        # what each request took in the agent (a caller times one of them by the others)
        self.batch_elapsed = [float(x) for x in resp.get("elapsed_s", [])]
        if len(got) > len(requests):
            raise RemoteError(f"host agent: batch: {len(got)} answers for {len(requests)} requests")
        out: list = []
        for req, ans in zip(requests, got + [None] * (len(requests) - len(got))):
            if ans is not None:
                ans = dict(ans)
                if not ans.pop("ok", False):
                    ans = AgentRequestFailed(req["op"], ans)
            out.append(ans)
        return out

    @staticmethod
    def answered(ans, what: str) -> dict:
        """A batch answer that must be there: the answer, else its failure raised (or,
        where an earlier failure ended the batch, that ``what`` was not done)."""
        if isinstance(ans, dict):
            return ans
        raise ans or RemoteError(f"host agent: {what} was not done: the batch ended before it")

    @property
    def answering(self) -> bool:
        """False once a request's answer went unread (a timeout, an interrupt): the
        channel is out of step for good."""
        return self._late is None

    def kernel_mark(self) -> dict:
        """The lab's taint mask, and a mark at its kernel log's end that this agent holds
        (health.kernel_state): the state at a run's start."""
        st = self.request("kernel_state", mark=True, timeout=60)
        return {"taint": int(st["taint"]), "mark": True}

    def kernel_since_mark(self) -> dict:
        """The taint mask, and the kernel log's lines since the mark (as "dmesg") with how
        often the ring overwrote lines before they were read ("overruns"), and whether the
        agent cut the read short ("truncated")."""
        return self.kernel_lines(self.request("kernel_state", since_mark=True, timeout=60))

    @staticmethod
    def kernel_lines(st: dict) -> dict:
        """op_kernel_state's lines since the mark (its own answer, or op_shutdown's
        "since_mark") as a kernel state for health.compare_states."""
        return {"taint": int(st["taint"]), "dmesg": st["text"], "since_mark": True,
                "overruns": int(st["overruns"]), "truncated": bool(st["truncated"])}

    def read_files(self, paths: list[str], max_bytes: int = 16 << 20) -> list[tuple[int, bytes] | None]:
        """(size, its first ``max_bytes`` bytes) of each lab file, None where unreadable."""
        files = self.request("read_files", paths=list(paths), max_bytes=max_bytes, timeout=60)["files"]
        if len(files) != len(paths):
            raise RemoteError(f"host agent: read_files: {len(files)} answers for {len(paths)} paths")
        return [None if f is None else (int(f["size"]), base64.b64decode(f["data"])) for f in files]

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
