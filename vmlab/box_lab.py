"""A test box as the lab host (``lab: {kind: ssh, host: USER@HOST[:PORT], key: PATH}``).

Developers with hardware keep a machine with real KVM booted into the kernel under test.
vmlab reaches it over SSH (its host key must already be in known_hosts: never accepted
on first use), takes the box's lock for the whole run, checks that it can serve (root,
/dev/kvm, headers for the running kernel, QEMU, dkms, python3), builds the exporter with
dkms against the running kernel and loads it, runs the host agent and the guests there,
and undoes exactly what it did when done: unloads the module it loaded, removes the dkms
entry and source it added (never AUTOINSTALL: a kernel upgrade on the box builds nothing
of ours), deletes its directories. It never reboots or reconfigures the box beyond that.

The same interface as NestedLab where the run uses one (session, run, kernel_release,
share_dir, key, rundir, accel, down); what a box has not (a console, a QEMU of ours that
runs it, images) is None.
"""
from __future__ import annotations

import hashlib
import logging
import re
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from . import ssh
from .errors import ConfigError, RemoteError, UserError
from .paths import repo_root, runtime_dir

log = logging.getLogger("vmlab.box")

LOCK = "/run/lock/vmlab-box.lock"
DKMS_NAME = "vmlab-exporter"
EXPORTER_SRC = "host-tools/vmlab-exporter"
#: vmlab's directory on the box for guest state (the guest runner's /run/vmlab/<name>)
RUN_DIR = "/run/vmlab"


@dataclass(frozen=True)
class BoxSpec:
    host: str
    port: int
    user: str
    key: Path
    known_hosts: Path

    @classmethod
    def parse(cls, raw: dict, where: str) -> "BoxSpec":
        """From the config's ``lab`` mapping (kind ssh): host USER@HOST[:PORT], key PATH,
        known_hosts PATH (default ~/.ssh/known_hosts); paths relative to the config."""
        base = Path(where).parent if where != "<command line>" else Path.cwd()
        m = re.fullmatch(r"(?:([^@\s]+)@)?([^:@\s]+|\[[0-9a-fA-F:]+\])(?::(\d+))?", str(raw.get("host", "")))
        if not m:
            raise ConfigError(where, "lab.host", f"{raw.get('host')!r}: USER@HOST[:PORT]")
        user, host, port = m.group(1) or "root", m.group(2).strip("[]"), int(m.group(3) or 22)
        if not 0 < port < 65536:
            raise ConfigError(where, "lab.host", f"port {port} is not a TCP port")
        paths = {}
        for k, default in (("key", None), ("known_hosts", Path.home() / ".ssh/known_hosts")):
            v = raw.get(k)
            p = (base / v) if v and not Path(v).is_absolute() else Path(v) if v else default
            if p is None:
                raise ConfigError(where, f"lab.{k}", "the private key vmlab logs in with is required")
            if not p.is_file():
                raise ConfigError(where, f"lab.{k}", f"{p}: no such file")
            paths[k] = p.resolve()
        return cls(host, port, user, paths["key"], paths["known_hosts"])


def exporter_version() -> str:
    """The dkms version of this vmlab's exporter source: its content, so a box never builds
    an older entry's source under a newer name."""
    h = hashlib.sha256()
    src = repo_root() / EXPORTER_SRC
    for p in sorted(src.rglob("*")):
        if p.is_file() and not p.name.endswith((".o", ".ko", ".mod", ".mod.c", ".cmd", ".symvers", ".order")):
            h.update(str(p.relative_to(src)).encode() + b"\0" + p.read_bytes())
    return f"vmlab-{h.hexdigest()[:12]}"


class BoxLab:
    kind = "ssh"
    machine = None            # no QEMU of ours runs the box
    image = None
    guest_image = None
    boot_seconds = None
    hwtrace_socket = None
    reused_from = None
    accel = "kvm"

    def __init__(self, workdir: Path, spec: BoxSpec):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.spec = spec
        self.rundir = runtime_dir()          # this machine's end: guest key, QMP relays
        self.key = self.rundir / "id_ed25519"   # the guests' key, per run (not the box's)
        self.session: ssh.SSHSession | None = None
        self.share_dir: str | None = None   # the run's directory on the box
        self.accel_reason = f"the test box {spec.host}'s own KVM"
        self._lock_chan = None
        self._undo: list[tuple[str, str]] = []   # (what, shell command), undone last-first
        self.version = exporter_version()

    @property
    def name(self) -> str:
        return f"box {self.spec.user}@{self.spec.host}:{self.spec.port}"

    # --- bring-up
    def up(self, lab_image, guest_image, progress=print) -> None:
        self.guest_image = guest_image
        ssh.generate_key(self.key)
        progress(f"connecting to the {self.name} (host key checked against {self.spec.known_hosts})")
        try:
            self.session = ssh.SSHSession.connect(
                "box", self.spec.host, self.spec.port, self.spec.key, timeout=60,
                known_hosts=self.spec.known_hosts, user=self.spec.user)
            self._lock()
            self._check()
            self._upload(progress)
            self._load_exporter(progress)
        except BaseException:
            self.down()
            raise

    def _lock(self) -> None:
        """The box's lock, held by a process of this session for as long as it lasts: two
        vmlab runs on one box never overlap, and a run whose connection dies frees it."""
        chan = self.session.open_exec(
            f"mkdir -p {Path(LOCK).parent} && exec 9>>{LOCK} && "
            f"if flock -n 9; then echo LOCKED; exec cat; else echo BUSY; fi")
        rd = ssh.ChannelReader(chan, f"{self.name}: lock")
        rd.pump(time.monotonic() + 30, stop=lambda: b"\n" in rd.out)
        said = rd.out.strip()
        if said != b"LOCKED":
            chan.close()
            if said == b"BUSY":
                raise UserError(f"{self.name} is busy: another vmlab run holds {LOCK}")
            raise UserError(f"{self.name}: cannot take {LOCK}: "
                            f"{bytes(rd.err).decode(errors='replace').strip()[-200:] or 'no answer'}")
        self._lock_chan = chan

    def _check(self) -> None:
        """Refuse, in one line, a box that cannot serve: exit 2 (the box the user named),
        never a half-started run."""
        probe = ("echo uid=$(id -u); echo release=$(uname -r); "
                 "[ -c /dev/kvm ] && [ -w /dev/kvm ] && echo kvm=yes; "
                 "[ -e /lib/modules/$(uname -r)/build/Makefile ] && echo headers=yes; "
                 "for t in qemu-system-x86_64 dkms python3 make gcc flock; do "
                 "command -v $t >/dev/null && echo have=$t; done; "
                 "grep -q '^vmlab_exporter ' /proc/modules && echo loaded=yes; "
                 f"[ -e /usr/src/{DKMS_NAME}-{self.version} ] && echo dkms_src=yes; "
                 "[ -e /var/lib/dkms/mok.key ] || [ -e /var/lib/dkms/mok.pub ] || echo no_mok=yes; true")
        _, out, _ = self.run(probe, timeout=60)
        facts = {}
        for line in out.splitlines():
            k, _, v = line.partition("=")
            facts.setdefault(k, []).append(v)
        release = (facts.get("release") or ["?"])[0]
        lacks = []
        if facts.get("uid") != ["0"]:
            lacks.append(f"root (logged in as uid {(facts.get('uid') or ['?'])[0]}; vmlab loads a module)")
        if "kvm" not in facts:
            lacks.append("a usable /dev/kvm")
        if "headers" not in facts:
            lacks.append(f"headers for its kernel {release} (/lib/modules/{release}/build)")
        missing = [t for t in ("qemu-system-x86_64", "dkms", "python3", "make", "gcc", "flock")
                   if t not in facts.get("have", [])]
        if missing:
            lacks.append(", ".join(missing))
        if lacks:
            raise UserError(f"{self.name} cannot be a lab: it lacks {'; '.join(lacks)}")
        if "loaded" in facts:
            raise UserError(f"{self.name} already has vmlab_exporter loaded, not by this run: "
                            f"unload it (rmmod vmlab_exporter) if no one uses it")
        if "dkms_src" in facts:
            raise UserError(f"{self.name} has /usr/src/{DKMS_NAME}-{self.version} from a run that "
                            f"did not clean up: remove it with 'dkms remove -m {DKMS_NAME} -v "
                            f"{self.version} --all; rm -rf /usr/src/{DKMS_NAME}-{self.version}'")
        self.release = release
        self.dkms_had_mok = "no_mok" not in facts

    def _upload(self, progress) -> None:
        """The run's directory on the box (0700): the host agent and the guest image, what
        a nested lab gets through its 9p share."""
        from .lab import HOSTAGENT_FILES
        _, out, _ = self.run(f"mkdir -p {RUN_DIR} && chmod 700 {RUN_DIR} && "
                             f"mktemp -d /var/tmp/vmlab-run.XXXXXX", timeout=30)
        self.share_dir = out.strip().splitlines()[-1]
        self._undo.append(("the run's directories", f"rm -rf {shlex.quote(self.share_dir)} {RUN_DIR}"))
        self.run(f"mkdir -p {self.share_dir}/guest", timeout=30)
        files = [(p, f"{self.share_dir}/{p.name}") for p in HOSTAGENT_FILES]
        if self.guest_image is not None:
            files += [(self.guest_image.artifact(n), f"{self.share_dir}/guest/{n}")
                      for n in ("vmlinuz", "initramfs.img")]
        total = sum(p.stat().st_size for p, _ in files)
        progress(f"copying the host agent and the guest image to the box ({total >> 20} MiB)")
        for local, remote in files:
            self.session.put(local.read_bytes(), remote)

    def _load_exporter(self, progress) -> None:
        src = f"/usr/src/{DKMS_NAME}-{self.version}"
        # the source as dkms wants it, with our version and without AUTOINSTALL
        self.run(f"mkdir -p {src}", timeout=30)
        self._undo.append(("the exporter's dkms entry",
                           f"dkms remove -m {DKMS_NAME} -v {self.version} --all >/dev/null 2>&1; "
                           f"rm -rf {src}"))
        root = repo_root() / EXPORTER_SRC
        for p in sorted(root.rglob("*")):
            rel = p.relative_to(root)
            if p.is_dir() or p.name.endswith((".o", ".ko", ".mod", ".mod.c", ".cmd", ".symvers", ".order")):
                continue
            data = p.read_bytes()
            if rel.as_posix() == "dkms.conf":
                text = data.decode()
                text = re.sub(r'PACKAGE_VERSION="[^"]*"', f'PACKAGE_VERSION="{self.version}"', text)
                text = re.sub(r'AUTOINSTALL="[^"]*"', 'AUTOINSTALL="no"', text)
                data = text.encode()
            self.run(f"mkdir -p {shlex.quote(str(Path(src) / rel.parent))}", timeout=30)
            self.session.put(data, f"{src}/{rel.as_posix()}")
        if not self.dkms_had_mok:
            # dkms makes itself a module-signing key on its first build: ours to remove
            self._undo.append(("the signing key dkms made for this run",
                               "rm -f /var/lib/dkms/mok.key /var/lib/dkms/mok.pub"))
        progress(f"building the exporter on the box with dkms against {self.release}")
        rc, out, err = self.run(f"dkms add -m {DKMS_NAME} -v {self.version} && "
                                f"dkms build -m {DKMS_NAME} -v {self.version} -k {self.release}",
                                timeout=900, check=False)
        if rc != 0:
            from .errors import CouldNotTest
            _, mlog, _ = self.run(f"cat /var/lib/dkms/{DKMS_NAME}/{self.version}/build/make.log",
                                  timeout=30, check=False)
            kept = self.workdir / "box-dkms-make.log"
            kept.write_text(out + err + mlog)
            errors = [ln for ln in mlog.splitlines() if "error" in ln.lower()] or mlog.splitlines()
            # the kernel under test is the box's: a module that does not build is its
            raise CouldNotTest(f"{self.name}: the exporter does not build against {self.release}: "
                               f"{' | '.join(errors[-2:])[-300:]} (log: {kept})")
        _, out, _ = self.run(f"find /var/lib/dkms/{DKMS_NAME}/{self.version}/{self.release} "
                             f"-name 'vmlab_exporter.ko*' | head -n 1", timeout=30)
        ko = out.strip()
        if not ko:
            raise RemoteError(f"{self.name}: dkms built no vmlab_exporter.ko")
        self._undo.append(("the exporter module", "rmmod vmlab_exporter"))
        self.run(f"insmod {shlex.quote(ko)}", timeout=60)
        progress(f"loaded vmlab_exporter on the box ({ko})")

    # --- the NestedLab interface the run uses
    def run(self, command: str, **kw):
        return self.session.run(command, **kw)

    def kernel_release(self) -> str:
        return self.run("uname -r", timeout=30)[1].strip()

    def alive(self) -> bool:
        return self.session is not None and self.session.active()

    def console_tail(self, n: int = 20) -> str:
        return ""

    def down(self) -> None:
        """Undo what this run did on the box, last first; each step on its own (one that
        fails is logged and the rest still run), then let the lock go."""
        try:
            if self.session is not None and self.session.active():
                for what, cmd in reversed(self._undo):
                    try:
                        rc, out, err = self.run(cmd, timeout=120, check=False)
                        if rc != 0:
                            log.warning("box: undoing %s: exit %d: %s", what, rc, (err or out).strip()[-200:])
                    except Exception as e:
                        log.warning("box: undoing %s: %s", what, e)
            elif self._undo:
                log.warning("box: the session is gone; left on %s: %s", self.name,
                            "; ".join(w for w, _ in self._undo))
            self._undo.clear()
        finally:
            if self._lock_chan is not None:
                self._lock_chan.close()
                self._lock_chan = None
            if self.session is not None:
                self.session.close()
                self.session = None
            shutil.rmtree(self.rundir, ignore_errors=True)
