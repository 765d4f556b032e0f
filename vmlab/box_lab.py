"""A test box as the lab host (``lab: {kind: ssh, host: USER@HOST[:PORT], key: PATH}``).

Developers with hardware keep a machine with real KVM booted into the kernel under test.
vmlab reaches it over SSH (its host key must already be in known_hosts: never accepted
on first use), takes the box's lock for the whole run (waiting for another run's, with
progress), checks that it can serve (root, /dev/kvm, headers for the running kernel, QEMU,
dkms, python3), builds the exporter with dkms against the running kernel and loads it,
runs the host agent and the guests there, and undoes exactly what it did when done.

The undo lives on the box, not in this process: every step vmlab takes is first written
to the run's undo script, and the shell that holds the lock runs that script when its
SSH channel ends, whether vmlab closed it or vmlab died, was killed or lost the network.
So a run never leaves a QEMU, a host agent, a dkms build, the module, the dkms entry, a
raised vm.nr_hugepages or a changed shmem_enabled behind. Never AUTOINSTALL (a kernel
upgrade on the box builds nothing of ours); never a reboot or other reconfiguration.

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
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from . import ssh
from . import proc
from .errors import ConfigError, CouldNotTest, RemoteError, UserError
from .paths import repo_root, runtime_dir

log = logging.getLogger("vmlab.box")

LOCK = "/run/vmlab-box.lock"     # in root's /run: /run/lock is 1777, anyone could hold it
DKMS_NAME = "vmlab-exporter"
EXPORTER_SRC = "host-tools/vmlab-exporter"
ALIGN_SRC = "host-tools/vmm-align/vmlab_align_reserve.c"
#: vmlab's directory on the box for guest state (the guest runner's /run/vmlab/<name>);
#: refused when it exists before the run, so everything in it is the run's own
RUN_DIR = "/run/vmlab"
LOCK_WAIT = 1800      # seconds a run waits for another run's lock on the box
UNDO_WAIT = 600       # seconds the box's undo may take (each step is bounded on the box)
HEARTBEAT = 15        # seconds between vmlab's heartbeats on the lock channel
HEARTBEAT_LOST = 90   # seconds of silence after which the box takes the run for dead
STEP_TIMEOUT = 120    # seconds one undo step may take on the box (a hung one is killed)
#: what the box's own undo needs, checked when the lock is taken
LOCK_TOOLS = ("flock", "timeout", "pkill", "pgrep", "head", "mktemp")
THP_SHMEM = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"


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
    machine = None            # no QEMU of ours runs the box
    image = None
    guest_image = None
    boot_seconds = None
    hwtrace_socket = None
    reused_from = None
    accel = "kvm"
    align_preload = None      # set by _upload: built on the box

    def __init__(self, workdir: Path, spec: BoxSpec | None):
        """``spec`` None: lab kind local, this machine is the box (the same steps, run
        here as local processes instead of over SSH)."""
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.spec = spec
        self.kind = "local" if spec is None else "ssh"
        self.local = spec is None
        self.rundir = runtime_dir()          # this machine's end: guest key, QMP relays
        self.key = self.rundir / "id_ed25519"   # the guests' key, per run (not the box's)
        self.session: ssh.SSHSession | None = None
        self.share_dir: str | None = None   # the run's directory on the box
        self.accel_reason = "this machine's own KVM" if spec is None else f"the test box {spec.host}'s own KVM"
        self._lock_chan = None
        self._undo: list[tuple[str, str, int]] = []   # (what, shell command, timeout), last-first
        self.undo_log: list[str] = []            # what the box said while undoing
        self.version = exporter_version()

    @property
    def name(self) -> str:
        if self.spec is None:
            return "this machine (lab kind local)"
        return f"box {self.spec.user}@{self.spec.host}:{self.spec.port}"

    # --- bring-up
    def up(self, lab_image, guest_image, progress=print) -> None:
        self.guest_image = guest_image
        ssh.generate_key(self.key)
        try:
            if self.spec is None:
                from .local_session import LocalSession
                progress(f"{self.name}: the lab host is this machine")
                self.session = LocalSession()
            else:
                progress(f"connecting to the {self.name} (host key checked against {self.spec.known_hosts})")
                self.session = ssh.SSHSession.connect(
                    "box", self.spec.host, self.spec.port, self.spec.key, timeout=60,
                    known_hosts=self.spec.known_hosts, user=self.spec.user)
            self._lock(progress)
            self._check()
            self._upload(progress)
            self._load_exporter(progress)
        except BaseException:
            self.down()
            raise

    def _lock(self, progress=print) -> None:
        """The box's lock, held by a shell of this session for as long as the session
        lasts: two vmlab runs on one box never overlap. That shell also makes the run's
        directory and, when its channel ends (vmlab closed it, or vmlab is gone), runs the
        run's undo script: the box cleans up after a run that could not."""
        d = '"$d"'
        chan = self.session.open_exec(
            # HUP ignored (and so by what it starts): a dropped connection is EOF or silence.
            # vmlab sends a heartbeat byte every HEARTBEAT s; EOF, or no byte for
            # HEARTBEAT_LOST s (a network gone without a FIN, a suspended laptop), ends the
            # run. The script is read from stdin so that no argv names the run's directory
            # (the undo kills what does).
            "trap '' HUP PIPE; "
            f"for t in {' '.join(LOCK_TOOLS)}; do command -v $t >/dev/null || m=\"$m $t\"; done; "
            "[ -z \"$m\" ] || { echo \"NOTOOLS$m\"; exit 0; }; "
            f"exec 9>>{LOCK} || exit 1; "
            f"flock -n 9 || {{ echo WAITING; flock -w {LOCK_WAIT} 9 || {{ echo BUSY; exit 0; }}; }}; "
            "d=$(mktemp -d /var/tmp/vmlab-run.XXXXXX) || exit 1; "
            "echo \"LOCKED $d\"; "
            f"while [ -n \"$(timeout {HEARTBEAT_LOST} head -c1)\" ]; do :; done; "
            # into a file first: a dead connection must not break the undo's own output
            f"[ -f {d}/undo.sh ] && sh < {d}/undo.sh > {d}/undo.log 2>&1; "
            f"cat {d}/undo.log 2>/dev/null; rm -rf {d}; echo UNDONE")
        rd = ssh.ChannelReader(chan, f"{self.name}: lock")

        def answer() -> list[str]:
            """The complete line that settles it, split; [] while there is none."""
            for line in bytes(rd.out).decode(errors="replace").splitlines(keepends=True):
                if line.endswith("\n") and line.split()[:1] in (["LOCKED"], ["BUSY"], ["NOTOOLS"]):
                    return line.split()
            return []

        try:
            rd.pump(time.monotonic() + 30, stop=lambda: bool(answer()) or b"WAITING\n" in rd.out,
                    soft=True)
            if not answer() and b"WAITING\n" in rd.out:
                progress(f"{self.name} is busy with another vmlab run: waiting up to {LOCK_WAIT} s "
                         f"for its lock ({LOCK})")
                rd.pump(time.monotonic() + LOCK_WAIT + 30, stop=lambda: bool(answer()), soft=True)
        except BaseException:
            chan.close()     # a waiter left behind would take the lock and hold it
            raise
        words = answer()
        if words[:1] != ["LOCKED"] or len(words) != 2:
            chan.close()
            if words[:1] == ["BUSY"]:
                raise UserError(f"{self.name} is busy: another vmlab run held {LOCK} "
                                f"for longer than {LOCK_WAIT} s")
            if words[:1] == ["NOTOOLS"]:
                raise UserError(f"{self.name} cannot be a lab: it lacks {', '.join(words[1:])} "
                                f"(vmlab's undo on the box needs them)")
            raise UserError(f"{self.name}: cannot take {LOCK}: "
                            f"{bytes(rd.err).decode(errors='replace').strip()[-200:] or 'no answer'}")
        self._lock_chan, self._lock_reader = chan, rd
        self.share_dir = words[1]
        self._beat_stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, args=(chan, self._beat_stop),
                                      daemon=True, name="box-heartbeat")
        self._beat.start()
        # from the first step on, the undo begins by stopping whatever of ours still runs
        self._will_undo(None, None)

    def _heartbeat(self, chan, stop: threading.Event) -> None:
        while not stop.wait(HEARTBEAT):
            try:
                chan.sendall(b".")
            except Exception as e:   # the session is gone: the box undoes on its own
                log.warning("%s: heartbeat: %s", self.name, e)
                return

    def _stop_heartbeat(self) -> None:
        if getattr(self, "_beat", None) is not None:
            self._beat_stop.set()
            self._beat.join(timeout=HEARTBEAT + 5)
            self._beat = None

    def _kill_ours(self) -> str:
        """The undo's first step: whatever of this run still runs. The guests' QEMU by
        their pid files (only a process whose command line names that guest's own
        directory: a pid reused by another QEMU is left alone); host agents, relays and
        the preload build, whose argv names the run's directory; a dkms build of ours
        and its make and compilers. [x]: a pattern that does not match its own command."""
        run = self.share_dir + "/"
        return (f"for f in {RUN_DIR}/*/qemu.pid; do [ -f \"$f\" ] || continue; p=$(cat \"$f\"); "
                f"timeout 5 tr '\\0' ' ' < /proc/$p/cmdline 2>/dev/null "
                f"| grep -qF -- \"${{f%/qemu.pid}}/qmp.sock\" && kill -9 $p; done; "
                f"timeout -k 5 30 pkill -9 -f -- {shlex.quote('[' + run[0] + ']' + run[1:])}; "
                f"timeout -k 5 30 pkill -9 -f -- '[d]kms build -m {DKMS_NAME} '; "
                f"timeout -k 5 30 pkill -9 -f -- '[/]var/lib/dkms/{DKMS_NAME}/'; "
                # the host agent's KVM tracepoints, when it could not remove them itself
                "for i in /sys/kernel/tracing/instances/vmlab-*; do [ -d \"$i\" ] || continue; "
                "echo 0 > \"$i/events/enable\"; rmdir \"$i\"; done; sleep 1; true")

    def _will_undo(self, what: str | None, command: str | None, timeout: int = STEP_TIMEOUT) -> None:
        """Write a step's undo to the box before taking the step: the undo script first
        stops this run's processes, then undoes the steps last-first, each on its own and
        bounded (one that fails or hangs is reported, the rest run)."""
        if what is not None:
            self._undo.append((what, command, timeout))
        lines = ["#!/bin/sh", "# vmlab: undo this run's steps on the box, last first"]
        for w, cmd, t in [("the run's processes", self._kill_ours(), 90)] + self._undo[::-1]:
            lines.append(f"timeout -k 5 {t} sh -c {shlex.quote(cmd)} </dev/null || "
                         f"echo {shlex.quote(f'vmlab: undoing {w} failed or timed out')}")
        self.session.put("\n".join(lines).encode() + b"\n", f"{self.share_dir}/undo.sh")

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
                 f"[ -e {RUN_DIR} ] && echo run_dir=yes; "
                 f"echo thp_shmem=$(cat {THP_SHMEM} 2>/dev/null); "
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
        if "run_dir" in facts:
            raise UserError(f"{self.name} has {RUN_DIR} already (a run that did not clean up, or "
                            f"someone else's): vmlab keeps its guests there and removes it after "
                            f"the run; remove it first if no QEMU uses it")
        self.release = release
        self.dkms_had_mok = "no_mok" not in facts
        m = re.search(r"\[(\w[\w-]*)\]", (facts.get("thp_shmem") or [""])[0])
        self.thp_shmem = m.group(1) if m else None

    def _upload(self, progress) -> None:
        """The run's directory on the box (0700, made by the lock's shell): the host agent
        and the guest image, what a nested lab gets through its 9p share."""
        from .exporter import HOSTAGENT_FILES
        share = shlex.quote(self.share_dir)
        # the host agent raises vm.nr_hugepages (writing down by how much) and may set
        # shmem_enabled: take back what it raised, not more (someone else's change to it
        # meanwhile stays), and put shmem_enabled back
        restore = [f"(s=0; [ -f {self.hugepages_ledger} ] && while read d; do s=$((s + d)); done "
                   f"< {self.hugepages_ledger}; [ $s -gt 0 ] || exit 0; "
                   f"c=$(cat /proc/sys/vm/nr_hugepages); [ $c -ge $s ] && "
                   f"echo $((c - s)) > /proc/sys/vm/nr_hugepages)"]
        if self.thp_shmem:
            restore.append(f"echo {self.thp_shmem} > {THP_SHMEM}")
        if restore:
            self._will_undo("the hugepage settings", " ; ".join(restore))
        self._will_undo("the run's directories", f"rm -rf {RUN_DIR}")
        self.run(f"chmod 700 {share} && mkdir -p -m 700 {RUN_DIR} {share}/guest", timeout=30)
        files = [(p, f"{self.share_dir}/{p.name}") for p in HOSTAGENT_FILES]
        if self.guest_image is not None:
            files += [(self.guest_image.artifact(n), f"{self.share_dir}/guest/{n}")
                      for n in ("vmlinuz", "initramfs.img")]
        align = repo_root() / ALIGN_SRC
        files.append((align, f"{self.share_dir}/{align.name}"))
        total = sum(p.stat().st_size for p, _ in files)
        progress(f"copying the host agent and the guest image to the box ({total >> 20} MiB)")
        for local, remote in files:
            self.session.put(local.read_bytes(), remote)
        # what a nested lab's image carries prebuilt: the preload that 2 MiB-aligns QEMU's
        # large reservations (align_mappings: 2M); built here, for the box's libc
        # ld.so ignores a preload from a noexec mount (a common hardening): then none, and
        # an experiment that needs it is refused (GuestVM.spec)
        rc, _, _ = self.run("findmnt -no OPTIONS -T /var/tmp | grep -qw noexec", timeout=30, check=False)
        if rc == 0:
            log.warning("%s: /var/tmp is noexec: no align_mappings 2M on this box", self.name)
            return
        preload = f"{self.share_dir}/align-reserve.so"
        rc, out, err = self.run(f"gcc -O2 -Wall -shared -fPIC -o {shlex.quote(preload)} "
                                f"{shlex.quote(f'{self.share_dir}/{align.name}')} -ldl",
                                timeout=300, check=False)
        if rc != 0:
            raise RemoteError(f"{self.name}: cannot build {ALIGN_SRC}: {(err or out).strip()[-300:]}")
        self.align_preload = preload

    def _load_exporter(self, progress) -> None:
        src = f"/usr/src/{DKMS_NAME}-{self.version}"
        # the source as dkms wants it, with our version and without AUTOINSTALL
        # a module that stays loaded (a QEMU still mapping a buffer) keeps its dkms entry:
        # the entry is how the user finds and removes it
        self._will_undo("the exporter's dkms entry",
                        # a killed build's make and compilers gone first (the first step
                        # killed them; they may take a moment to die)
                        f"for i in 1 2 3 4 5 6 7 8 9 10; do pgrep -f '[/]var/lib/dkms/{DKMS_NAME}/' "
                        f">/dev/null || break; sleep 1; done; "
                        f"if grep -q '^vmlab_exporter ' /proc/modules; then "
                        f"echo 'vmlab: vmlab_exporter is still loaded: {src} kept'; else "
                        f"dkms remove -m {DKMS_NAME} -v {self.version} --all >/dev/null 2>&1; "
                        f"rm -rf {src}; fi", timeout=300)
        self.run(f"mkdir -p {src}", timeout=30)
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
            self._will_undo("the signing key dkms made for this run",
                            "rm -f /var/lib/dkms/mok.key /var/lib/dkms/mok.pub")
        progress(f"building the exporter on the box with dkms against {self.release}")
        rc, out, err = self.run(f"dkms add -m {DKMS_NAME} -v {self.version}", timeout=120, check=False)
        if rc != 0:
            raise UserError(f"{self.name}: dkms add failed: {(err or out).strip()[-300:]}")
        rc, out, err = self.run(f"dkms build -m {DKMS_NAME} -v {self.version} -k {self.release}",
                                timeout=900, check=False)
        if rc != 0:
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
        # the host agent and QEMU let go of the module a moment after their channels close
        self._will_undo("the exporter module",
                        "for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15; do "
                        "grep -q '^vmlab_exporter ' /proc/modules || exit 0; "
                        "rmmod vmlab_exporter 2>/dev/null && exit 0; sleep 1; done; "
                        "rmmod vmlab_exporter")
        rc, out, err = self.run(f"insmod {shlex.quote(ko)}", timeout=60, check=False)
        if rc != 0:
            why = (err or out).strip()[-200:]
            hint = (" (Secure Boot: the box only loads modules signed by an enrolled key; enroll "
                    "dkms's key with mokutil --import /var/lib/dkms/mok.pub, or test with Secure "
                    "Boot off)") if re.search(r"key|signature|not permitted", why, re.I) else ""
            raise UserError(f"{self.name}: the box refused the exporter module: {why}{hint}")
        progress(f"loaded vmlab_exporter on the box ({ko})")

    # --- the NestedLab interface the run uses
    def run(self, command: str, **kw):
        return self.session.run(command, **kw)

    @property
    def hugepages_ledger(self) -> str:
        """Where the host agent writes down how many hugetlb pages it raised (the undo
        reads it): in the run's directory."""
        return f"{self.share_dir}/hugepages.raised"

    def kernel_release(self) -> str:
        return self.run("uname -r", timeout=30)[1].strip()

    def alive(self) -> bool:
        return self.session is not None and self.session.active()

    def console_tail(self, n: int = 20) -> str:
        return ""

    def down(self) -> None:
        """Let the lock's shell run the undo (it runs the steps last-first, each on its
        own), report what the box said, then let the lock go. Ctrl-C waits for it."""
        with proc.signals_deferred():
            try:
                self._undo_on_box()
            finally:
                if self._lock_chan is not None:
                    self._lock_chan.close()
                    self._lock_chan = None
                if self.session is not None:
                    self.session.close()
                    self.session = None
                shutil.rmtree(self.rundir, ignore_errors=True)

    def _undo_on_box(self) -> None:
        chan = self._lock_chan
        if chan is None:
            return
        if not (self.session is not None and self.session.active()):
            if self._undo:
                log.warning("box: the session is gone; the box undoes on its own: %s",
                            "; ".join(w for w, _, _ in self._undo))
            return
        self._stop_heartbeat()
        try:
            chan.shutdown_write()        # EOF to the lock's shell: the undo script runs
            rd = self._lock_reader
            rd.pump(time.monotonic() + UNDO_WAIT, stop=lambda: b"UNDONE" in rd.out, soft=True)
            said = bytes(rd.out).decode(errors="replace").splitlines()
            self.undo_log = [ln for ln in said if not ln.startswith(("LOCKED", "WAITING"))]
            for line in self.undo_log:
                if line.startswith("vmlab:"):
                    log.warning("%s: %s", self.name, line)
            if not any(ln.strip() == "UNDONE" for ln in said):
                log.warning("box: the undo on %s did not finish within %d s; it goes on there",
                            self.name, UNDO_WAIT)
        except Exception as e:
            log.warning("box: undoing on %s: %s", self.name, e)
        self._undo.clear()
