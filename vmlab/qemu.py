"""One class owns one QEMU process: argv, launch, console log, QMP, shutdown ladder.

``QemuMachine`` is that class at both levels. Where its process runs is a small runner:
``HostProcess`` runs QEMU on *this* machine (the nested lab host); ``LabProcess``
(vmlab/lab_process.py) runs it inside the lab host over SSH (the guests). The machine
does the rest alike at both levels: the argv from one ``VMSpec``, QMP up within a
timeout, the console watched for a marker, a kernel panic or QEMU's death, and the
shutdown ladder (QMP quit, SIGTERM, SIGKILL, each with a timeout).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import proc, qmp
from .errors import BootFailure, InfraError, QemuRefused, VmlabError
from .qmp import QMP, QMPGone

log = logging.getLogger("vmlab.qemu")


# Boot-time work neither the lab nor a guest has a use for, measured with initcall_debug
# (guest in the TCG lab / lab under TCG, Debian 6.12): init_encrypted 1.93 s / 0.57 s,
# crypto_kdf108_init (a self-test that cryptomgr.notests does not cover) 1.45 / 0.28 s,
# jent_mod_init 0.31 / 0.22 s, fscrypt_init 0.14 s / -. A kernel without one of them
# ignores its name; none is on a KVM or dma-buf path.
SKIPPED_INITCALLS = "initcall_blacklist=init_encrypted,crypto_kdf108_init,jent_mod_init,fscrypt_init"


@dataclass
class VMSpec:
    """What a VM is; ``argv()`` turns it into QEMU's command line (pure, unit-tested)."""
    name: str
    kernel: str
    initrd: str
    append: str
    memory_mb: int = 1024
    accel: str = "tcg"                 # "tcg" | "kvm"
    cpu: str = "max"
    smp: int = 1
    machine: str = "q35"
    binary: str = "qemu-system-x86_64"
    disk: str | None = None            # raw image, opened with snapshot=on (never modified)
    disk_overlay: bool = False         # disk is a qcow2 overlay of vmlab's own (a lab snapshot keeps it)
    key_port: str | None = None        # socket of a virtio-serial port vmlab.key (lab_snapshot)
    vmgenid: bool = False              # a VM generation ID: a restored snapshot reseeds its RNG
    console_append: bool = False       # QEMU appends to console_log (what the launcher put there first)
    ssh_forward: int | None = None     # host port (127.0.0.1 only) -> guest :22
    share: str | None = None           # directory exported read-only as 9p tag "vmlabshare"
    console_log: str = "console.log"
    qmp_socket: str = "qmp.sock"
    qmp_client: bool = False           # QEMU connects to a socket vmlab listens on (local VMs)
    pidfile: str | None = None
    daemonize: bool = False
    display: str = "none"
    memfd_ram: bool = False            # guest RAM from memory-backend-memfd (virtio-gpu blobs need it)
    # virtio-net as a legacy (port I/O) device: its notifications then never need KVM's
    # instruction emulator (see Guest.spec)
    virtio_pio: bool = False
    env: dict = field(default_factory=dict)  # environment for QEMU (in the shell command line)
    extra: list[str] = field(default_factory=list)

    def argv(self) -> list[str]:
        accel = self.accel if self.accel != "tcg" else "tcg,thread=single"
        machine = self.machine + (",memory-backend=vmlab-ram" if self.memfd_ram else "")
        a = [self.binary, "-name", self.name, "-machine", machine, "-accel", accel,
             "-cpu", self.cpu, "-smp", str(self.smp), "-m", str(self.memory_mb),
             "-nodefaults", "-no-user-config", "-display", self.display, "-no-reboot",
             "-kernel", self.kernel, "-initrd", self.initrd, "-append", self.append,
             "-chardev", f"file,id=con0,path={self.console_log}" + (",append=on" if self.console_append else ""),
             "-serial", "chardev:con0"]
        if self.qmp_client:
            a += ["-chardev", f"socket,id=qmp0,path={self.qmp_socket}",
                  "-mon", "chardev=qmp0,mode=control"]
        else:
            a += ["-qmp", f"unix:{self.qmp_socket},server=on,wait=off"]
        if self.memfd_ram:
            a += ["-object", f"memory-backend-memfd,id=vmlab-ram,size={self.memory_mb}M"]
        if self.disk:
            a += ["-drive", f"file={self.disk},if=virtio,format=qcow2" if self.disk_overlay
                  else f"file={self.disk},if=virtio,format=raw,snapshot=on"]
        if self.key_port:
            a += ["-device", "virtio-serial-pci,id=vser0"
                  + (",disable-modern=on,disable-legacy=off" if self.virtio_pio else ""),
                  "-chardev", f"socket,id=keyport,path={self.key_port},server=on,wait=off",
                  "-device", "virtserialport,bus=vser0.0,chardev=keyport,name=vmlab.key"]
        if self.vmgenid:
            a += ["-device", "vmgenid,guid=auto"]
        if self.ssh_forward is not None:
            a += ["-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{self.ssh_forward}-:22",
                  # romfile= : no iPXE ROM needed for -kernel boots (and ipxe-qemu is optional)
                  "-device", "virtio-net-pci,netdev=n0,romfile="
                  + (",disable-modern=on,disable-legacy=off" if self.virtio_pio else "")]
        if self.share:
            a += ["-virtfs", f"local,path={self.share},mount_tag=vmlabshare,"
                             "security_model=none,readonly=on"]
        if self.pidfile:
            a += ["-pidfile", self.pidfile]
        if self.daemonize:
            a += ["-daemonize"]
        return a + list(self.extra)

    def command_line(self) -> str:
        env = [f"{k}={v}" for k, v in sorted(self.env.items())]
        return shlex.join((["env", *env] if env else []) + self.argv())


@functools.lru_cache(maxsize=4)
def qemu_version(binary: str = "qemu-system-x86_64") -> str:
    """This machine's QEMU, as `--version` says it (asked once per process)."""
    try:
        _, out, _ = proc.run_cmd([binary, "--version"], timeout=20)
    except Exception as e:  # reported by doctor, not fatal here
        return f"unavailable ({e})"
    return out.splitlines()[0].replace("QEMU emulator version ", "") if out else "?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def console_tail(path: Path, lines: int = 15) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 8192))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.replace("\r", "").splitlines()[-lines:])


class HostProcess:
    """Runs a QemuMachine's QEMU on this machine: a child process in a session of its
    own, stderr in the workdir, QMP on a local socket (mode 0600)."""

    where = "this machine"

    def stderr_path(self, m: "QemuMachine") -> Path:
        return m.workdir / f"{m.spec.name}.qemu.log"

    def prepare(self, m: "QemuMachine") -> None:
        Path(m.spec.console_log).write_bytes(m.console_head)
        if not m.spec.qmp_client:
            # a socket left by a killed QEMU would look ready before the new one listens
            Path(m.spec.qmp_socket).unlink(missing_ok=True)

    def spawn(self, m: "QemuMachine") -> None:
        err = open(self.stderr_path(m), "wb")
        try:
            # Its own session: a terminal's Ctrl-C or a signal to vmlab's process group must
            # not reach QEMU behind vmlab's back (vmlab stops it in order); PDEATHSIG still
            # ties it to vmlab unless detached.
            m.proc = proc.popen(m.spec.argv(), detach=m.detach, stdin=subprocess.DEVNULL,
                                stdout=err, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_detached_setup if m.detach else _child_setup)
        finally:
            err.close()
        m.pid = m.proc.pid
        m.start_time = proc.pid_start_time(m.pid)

    def alive(self, m: "QemuMachine") -> bool:
        if m.proc is not None:
            return m.proc.poll() is None
        if m.pid is None or not proc.pid_alive(m.pid):
            return False
        return m.start_time is None or proc.pid_start_time(m.pid) == m.start_time

    def signal(self, m: "QemuMachine", sig) -> None:
        # Never signal a recycled pid: the start time recorded at launch must still match.
        if m.pid is None or (m.start_time is not None and
                             proc.pid_start_time(m.pid) != m.start_time):
            return
        try:
            os.kill(m.pid, sig)
        except ProcessLookupError:
            pass

    def read_text(self, path: str) -> str:
        return _read(Path(path))

    def exit_status(self, m: "QemuMachine"):
        return m.proc.returncode if m.proc is not None else "?"

    def qmp_socket_ready(self, m: "QemuMachine") -> bool:
        return os.path.exists(m.spec.qmp_socket)

    def open_qmp(self, m: "QemuMachine", timeout: float) -> QMP:
        os.chmod(m.spec.qmp_socket, 0o600)
        return qmp.connect(m.spec.qmp_socket, m.spec.name, timeout)

    def cleanup(self, m: "QemuMachine") -> None:
        if m.proc is not None:
            try:
                m.proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                log.warning("%s: pid %s still there after SIGKILL", m.spec.name, m.pid)
        try:
            os.unlink(m.spec.qmp_socket)
        except (FileNotFoundError, TypeError):
            pass


class QemuMachine:
    """One QEMU process, on this machine or (``host=LabProcess``) inside the lab. Use as a
    context manager; ``shutdown`` is a ladder (QMP quit -> SIGTERM -> SIGKILL, each with a
    timeout) and is safe to call twice."""

    def __init__(self, spec: VMSpec, workdir: Path, *, detach: bool = False, host=None):
        self.spec = spec
        self.workdir = Path(workdir)
        self.detach = detach
        self.host = host or HostProcess()
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None
        self.qmp: QMP | None = None
        self.start_time: int | None = None
        self.events: list[dict] = []
        # what the console log starts with (a restored snapshot's boot, which this QEMU
        # did not see); QEMU appends to it
        self.console_head = b""

    @property
    def console_path(self) -> Path:
        return Path(self.spec.console_log)

    @property
    def stderr_path(self) -> Path:
        return self.host.stderr_path(self)

    def launch(self, timeout: float = 30) -> None:
        """Start QEMU and bring up QMP within ``timeout``; on any failure nothing is left
        running (BootFailure names QEMU's last words and the console log)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / f"{self.spec.name}.cmdline").write_text(self.spec.command_line() + "\n")
        log.info("launching %s on %s: %s", self.spec.name, self.host.where, self.spec.command_line())
        self.host.prepare(self)
        if self.spec.qmp_client:
            self.qmp = QMP.serve(self.spec.qmp_socket, nickname=self.spec.name)
        try:
            self.host.spawn(self)
        except BaseException:
            self._post_shutdown()
            raise
        try:
            what = f"QMP of {self.spec.name}"
            if self.spec.qmp_client:
                self.qmp.accept_while(self.alive, timeout, what)
                self.qmp.settimeout(30)
            else:
                proc.wait_until(lambda: self.host.qmp_socket_ready(self) or not self.alive(),
                                timeout, f"QMP socket of {self.spec.name}")
                if self.alive():
                    self.connect_qmp(timeout)
            if not self.alive():
                raise self.refused()
        except QMPGone:
            self.shutdown(quick=True)
            raise self.refused()
        except BaseException:
            self.shutdown(quick=True)
            raise

    def connect_qmp(self, timeout: float = 30) -> None:
        q = self.host.open_qmp(self, timeout)
        q.settimeout(30)
        self.qmp = q

    def _last_words(self) -> str:
        try:
            lines = [ln for ln in self.host.read_text(str(self.stderr_path)).splitlines() if ln.strip()]
            return lines[-1] if lines else ""
        except Exception:   # the words of a failure: never a failure of their own
            return ""

    def failure(self, cause: str, retryable: bool = True) -> BootFailure:
        """A BootFailure (exit 125) naming QEMU's last words (stderr) and the console log."""
        last = self._last_words()
        if last:
            cause = f"{cause}: {last}"
        return BootFailure(self.spec.name, cause, str(self.console_path), retryable=retryable)

    def refused(self) -> VmlabError:
        """QEMU exited before it ran anything. When its last words are about the kernel it
        was given, that kernel is what is under test: BootFailure (125), not retried.
        Anything else is how QEMU was asked to run (an option, /dev/kvm, memory): the
        user's input, exit 2 (git bisect must not skip every commit over a typo)."""
        last = self._last_words()
        cause = f"QEMU exited early with status {self.host.exit_status(self)}"
        if "Could not set up host forwarding rule" in last:
            # the free port vmlab picked was taken before QEMU bound it (another command's
            # VM): no one's input; booted again, on a port picked anew
            return self.failure(cause, retryable=True)
        if re.search(r"kernel|bzImage|initrd|PVH|multiboot", last, re.I):
            return self.failure(cause, retryable=False)
        return QemuRefused(f"{self.spec.name}: {cause}: {last or 'no message'} "
                           f"(command line: {self.workdir / (self.spec.name + '.cmdline')})")

    def alive(self) -> bool:
        return self.host.alive(self)

    def cmd(self, command: str, /, **args):
        """A QMP command; positional-only, so an argument may be called "name"."""
        if self.qmp is None:
            raise InfraError(f"{self.spec.name}: QMP not connected")
        out = self.qmp.cmd(command, **args)
        self.collect_events()
        return out

    def collect_events(self) -> list[dict]:
        if self.qmp is not None:
            try:
                self.events += self.qmp.get_events(wait=False)
            except Exception:  # a dead QEMU has no events to give
                pass
        return self.events

    def wait_console(self, markers: dict[str, str], timeout: float, what: str,
                     stopped=None, fatal: tuple = ()) -> str:
        """Wait for the first of ``markers`` (text -> outcome) in the console log.
        Fails fast when QEMU exits, the kernel panics or prints one of ``fatal`` (an oops
        during boot: the kernel will not come up whole), or ``stopped()`` names why the VM
        cannot get there (e.g. KVM stopped its vCPU); returns the outcome."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.host.read_text(self.spec.console_log)
            for marker, outcome in markers.items():
                if marker in text:
                    return outcome
            if "Kernel panic" in text:
                line = next((ln for ln in text.splitlines() if "Kernel panic" in ln), "")
                raise self.failure(f"kernel panic: {line.strip()}")
            hit = next((ln for ln in text.splitlines() if any(w in ln for w in fatal)), None)
            if hit is not None:
                raise self.failure(f"kernel oops during boot: {hit.strip()[:200]}")   # guest.OOPS_CAUSE
            if not self.alive():
                raise self.failure(f"QEMU exited (status {self.host.exit_status(self)}) before {what}")
            why = stopped() if stopped is not None else None
            if why:
                raise self.failure(why)
            if time.monotonic() >= deadline:
                last = (text.replace("\r", "").splitlines() or ["<empty>"])[-1]
                raise self.failure(f"no '{what}' within {timeout:.0f}s; last console line: {last[:160]}")
            time.sleep(0.25)

    def shutdown(self, timeout: float = 10, quick: bool = False) -> None:
        """QMP quit, SIGTERM, SIGKILL; each step's wait is bounded, and so is the whole
        ladder (a runner whose every check is an SSH exec makes each step cost more)."""
        end = time.monotonic() + timeout + 15
        try:
            if self.alive() and not quick and self.qmp is not None:
                try:
                    self.qmp.quit_within(min(5.0, timeout))
                except Exception:  # a dead or wedged monitor: the signals below decide
                    pass
                self._wait_gone(min(timeout, end - time.monotonic()))
            if time.monotonic() < end and self.alive():
                self.host.signal(self, signal.SIGTERM)
                self._wait_gone(min(5, end - time.monotonic()))
            if self.alive():   # SIGKILL is never skipped
                self.host.signal(self, signal.SIGKILL)
                self._wait_gone(5)
        finally:
            self._post_shutdown()

    def _wait_gone(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.1)


    def _post_shutdown(self) -> None:
        self.collect_events()
        if self.qmp is not None:
            try:
                self.qmp.close()
            except Exception:
                pass
            self.qmp = None
        try:
            self.host.cleanup(self)
        except Exception as e:   # a lab gone meanwhile: its processes went with it
            log.warning("%s: cleanup on %s: %s", self.spec.name, self.host.where, e)
        if self.events:
            with open(self.workdir / f"{self.spec.name}.qmp-events.jsonl", "a") as f:
                for ev in self.events:
                    f.write(json.dumps(ev) + "\n")
            self.events = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _child_setup() -> None:
    os.umask(0o077)  # QMP socket and logs: owner only
    proc._die_with_parent()


def _detached_setup() -> None:
    os.umask(0o077)
