"""A guest: a QEMU process of the lab host, booted with -accel kvm from the guest image.

Its QEMU is a ``QemuMachine`` like the lab's own, run inside the lab by ``LabProcess``
(vmlab/lab_process.py: started over the lab's SSH session, QMP through a relay channel);
this class adds what a guest is: its spec, readiness (the init's marker, or why it will
never come), its SSH server through a direct-tcpip channel of the lab session, and its
logs copied into the results directory.
"""
from __future__ import annotations

import logging
import os
import re
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import ssh
from .errors import BootFailure, InfraError, QemuRefused, RemoteError, UserError, WaitTimeout
from .lab_process import LabProcess
from .qemu import SKIPPED_INITCALLS, QemuMachine, VMSpec
from .qmp import QMPGone

log = logging.getLogger("vmlab.guest")
READY = "VMLAB-GUEST-READY"
# The guest's kernel and initramfs, copied once per lab from the read-only 9p share to the
# lab's tmpfs: QEMU reading them over 9p cost 1.5 s of every guest boot under TCG.
IMAGE_DIR = "/run/vmlab/guest-image"
# Built into the lab image from host-tools/vmm-align: aligns QEMU's PROT_NONE reservations
# of 2 MiB or more to 2 MiB, so an fd-backed BAR can get KVM's 2 MiB nested mappings.
ALIGN_PRELOAD = "/usr/lib/vmlab/align-reserve.so"
_COPY_IMAGE = (f"if [ ! -s {IMAGE_DIR}/initramfs.img ]; then mkdir -p {IMAGE_DIR} && "
               f"t=$(mktemp -d {IMAGE_DIR}.XXXXXX) && "
               f"cp {{share}}/guest/vmlinuz {{share}}/guest/initramfs.img $t/ && "
               f"mv $t/vmlinuz {IMAGE_DIR}/vmlinuz && mv $t/initramfs.img {IMAGE_DIR}/initramfs.img "
               f"&& rmdir $t; fi")
# Every character on the emulated 8250 is a VM exit, and under the TCG lab each exit is an
# emulated #VMEXIT: leaving the boot's NOTICE and INFO lines off the console
# (loglevel=5; WARNING and worse, so WARN splats, oopses and panics, still print; dmesg
# keeps everything) took a guest boot from 57,000 to 20,000 I/O exits and 4 s off it.
# The rest skips probes this guest has no use for: the i8042 (no keyboard) and the crypto
# self-tests. The clock is left alone: a TSC the lab's KVM gets wrong must stay visible.
# An oops while the guest boots (its console shows WARNING and worse) means a kernel that
# will not come up whole: measured, a TCG-lab guest whose kdevtmpfs oopsed at 2.3 s never
# reached userspace, and the boot waited out its 240 s. WARN splats are not fatal.
BOOT_FATAL = ("Oops:", "kernel BUG at", "general protection fault")
OOPS_CAUSE = "kernel oops during boot"   # QemuMachine.wait_console's words for a BOOT_FATAL hit
BOOT_ARGS = ("console=ttyS0 panic=-1 loglevel=5 i8042.noaux i8042.nokbd i8042.nopnp "
             "cryptomgr.notests "
             + SKIPPED_INITCALLS)


# logs up to this size come through the host agent's JSON (base64); bigger ones by exec
AGENT_LOG_BYTES = 4 << 20


def _sized_cat(paths: list[str]) -> str:
    """A shell script that writes each file as its size, a newline and that many bytes
    (-1 and no bytes: unreadable); a file that grows meanwhile is cut at the size it had."""
    return "; ".join(f"if n=$(stat -c %s {shlex.quote(p)} 2>/dev/null); then echo $n; "
                     f"head -c $n {shlex.quote(p)}; else echo -1; fi" for p in paths)


def _sized_parts(data: bytes) -> list[bytes | None]:
    """Split "SIZE\\nBYTES..." parts (SIZE -1: no part) as fetch_logs' script writes them;
    a part cut short is what arrived."""
    parts: list[bytes | None] = []
    while data:
        head, sep, data = data.partition(b"\n")
        try:
            n = int(head)
        except ValueError:
            break
        if not sep:
            break
        if n < 0:
            parts.append(None)
            continue
        parts.append(data[:n])
        data = data[n:]
    return parts


@dataclass
class GuestOptions:
    name: str = "guest"
    memory_mb: int = 512
    smp: int = 1
    boot_timeout: float = 240
    ssh_port: int = 2222          # lab-local port, bound on the lab's 127.0.0.1
    extra_qemu_args: list = field(default_factory=list)
    machine: str = "q35,hpet=off"   # no HPET to probe; the guest keeps time by TSC
    append: str = ""
    gpu: str = "none"             # none | blob (virtio-gpu-pci blob=true) | host-blob (virtio-gpu-gl)
    hostmem_mb: int = 64
    align_mappings: str = "4K"    # 2M: QEMU's large reservations 2 MiB-aligned (ALIGN_PRELOAD)
    shared_ram: bool = False      # RAM from a memfd (a vhost-user device gets it at start)
    key_port: bool = False        # a virtio-serial port vmlab.key: its key after a lab restore


# what a guest's boot fixed and an experiment may ask for differently (name, port, boot
# timeout and the devices on its command line are the guest's own)
GUEST_SHAPE = ("memory_mb", "smp", "machine", "append", "gpu", "hostmem_mb", "align_mappings",
               "shared_ram")


def guest_mismatch(have: dict, want: GuestOptions) -> str | None:
    """None when a guest booted with options ``have`` serves a run that would boot one
    with ``want``, else the first difference in words."""
    w = asdict(want)
    for k in GUEST_SHAPE:
        if have.get(k) != w[k]:
            return f"its {k} is {have.get(k)!r}, this run wants {w[k]!r}"
    return None


class Guest:
    def __init__(self, lab, opts: GuestOptions, workdir: Path):
        self.lab = lab
        self.opts = opts
        self.workdir = Path(workdir)
        self.dir = f"/run/vmlab/{opts.name}"
        self._machine: QemuMachine | None = None
        self.session: ssh.SSHSession | None = None
        self.boot_seconds: float | None = None
        self.reused_from: str | None = None   # who else this guest serves (reuse, matrix)
        self.phases: dict = {}      # where the boot's seconds went (the profile bench)

    @property
    def machine(self) -> QemuMachine:
        """Its QEMU, run in the lab; the QMP relay's local end in the lab's private run
        directory (short: AF_UNIX paths end at 107 bytes; never in a results directory)."""
        if self._machine is None:
            # the relay's end is this process's own: another command may attach to the same
            # guest (doctor, guest exec) and must not unlink it
            self._machine = QemuMachine(self.spec(), self.workdir,
                                        host=LabProcess(self.lab, self.dir, self.lab.rundir /
                                                        f"{self.opts.name}-{os.getpid()}-qmp.sock"))
        return self._machine

    @property
    def pid(self) -> int | None:
        # read without building the machine: a teardown asks, and must not need the key
        return self._machine.pid if self._machine is not None else None

    @pid.setter
    def pid(self, value: int | None) -> None:
        self.machine.pid = value

    @property
    def qmp(self):
        return self.machine.qmp

    def gpu_args(self) -> tuple[list[str], dict, str]:
        """(QEMU args, environment, display) for the guest's virtio-gpu mode."""
        if self.opts.gpu == "blob":
            return ["-device", "virtio-gpu-pci,blob=true"], {}, "none"
        if self.opts.gpu == "host-blob":
            # Mesa's software renderer on the lab's vgem render node (no GPU in the lab).
            return (["-device", f"virtio-gpu-gl-pci,blob=true,hostmem={self.opts.hostmem_mb}M"],
                    {"LIBGL_ALWAYS_SOFTWARE": "1"}, "egl-headless,rendernode=/dev/dri/renderD128")
        return [], {}, "none"

    def cpu(self) -> str:
        """-cpu host, except in a TCG lab: its KVM offers XSAVE with a size for AVX state
        but no AVX, so every guest kernel warns (a 4,000-character splat, 8,000 emulated
        exits on the 8250) and then turns XSAVE off (5.16 and later; 5.10 warns and keeps
        it, and with it AVX, AVX2 and FMA, which need its state). xsave=off with those
        three off gives those kernels the same CPU without the detour (/proc/cpuinfo's
        flags compared: identical; XSAVE off alone left AVX advertised, and the catalog's
        AVX-store entry, not applicable before, failed in the agent); an older or
        unknown guest kernel keeps -cpu host, and on hardware the host's XSAVE is what the
        experiment should see."""
        if getattr(self.lab, "accel", None) != "tcg":
            return "host"
        gi = getattr(self.lab, "guest_image", None)
        m = re.match(r"(\d+)\.(\d+)", (gi.manifest.get("kernel_release") or "") if gi is not None else "")
        return "host,xsave=off,avx=off,avx2=off,fma=off" if m and (int(m[1]), int(m[2])) >= (5, 16) else "host"

    def spec(self) -> VMSpec:
        pub = ssh.public_key_b64(self.lab.key)
        gargs, genv, display = self.gpu_args()
        if self.opts.align_mappings == "2M":
            # a nested lab's image has it prebuilt; a box builds its own for the run
            preload = getattr(self.lab, "align_preload", ALIGN_PRELOAD)
            if preload is None:
                raise UserError(f"align_mappings 2M: {self.lab.name} has no preload for it "
                                f"(its /var/tmp is noexec)")
            genv = dict(genv, LD_PRELOAD=preload)
        return VMSpec(
            name=self.opts.name, kernel=f"{IMAGE_DIR}/vmlinuz", initrd=f"{IMAGE_DIR}/initramfs.img",
            append=" ".join(filter(None, [BOOT_ARGS, f"vmlab.sshkey={pub}",
                                          "vmlab.gpu=1" if self.opts.gpu != "none" else "",
                                          "vmlab.keyport=1" if self.opts.key_port else "",
                                          self.opts.append])),
            memory_mb=self.opts.memory_mb, accel="kvm", cpu=self.cpu(), smp=self.opts.smp,
            machine=self.opts.machine, ssh_forward=self.opts.ssh_port,
            console_log=f"{self.dir}/console.log", qmp_socket=f"{self.dir}/qmp.sock",
            display=display, env=genv, memfd_ram=self.opts.gpu != "none" or self.opts.shared_ram,
            # Each MMIO exit is emulated by the lab's KVM, and in a TCG lab a 7.x KVM refuses
            # to emulate one at random (it reads event-delivery type bits that QEMU's emulated
            # SVM leaves in EXITINTINFO: KVM internal error, suberror 3). Port I/O exits
            # take KVM's fast path, no emulator: virtio-net's notifications go there.
            virtio_pio=True, key_port=f"{self.dir}/key.sock" if self.opts.key_port else None,
            extra=gargs + list(self.opts.extra_qemu_args))

    def command_line(self) -> str:
        return self.spec().command_line()

    def up(self, progress=print) -> None:
        m = self.machine
        progress(f"booting guest '{self.opts.name}' in the lab (-accel kvm); console: lab:{m.spec.console_log}")
        start = time.monotonic()
        self.lab.run(_COPY_IMAGE.format(share=self.lab.share_dir), timeout=120)   # its own step: a failed copy says why
        try:
            m.launch(timeout=60)
        except (BootFailure, QemuRefused, WaitTimeout, QMPGone, RemoteError, OSError) as e:
            # the guest's QEMU is the VMM under test: one that will not start (or whose QMP
            # never comes up) is "could not test" (125) whatever it objected to
            self.fetch_logs()
            last = m._last_words()
            raise BootFailure(self.opts.name, f"QEMU in the lab did not start: {e}"
                              + (f" (its last words: {last})" if last and last not in str(e) else ""),
                              str(self.workdir / f"{self.opts.name}-console.log"), retryable=False)
        launched = time.monotonic()
        try:
            self._wait_ready()
            ready = time.monotonic()
            self.connect(qmp=False)
        except BootFailure as e:
            # booted again only when this QEMU is known gone (the next one takes its name,
            # port and directory)
            if not self.down():
                e.retryable = False
            raise
        except BaseException:
            self.down()
            raise
        end = time.monotonic()
        self.boot_seconds = round(end - start, 1)
        self.phases = {"launch_s": round(launched - start, 3), "to_ready_s": round(ready - launched, 3),
                       "ssh_connect_s": round(end - ready, 3)}
        progress(f"guest up in {self.boot_seconds}s")

    # --- a guest kept in a lab snapshot (lab_snapshot, NestedLab.resident_guest)
    def freeze(self) -> dict:
        """Make this guest fit to be saved with its lab: nobody can log in (its run's key
        is removed), its vCPUs are out of KVM_RUN (QEMU's TCG refuses to restore a lab
        vCPU that was in guest mode), SSH and the QMP relay closed (the relay runs from
        the share, which the save unmounts). Returns what a restore needs to find it."""
        if not self.opts.key_port:
            raise InfraError(f"{self.opts.name}: a guest without a key port cannot be saved "
                             f"(no key could reach it after a restore)")
        rc, _, _ = self.lab.run(f"grep -q 'vmlab-guest: .* key port /dev/vport' "
                                f"{shlex.quote(self.spec().console_log)}", timeout=30, check=False)
        if rc != 0:   # its init found no port: a guest saved so could never be logged into
            raise InfraError(f"{self.opts.name}: its init runs no key-port reader (no 'key port' "
                             f"line on its console)")
        self.run("rm -f /root/.ssh/authorized_keys", timeout=30)
        self.cmd("stop")
        self.disconnect()
        return {"opts": asdict(self.opts), "pid": self.pid}

    def thaw(self, progress=print, timeout: float = 30) -> None:
        """Run a frozen guest again with this run's key (sent through its key port with
        the time and the host's entropy, again every half second until its init says it
        installed it), then SSH. The key's sender (an exec in the lab, its own deadline)
        starts first and waits in the port's buffer while QMP's relay starts: two
        Python start-ups under TCG, side by side."""
        start = time.monotonic()
        nonce = os.urandom(8).hex()
        # the time is the lab's, stamped by the sender at each send (the lab's clock is set)
        line = f"VMLAB-KEY {ssh.public_key_b64(self.lab.key)} TIME {nonce} {os.urandom(32).hex()}\n"
        spec = self.spec()
        chan = self.lab.session.open_exec(
            f"python3 -S -c {shlex.quote(_KEY_SENDER)} {shlex.quote(spec.key_port)} "
            f"{shlex.quote(spec.console_log)} {nonce} {timeout:g}")
        try:
            chan.sendall(line.encode())
            chan.shutdown_write()
            self.cmd("cont")
            running = time.monotonic()
            rd = ssh.ChannelReader(chan, f"{self.opts.name}: its key through the key port")
            rd.read_until_exit(time.monotonic() + timeout + 15)
        finally:
            chan.close()
        if rd.rc != 0:
            raise BootFailure(self.opts.name, f"the restored guest did not take its key: "
                              f"{bytes(rd.err or rd.out).decode(errors='replace').strip()[-300:]}",
                              str(self.workdir / f"{self.opts.name}-console.log"), retryable=False)
        keyed = time.monotonic()
        self.connect(timeout=30, qmp=False)
        end = time.monotonic()
        self.boot_seconds = round(end - start, 1)
        self.phases = {"cont_s": round(running - start, 3), "key_s": round(keyed - running, 3),
                       "ssh_connect_s": round(end - keyed, 3)}
        log.debug("%s thawed: %s", self.opts.name, self.phases)
        progress(f"guest '{self.opts.name}' restored with the lab, running in {self.boot_seconds}s")

    def uptime_marks(self) -> dict:
        """The guest init's own uptime stamps ("vmlab-guest: [4.27] init started"): how
        much of a boot was the guest's kernel, and how much came before it started (for
        the profile bench; an exec in the lab, so not on every boot)."""
        try:
            rc, out, _ = self.lab.run(f"grep 'vmlab-guest: \\[' {shlex.quote(self.spec().console_log)}",
                                      timeout=20, check=False)
        except Exception as e:   # a profile figure: never a reason to fail a booted guest
            log.warning("%s: no uptime marks: %s", self.opts.name, e)
            return {}
        marks = {}
        for line in out.splitlines():
            m = re.search(r"vmlab-guest: \[([0-9.]+)\] (.*)", line)
            if m:
                marks[m.group(2).split(" kernel=")[0]] = float(m.group(1))
        return marks

    def _stopped_by_kvm(self) -> str | None:
        """A vCPU that KVM stopped (QEMU keeps running, paused) never gets ready: say so."""
        rc, out, _ = self.lab.run(f"grep -m1 -A1 'KVM internal error' {self.dir}/qemu.log",
                                  timeout=30, check=False)
        return f"KVM stopped the guest during boot: {' '.join(out.split())}" if rc == 0 else None

    def _wait_ready(self) -> None:
        try:
            self.machine.wait_console({READY: "ready"}, self.opts.boot_timeout, "guest ready",
                                      stopped=self._stopped_by_kvm, fatal=BOOT_FATAL)
        except BootFailure as e:
            self.fetch_logs()
            # only an oops in early boot is booted again (a TCG-lab artifact): a hang, a
            # panic or KVM stopping the vCPU belongs to the kernel or the VMM under test
            raise BootFailure(self.opts.name, e.cause,
                              str(self.workdir / f"{self.opts.name}-console.log"),
                              retryable=e.cause.startswith(OOPS_CAUSE))

    def connect(self, timeout: float = 60, *, qmp: bool = True) -> None:
        """SSH (through the lab's session) and, unless ``qmp`` is false, QMP to an already
        running guest (QEMU serves one QMP client at a time: don't hold it needlessly)."""
        if qmp and self.machine.qmp is None:
            self.machine.connect_qmp(30)
        self.session = ssh.SSHSession.connect(
            self.opts.name, "127.0.0.1", self.opts.ssh_port, self.lab.key, timeout=timeout,
            sock_factory=lambda: self.lab.session.open_tcp("127.0.0.1", self.opts.ssh_port),
            alive=self.alive)

    def disconnect(self) -> None:
        """Drop SSH and QMP without stopping the guest (for `vmlab guest ...` commands)."""
        if self.session is not None:
            self.session.close()
            self.session = None
        if self.machine.qmp is not None:
            self.machine.qmp.close()
            self.machine.qmp = None
        self.machine.host.close_relay()

    def cmd(self, command: str, /, **args):
        """A QMP command; positional-only, so an argument may be called "name"."""
        if self.machine.qmp is None:
            self.machine.connect_qmp(30)
        return self.machine.cmd(command, **args)

    def run(self, command: str, **kw):
        if self.session is None:
            raise RemoteError(f"{self.opts.name}: not connected")
        return self.session.run(command, **kw)

    def screendump(self, name: str) -> bytes:
        """A QMP screendump (PPM), written by QEMU in the lab and fetched as bytes."""
        path = f"{self.dir}/{name}.ppm"
        self.cmd("screendump", filename=path)
        return self.lab.session.read_bytes(path)

    def alive(self) -> bool:
        return self.machine.alive()

    def fetch_logs(self, into: Path | None = None, agent=None) -> None:
        """Copy the guest's console and QEMU log from the lab into the results directory
        (``into``: another one, e.g. a run's in a guest it shares), through the run's host
        agent when given (HostAgent.read_files), else in one exec."""
        files = (("console.log", f"{self.opts.name}-console.log"), ("qemu.log", f"{self.opts.name}.qemu.log"))
        paths = [f"{self.dir}/{n}" for n, _ in files]
        parts = None
        if agent is not None:
            try:
                got = agent.read_files(paths, max_bytes=AGENT_LOG_BYTES)
                # a log past the cap is read whole by the exec: this run's part is its end
                if all(f is None or f[0] <= AGENT_LOG_BYTES for f in got):
                    parts = [None if f is None else f[1] for f in got]
            except Exception as e:
                log.warning("the host agent could not read the logs of %s (%s); by exec", self.opts.name, e)
        if parts is None:
            # one exec for both: an exec in a TCG lab is ~0.2 s
            try:
                _, out = ssh.exec_bytes(self.lab.session, _sized_cat(paths), timeout=60)
            except Exception as e:  # the lab itself may be gone: keep going, say why
                log.warning("could not fetch the logs of %s: %s", self.opts.name, e)
                return
            parts = _sized_parts(out)
        for (name, dest), data in zip(files, parts):
            if data is None:
                log.warning("could not fetch %s of %s", name, self.opts.name)
            else:
                (Path(into or self.workdir) / dest).write_bytes(data)

    def down(self, timeout: float = 15) -> bool:
        """The QEMU machine's ladder (quit over QMP, then SIGTERM, then SIGKILL in the lab);
        logs are fetched after. True when the guest's QEMU is known to be gone (so no KVM
        mapping of its memory is left); False when that could not be confirmed.
        Works when the transport is already gone (an interrupt that closed the lab's SSH
        session, a dead lab): then the guest dies with the lab and nothing here may raise."""
        if self.session is not None:
            _quietly(self.session.close, "guest SSH close")
            self.session = None
        lab_up = self.lab.session is not None and self.lab.session.active()
        gone = self.pid is None
        if self.pid is not None and lab_up:
            _quietly(lambda: self.machine.shutdown(timeout=timeout), f"stopping guest QEMU pid {self.pid}")
            gone = bool(_quietly(lambda: not self.machine.alive(), "checking the guest QEMU is gone"))
            self.fetch_logs()
        else:
            if self.pid is not None:
                log.warning("%s: the lab's SSH session is gone; the guest stops with the lab",
                            self.opts.name)
            _quietly(self.machine.host.close_relay, "guest QMP relay close")
            if self.machine.qmp is not None:
                _quietly(self.machine.qmp.close, "guest QMP close")
                self.machine.qmp = None
        self.pid = None
        return gone

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.down()


# Runs in the lab (python3 -c): the key line from stdin into the guest's key port, sent
# again every half second until the guest's console says it was installed (the init's
# reader reopens the port between lines: a line sent meanwhile is lost).
_KEY_SENDER = r"""
import socket, sys, time
port, console, nonce, limit = sys.argv[1], sys.argv[2], sys.argv[3].encode(), float(sys.argv[4])
line = sys.stdin.buffer.read()
mark = b"VMLAB-KEY-INSTALLED " + nonce + b" reseed="
deadline = time.monotonic() + limit
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
s.connect(port)
with open(console, "rb") as f:
    f.seek(0, 2)
    seen = b""
    while time.monotonic() < deadline:
        s.sendall(line.replace(b" TIME ", b" %d " % time.time(), 1))   # waits in the port until cont
        until = time.monotonic() + 0.5
        while time.monotonic() < until:
            seen += f.read()
            at = seen.find(mark)
            if at >= 0 and b"\n" in seen[at:]:
                rc = seen[at + len(mark):].split(None, 1)[0]
                # the guest's RNG reseeded from the host's bytes (0), or it says why not
                sys.exit(0 if rc == b"0" else "the guest agent's reseed exited %s" % rc.decode())
            # kept: a mark still waiting for its newline, and what may be the start of one
            seen = seen[at:] if at >= 0 else seen[-len(mark):]
            time.sleep(0.02)
sys.exit("no VMLAB-KEY-INSTALLED on the guest's console within %g s" % limit)
"""


def _quietly(fn, what: str):
    """One teardown step: its failure is logged, never raised over the error (or the
    interrupt) that is being cleaned up after. Returns what ``fn`` returned, or None."""
    try:
        return fn()
    except Exception as e:
        log.warning("%s: %s: %s", what, type(e).__name__, e)
        return None
