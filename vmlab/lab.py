"""The lab host: the machine whose kernel is under test (KVM, vmlab-exporter, QEMU).

``NestedLab`` boots it as a VM of this machine from the lab image. The accelerator is
chosen by a real probe: KVM only when a stock kernel actually boots under this machine's
/dev/kvm (a PVM /dev/kvm exists but cannot), else TCG emulating AMD SVM with nested
paging on ONE vCPU (with two, multi-threaded TCG crashed or hung the lab kernel in
measured runs; see DESIGN.md).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path

from . import images, kvm_probe, lab_snapshot, proc, ssh
from .exporter import ATTACH_BIN, HOSTAGENT_FILES, agent_digest, attach_binary, warm_command
from .errors import BootFailure, ConfigError, QemuRefused, RemoteError, UserError, VmlabError, WaitTimeout
from .paths import cache_dir, private_dir, read_json, runtime_dir, set_aside, write_atomic
from .qemu import SKIPPED_INITCALLS, QemuMachine, VMSpec, console_tail, free_port, qemu_version

log = logging.getLogger("vmlab.lab")

TCG_CPU = "EPYC,+svm,+npt"
READY = "VMLAB-LAB-READY"
FIRST_OUTPUT_S = 10   # the accel probe's kernel must print its banner by then
UNSURE_PROBE_TTL_S = 3600


# what a result needs to be reproduced on another day: the kernel package (a release
# string names many builds), its command line and the module parameters it ran with; and
# the kernel release and QEMU the run checks against. One exec and one grep for the
# parameters: under the TCG lab each process costs ~10 ms, and a `cat` per parameter
# (some 90 of them) took 1.1 s of every run.
_STATIC_FACTS = r"""
echo "release=$(uname -r)"
echo "qemu=$(qemu-system-x86_64 --version | head -n1)"
echo "kernel_package=$(dpkg-query -W -f '${Version}' "linux-image-$(uname -r)" 2>/dev/null || echo -)"
"""
_FACT_MODULES = ("vmlab_exporter", "kvm", "kvm_amd")


def _live_facts(modules) -> str:
    """The facts that may change while a lab runs (the host agent's op lab_facts reads
    the same files)."""
    return ('echo "cmdline=$(cat /proc/cmdline)"\n'
            f"grep -H '' {' '.join(f'/sys/module/{m}/parameters/*' for m in modules)} 2>/dev/null\n"
            "true\n")


_LIVE_FACTS = _live_facts(_FACT_MODULES)
# A nested lab's kernel and QEMU are its own for its life, so their words are asked once
# and kept in its /run, and a lab saved in a snapshot keeps them (`qemu-system-x86_64
# --version` and dpkg-query cost 1 s of every run under TCG). A box's QEMU may change
# between runs, and its /run is the user's: asked every time there.
_CACHED = "/run/vmlab-lab-facts"
_NESTED_FACTS = (f"if [ -s {_CACHED} ]; then cat {_CACHED}; else {{ {_STATIC_FACTS} }} > {_CACHED}.$$; "
                 f"cat {_CACHED}.$$; if grep -q -e '=$' -e '=-$' {_CACHED}.$$; then rm -f {_CACHED}.$$; "
                 f"else mv {_CACHED}.$$ {_CACHED}; fi; fi\n" + _LIVE_FACTS)


def lab_facts(lab, agent=None) -> dict:
    """{"release", "qemu", "cmdline", "kernel_package", "module_params": {module: {name: value}}}.
    A nested lab's run asks its host agent (``agent``) for the same text, read in the
    agent's process, once the static part is cached."""
    nested = getattr(lab, "kind", None) == "nested"
    out = None
    if nested and agent is not None:
        try:
            out = agent.request("lab_facts", cache=_CACHED, modules=list(_FACT_MODULES), timeout=30)["text"]
        except (RemoteError, WaitTimeout) as e:   # the script says the same, slower
            log.warning("lab facts from the host agent: %s; running the facts script", e)
    if out is None:
        script = _NESTED_FACTS if nested else _STATIC_FACTS + _LIVE_FACTS
        _, out, _ = lab.run(script, timeout=30, check=False)
    return parse_facts(out)


def parse_facts(out: str) -> dict:
    """The facts script's output (or the host agent's op lab_facts) as lab_facts returns it."""
    facts: dict = {"module_params": {}}
    for line in out.splitlines():
        if line.startswith("/sys/module/"):
            path, _, value = line.partition(":")
            parts = path.split("/")   # ['', 'sys', 'module', MOD, 'parameters', NAME]
            if len(parts) == 6:
                facts["module_params"].setdefault(parts[3], {})[parts[5]] = value
            continue
        key, sep, value = line.partition("=")
        if sep and key in ("release", "qemu", "cmdline", "kernel_package"):
            facts[key] = value
    if "qemu" in facts:
        facts["qemu"] = facts["qemu"].replace("QEMU emulator version ", "")
    return facts


class ResidentNotGone(Exception):
    """The guest saved with a lab's snapshot was to be stopped, and may still run: its
    name, port and directory are not free."""


@dataclass
class LabOptions:
    accel: str = "auto"          # auto | kvm | tcg
    kernel: str = "trixie"       # image kernel suite
    qemu: str = "default"        # the lab's QEMU: default or suite:NAME
    base: str | None = None      # the suite a deb:/tree: kernel is installed over
    append: str = ""             # extra words for the lab kernel's command line
    kind: str = "nested"         # nested: a VM of ours; ssh: the user's test box (box_lab)
    box: dict | None = None      # kind ssh: host, port, user, key, known_hosts
    memory_mb: int = 3072
    boot_timeout: float = 300
    extra_qemu_args: tuple = ()
    hwtrace_plugin: str | None = None  # load the hardware oracle's TCG plugin (vmlab/hwtrace.py)
    accel_why: str = "chosen with --accel"  # said when accel is not auto
    # a guest (GuestOptions, with a key port) booted in a new lab and saved in its snapshot,
    # so that a restore brings the guest too (NestedLab.resident_guest); None: the lab alone
    resident_guest: object | None = None


def boot_id() -> str:
    """This machine's boot: a state file from before a reboot names no live process."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def probe_accel(lab_image: images.Image, progress=print, timeout: float = 40) -> tuple[str, str]:
    """("kvm"|"tcg", reason). Boots the lab kernel with vmlab.probe=1 under -accel kvm; the
    verdict is cached per (QEMU, kernel, host kernel) since a hang costs the full timeout."""
    if not os.path.exists("/dev/kvm"):
        return "tcg", "no /dev/kvm on this machine"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg", "/dev/kvm is not accessible to this user"
    key = hashlib.sha256(f"{qemu_version()}|{lab_image.manifest.get('artifacts', {}).get('vmlinuz')}|"
                         f"{os.uname().release}".encode()).hexdigest()[:16]
    cache = cache_dir() / "accel-probe.json"
    try:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key and time.time() < cached.get("expires", float("inf")):
            return cached["accel"], cached["reason"] + " (cached probe)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass

    def remember(accel: str, reason: str, definite: bool) -> None:
        # KVM's or QEMU's own answer is kept; a deadline missed (a hang, or a busy
        # machine) is kept for an hour, so a hanging /dev/kvm does not cost every command
        rec = {"key": key, "accel": accel, "reason": reason}
        if not definite:
            rec["expires"] = time.time() + UNSURE_PROBE_TTL_S
        write_atomic(cache, json.dumps(rec), 0o644)
    tiny = kvm_probe.probe()
    if not tiny["ok"]:
        accel, reason = "tcg", f"/dev/kvm cannot run a 5-byte VM: {tiny['why']} ({tiny['seconds']}s)"
        remember(accel, reason, bool(tiny.get("definite")))
        return accel, reason
    progress("probing /dev/kvm: booting the lab kernel under -accel kvm ...")
    work = runtime_dir("vmlab-probe-")
    spec = VMSpec(name="kvm-probe", kernel=str(lab_image.artifact("vmlinuz")),
                  initrd=str(lab_image.artifact("initrd.img")),
                  append="console=ttyS0 panic=-1 vmlab.probe=1", memory_mb=512, accel="kvm",
                  cpu="host", console_log=str(work / "console.log"), qmp_socket=str(work / "qmp.sock"),
                  qmp_client=True)
    m = QemuMachine(spec, work)
    try:
        m.launch(timeout=20)
        # A usable KVM has the kernel's banner on the console within a second; one that
        # hangs the vCPU is known by its silence long before the boot's own deadline.
        m.wait_console({"Linux version": "banner"}, FIRST_OUTPUT_S, "the probe kernel's first line")
        m.wait_console({"VMLAB-PROBE-OK": "ok"}, timeout, "the probe kernel reaching userspace")
        accel, reason = "kvm", "a stock kernel booted to userspace under /dev/kvm"
    except (BootFailure, QemuRefused, WaitTimeout) as e:
        accel, reason = "tcg", f"/dev/kvm cannot boot a stock kernel: {getattr(e, 'cause', str(e))[:160]}"
        # a deadline missed may be a busy machine, not the KVM: only QEMU's or the
        # kernel's own words are cached as the verdict
        definite = not isinstance(e, WaitTimeout) and " within " not in reason
    else:
        definite = True
    finally:
        m.shutdown(quick=True)
        shutil.rmtree(work, ignore_errors=True)
    remember(accel, reason, definite)
    return accel, reason


class NestedLab:
    """A lab host VM on this machine. ``up()`` boots it to SSH; ``down()`` stops it.

    Logs (console, QEMU's stderr, command line) go to ``workdir``, the run's results.
    Secrets and sockets (the per-run SSH key, the share, QMP) live in ``rundir``, a private
    directory of vmlab's own that is removed with the lab, never in a directory the user
    named. With ``detach`` the QEMU process outlives vmlab (``vmlab lab up``); then
    ``rundir`` is the state directory and ``attach()`` finds the lab from ``state.json``."""

    kind = "nested"
    share_dir = "/mnt/vmlab"   # the controller's read-only 9p share (lab-setup mounts it)
    hugepages_ledger = None    # the lab is vmlab's own: nothing to give back
    agent_cache = True         # the host agent runs from a copy in the lab's /run (exporter.py)

    def __init__(self, workdir: Path, opts: LabOptions, *, detach: bool = False,
                 rundir: Path | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.own_rundir = rundir is None
        self.reused_from: str | None = None   # the state dir of a `vmlab lab up` lab in reuse
        self.rundir = private_dir(Path(rundir)) if rundir is not None else runtime_dir()
        self.opts = opts
        self.detach = detach
        self.machine: QemuMachine | None = None
        self.session: ssh.SSHSession | None = None
        self.key = self.rundir / "id_ed25519"
        self.accel = opts.accel
        self.accel_reason = ""
        self.image: images.Image | None = None
        self.guest_image: images.Image | None = None
        self.ssh_port: int | None = None
        self.boot_seconds: float | None = None
        self.hwtrace_socket: str | None = None
        self.disk_overlay = self.rundir / "lab-disk.qcow2"   # the root fs's writes (lab_snapshot)
        self.snapshot: dict | None = None    # {"restored"|"saved": path}, or {"none": why}
        self.kernel_release_at_boot: str | None = None
        # the guest saved with the lab's snapshot, frozen (Guest.freeze) until a run takes
        # it (Guest.thaw) or drops it (drop_resident); None when the lab has none
        self.resident_guest = None

    # --- files shared into the lab (read-only 9p): guest image + host agent
    def _prepare_share(self) -> Path:
        share = self.rundir / "share"
        shutil.rmtree(share, ignore_errors=True)
        (share / "guest").mkdir(parents=True)
        if self.guest_image:
            for name in ("vmlinuz", "initramfs.img"):
                src = self.guest_image.artifact(name)
                try:
                    os.link(src, share / "guest" / name)
                except OSError:
                    shutil.copyfile(src, share / "guest" / name)
        for src in HOSTAGENT_FILES:
            shutil.copyfile(src, share / src.name)
        try:
            shutil.copyfile(attach_binary(), share / ATTACH_BIN)
            os.chmod(share / ATTACH_BIN, 0o755)
        except (OSError, VmlabError) as e:
            # only a speed-up: the agent then starts as Python in every run
            log.warning("lab: no vmlab-attach for the lab (%s); the host agent starts without "
                        "its fork server", e)
        os.chmod(share, 0o755)
        return share

    def up(self, lab_image: images.Image, guest_image: images.Image | None, progress=print) -> None:
        self.image, self.guest_image = lab_image, guest_image
        # a kernel QEMU cannot load, or one that loads and does not boot, is the kernel
        # under test (125)
        kernel = str(lab_image.artifact("vmlinuz"))
        if self.accel == "auto":
            self.accel, self.accel_reason = probe_accel(lab_image, progress)
        elif self.accel not in ("kvm", "tcg"):
            raise ConfigError("<command line>", "accel", f"must be auto, kvm or tcg, not {self.accel!r}")
        else:
            self.accel_reason = self.opts.accel_why
        pub = ssh.generate_key(self.key)
        self.ssh_port = free_port()
        tcg = self.accel == "tcg"
        spec = VMSpec(
            name="lab", kernel=kernel, initrd=str(lab_image.artifact("initrd.img")),
            # the user's words last: a later panic= or init= wins over ours
            append=f"console=ttyS0 panic=-1 oops=panic loglevel=6 cryptomgr.notests {SKIPPED_INITCALLS} "
                   f"vmlab.sshkey={pub}"
                   + (f" {self.opts.append}" if self.opts.append else ""),
            memory_mb=self.opts.memory_mb, accel=self.accel,
            cpu=TCG_CPU if tcg else "host", smp=1 if tcg else 2, machine="pc",
            disk=str(self.disk_overlay), disk_overlay=True, ssh_forward=self.ssh_port,
            key_port=str(self.rundir / "lab-key.sock"), vmgenid=True,
            share=str(self._prepare_share()), console_log=str(self.workdir / "lab-console.log"),
            qmp_socket=str(self.rundir / "lab-qmp.sock"),
            # a detached lab outlives this process: QEMU must be the QMP server then
            qmp_client=not self.detach,
            extra=list(self.opts.extra_qemu_args) + self._hwtrace_args())
        not_why = lab_snapshot.enabled(spec, bool(self.opts.hwtrace_plugin), self.opts.extra_qemu_args)
        resident = self.opts.resident_guest if guest_image is not None else None
        snap_key = lab_snapshot.key(spec, lab_image.path, resident=resident, guest_image=guest_image,
                                    agent=agent_digest()) if not_why is None else None
        snap = lab_snapshot.find(lab_image.path, snap_key) if snap_key else None
        self.snapshot = {"none": not_why} if not_why else None
        if snap is not None:
            try:
                self._restore(spec, snap, progress)
                return
            except Exception as e:     # any way a snapshot fails: booting is the answer
                with proc.signals_deferred():
                    self._stop_machine(quick=True)
                self.machine = None
                self.resident_guest = None
                kept = Path(spec.console_log).with_suffix(".snapshot-failed.log")
                if Path(spec.console_log).exists():
                    Path(spec.console_log).rename(kept)
                # a snapshot that failed once fails again: the boot below saves a new one
                lab_snapshot.discard(snap)
                progress(f"the lab's snapshot could not be used ({type(e).__name__}: {e}); "
                         f"booting the lab instead (snapshot {snap}, console {kept})")
                snap = None
            except BaseException:
                # Ctrl-C or SIGTERM (cli.Terminated): nothing of a half-restored lab stays,
                # a detached one's state.json neither
                with proc.signals_deferred():
                    self.down()
                raise
        self._new_overlay(lab_image)
        Path(spec.key_port).unlink(missing_ok=True)
        progress(f"booting lab host ({self.accel}: {self.accel_reason}); console: {spec.console_log}")
        start = time.monotonic()
        self.machine = QemuMachine(spec, self.workdir, detach=self.detach)
        try:
            self.machine.launch(timeout=30)
            if self.detach:
                # recorded at once: a detached QEMU outlives vmlab, so from here on
                # 'vmlab lab down' must be able to find it whatever happens next
                self._save_state()
            self.machine.wait_console({READY: "ready"}, self.opts.boot_timeout, "lab host ready")
            try:
                self.session = ssh.SSHSession.connect("lab", "127.0.0.1", self.ssh_port, self.key,
                                                      timeout=60, alive=self.machine.alive)
            except (RemoteError, WaitTimeout) as e:
                # said ready, then died or never answered (oops=panic after READY): the
                # lab kernel did not come up, like any other boot failure
                raise self.machine.failure(f"no SSH after {READY}: {e}")
            self.boot_seconds = round(time.monotonic() - start, 1)
            self.kernel_release_at_boot = self.kernel_release()
            progress(f"lab host up in {self.boot_seconds}s: kernel {self.kernel_release_at_boot}")
            if snap_key is not None and (resident is None or self._boot_resident(resident, progress)):
                # asked once and kept in the lab, so the snapshot holds them: the static
                # facts, the host agent's copy and bytecode
                try:
                    lab_facts(self)
                    rc, _, err = self.run(warm_command(self), timeout=90, check=False)
                    if rc:
                        log.warning("lab: no host agent fork server (rc %s): %s", rc, err.strip()[-300:])
                except (RemoteError, WaitTimeout) as e:   # only a speed-up: the save decides
                    log.warning("lab: warming the facts and the host agent: %s", e)
                self._save_snapshot(snap_key, progress)
            if self.detach:
                self._save_state()
        except BaseException:
            with proc.signals_deferred():
                self.down()
            raise

    def _boot_resident(self, opts, progress) -> bool:
        """Boot the guest the snapshot is to hold; False (said, nothing saved: the key
        names this guest) when it does not come up."""
        from .guest import Guest
        g = Guest(self, opts, self.workdir)
        try:
            g.up(progress)
        except (BootFailure, RemoteError, WaitTimeout, OSError) as e:
            self.snapshot = {"none": f"the guest to save with the lab did not boot: {e}"}
            progress(f"no snapshot of this lab: the guest to save with it did not boot ({e})")
            g.down()
            return False
        self.resident_guest = g
        return True

    def take_resident(self, want, progress, blocker: str | None = None):
        """The guest saved with this lab's snapshot, thawed and no longer the lab's, when
        it is the guest ``want`` (GuestOptions) describes and nothing (``blocker``) keeps
        the caller from using it; else None, after one line saying why and stopping it
        (ResidentNotGone when that cannot be confirmed). A guest that does not come back
        takes its snapshot with it."""
        from dataclasses import asdict
        from .guest import guest_mismatch
        g = self.resident_guest
        why = guest_mismatch(asdict(g.opts), want) or blocker
        if why is None:
            try:
                g.thaw(progress)
            except Exception as e:
                why = f"it did not come back ({type(e).__name__}: {e})"
                self.discard_snapshot()     # it would not come back from this snapshot again
        if why is None:
            self.resident_guest = None      # the caller's now
            return g
        progress(f"not using the guest saved with the lab: {why}; stopping it")
        if not self.drop_resident():
            raise ResidentNotGone(f"the guest saved with the lab (lab pid {g.pid}) could not be "
                                  f"confirmed stopped")
        return None

    def drop_resident(self) -> bool:
        """Stop the resident guest (a run that cannot use it); True when it is gone. Its
        logs are kept as ``NAME-console.saved-guest.log`` (a guest the run boots next
        takes its name)."""
        g, self.resident_guest = self.resident_guest, None
        if g is None:
            return True
        gone = g.down()
        set_aside(self.workdir, (f"{g.opts.name}-console.log", f"{g.opts.name}.qemu.log"), "saved-guest")
        return gone

    def discard_snapshot(self) -> None:
        """The snapshot this lab was restored from or saved (a guest in it that would not
        come back): the next lab boots and saves a new one."""
        snap = (self.snapshot or {}).get("restored") or (self.snapshot or {}).get("saved")
        if snap:
            lab_snapshot.discard(Path(snap))

    def _new_overlay(self, lab_image: images.Image) -> None:
        """The lab's root fs as a qcow2 overlay of the image's (never written): a snapshot
        keeps it with the memory."""
        self.disk_overlay.unlink(missing_ok=True)
        r = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                            str(lab_image.artifact("rootfs.img")), str(self.disk_overlay)],
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise OSError(f"qemu-img create {self.disk_overlay}: {r.stderr.strip()}")
        os.chmod(self.disk_overlay, 0o600)

    def _restore(self, spec: VMSpec, snap: Path, progress) -> None:
        start = time.monotonic()
        Path(spec.key_port).unlink(missing_ok=True)
        shutil.copyfile(snap / "disk.qcow2", self.disk_overlay)
        os.chmod(self.disk_overlay, 0o600)
        rspec = replace(spec, extra=list(spec.extra) + ["-incoming", "defer"], console_append=True)
        self.machine = QemuMachine(rspec, self.workdir, detach=self.detach)
        self.machine.console_head = (snap / "console.log").read_bytes() + \
            f"\nvmlab: the boot above is the snapshot's; this lab was restored from {snap}\n".encode()
        progress(f"restoring the lab host from its snapshot ({self.accel}: {self.accel_reason}); "
                 f"console: {spec.console_log}")
        self.machine.launch(timeout=30)
        if self.detach:
            self._save_state()
        lab_snapshot.restore_into(self, snap)
        rec = lab_snapshot.resident_record(snap)
        if rec is not None:
            from .guest import Guest, GuestOptions
            self.resident_guest = Guest(self, GuestOptions(**rec["opts"]), self.workdir)
            self.resident_guest.pid = rec["pid"]
        self.boot_seconds = round(time.monotonic() - start, 1)
        self.kernel_release_at_boot = self.kernel_release()
        self.snapshot = {"restored": str(snap)}
        progress(f"lab host restored in {self.boot_seconds}s: kernel {self.kernel_release_at_boot}")
        if self.detach:
            self._save_state()

    def _save_snapshot(self, k: str, progress) -> None:
        try:
            saved = lab_snapshot.save(self, k, progress)
            self.snapshot = {"saved": str(saved)} if saved else {"none": "another vmlab saved it"}
        except lab_snapshot.NoKeyPort as e:
            self.snapshot = {"none": str(e)}
            progress(f"no snapshot of this lab: {e}")
        except Exception as e:
            self.snapshot = {"none": f"saving failed: {e}"}
            log.warning("lab: saving a snapshot failed: %s", e)
            if self.resident_guest is not None and self.session is not None:
                self.drop_resident()    # frozen or not, half-saved: no run may take it
            if self.session is None or not self.machine.alive():
                # the lab is left without its key or its share: it did not come up whole
                raise self.machine.failure(f"saving a snapshot of the lab: {e}")
            progress(f"could not save a snapshot of the lab ({e}); it runs on")

    def _stop_machine(self, timeout: float = 5, quick: bool = False) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None
        if self.machine is not None:
            self.machine.shutdown(timeout=timeout, quick=quick)

    def _hwtrace_args(self) -> list[str]:
        if not self.opts.hwtrace_plugin:
            return []
        if self.accel != "tcg":
            raise ConfigError("<command line>", "accel", "the hardware oracle is a TCG plugin: "
                              f"it cannot run in a {self.accel} lab")
        # in the lab's private runtime directory (0700); the plugin makes the socket 0600
        self.hwtrace_socket = str(self.rundir / "hwtrace.sock")
        return ["-plugin", f"{self.opts.hwtrace_plugin},sock={self.hwtrace_socket}"]

    # --- persistence for `vmlab lab up|status|down`
    def _save_state(self) -> None:
        st = {"version": 2, "pid": self.machine.pid, "start_time": self.machine.start_time,
              "boot_id": boot_id(),
              "ssh_port": self.ssh_port, "accel": self.accel,
              "accel_reason": self.accel_reason, "qmp": self.machine.spec.qmp_socket,
              "console": self.machine.spec.console_log, "boot_seconds": self.boot_seconds,
              "snapshot": self.snapshot, "image": str(self.image.path) if self.image else None,
              "guest_image": str(self.guest_image.path) if self.guest_image else None,
              "shape": self.shape()}
        write_atomic(self.workdir / "state.json", json.dumps(st, indent=2))

    def shape(self) -> dict:
        """What shaped this lab, as another command compares it before it reuses the lab
        (``vmlab.reuse``): the options it booted with, the accelerator it got, its images,
        the host agent it was given (copied into its share at boot)."""
        o = self.opts
        return {"kernel": o.kernel, "qemu": o.qemu, "base": o.base, "append": o.append,
                "agent": agent_digest(),
                "memory_mb": o.memory_mb, "extra_qemu_args": list(o.extra_qemu_args),
                "hwtrace_plugin": o.hwtrace_plugin, "accel": self.accel,
                "image": str(self.image.path) if self.image else None,
                "guest_image": str(self.guest_image.path) if self.guest_image else None}

    @staticmethod
    def read_state(workdir: Path) -> tuple[dict | None, str]:
        """(state, why-not): None with a one-line reason when there is no usable lab."""
        st_path = Path(workdir) / "state.json"
        if not st_path.exists():
            return None, f"no lab is up (no {st_path}); start one with 'vmlab lab up'"
        st = read_json(st_path)
        need = ("pid", "start_time", "ssh_port", "accel", "qmp", "console")
        if st is None or any(k not in st for k in need) or not isinstance(st.get("pid"), int):
            return None, (f"no lab is up: {st_path} is corrupt or from an older vmlab; "
                          f"remove it (rm {st_path})")
        if st.get("boot_id") not in (None, boot_id()) or \
                proc.pid_start_time(st["pid"]) != st["start_time"]:
            return None, (f"no lab is up: the lab recorded in {st_path} is no longer running "
                          f"(console log: {st['console']})")
        return st, ""

    @classmethod
    def attach(cls, workdir: Path, *, qmp: bool = False) -> "NestedLab":
        """The running lab of ``workdir``: SSH always; QMP only when asked (QEMU serves one
        QMP client at a time, so a command that does not need it must not hold it)."""
        st, why = cls.read_state(workdir)
        if st is None:
            raise UserError(why)
        lab = cls(workdir, LabOptions(accel=st["accel"]), rundir=workdir)
        lab.accel_reason, lab.ssh_port, lab.boot_seconds = st.get("accel_reason", ""), st["ssh_port"], st.get("boot_seconds")
        for attr, kind in (("image", "lab"), ("guest_image", "guest")):
            p = st.get(attr)
            m = read_json(Path(p) / "manifest.json") if p else None
            if m is not None:
                setattr(lab, attr, images.Image(kind, Path(p), m))
        lab.machine = cls._recorded_machine(workdir, st)
        if qmp:
            lab.machine.connect_qmp(timeout=10)
        lab.session = ssh.SSHSession.connect("lab", "127.0.0.1", lab.ssh_port, lab.key, timeout=30,
                                             alive=lab.machine.alive)
        return lab

    @staticmethod
    def _recorded_machine(workdir: Path, st: dict) -> QemuMachine:
        spec = VMSpec(name="lab", kernel="", initrd="", append="", console_log=st["console"],
                      qmp_socket=st["qmp"])
        m = QemuMachine(spec, Path(workdir))
        m.pid, m.start_time = st["pid"], st["start_time"]
        return m

    @classmethod
    def stop_recorded(cls, workdir: Path, progress=print) -> bool:
        """Stop the lab recorded in ``workdir/state.json`` from that file alone (pid and
        start time, QMP quit with a timeout, SIGTERM, SIGKILL): no SSH, so a hung lab
        stops too. Returns False (after saying why) when there was no lab to stop."""
        st, why = cls.read_state(workdir)
        if st is not None:
            m = cls._recorded_machine(workdir, st)
            try:
                m.connect_qmp(timeout=5)
            except Exception as e:  # a wedged monitor: the signals decide
                log.info("lab QMP unreachable (%s); stopping by signal", e)
            m.shutdown(timeout=10)
        else:
            progress(why)
        for name in ("state.json", "guest.json"):
            (Path(workdir) / name).unlink(missing_ok=True)
        return st is not None

    def ssh(self) -> ssh.SSHSession:
        return self.session

    def alive(self) -> bool:
        """Its QEMU runs and its SSH session is up (a lab that can still take commands)."""
        return (self.machine is not None and self.machine.alive() and self.session is not None
                and self.session.active())

    def run(self, command: str, **kw):
        return self.session.run(command, **kw)

    def kernel_release(self) -> str:
        return self.run("uname -r", timeout=30)[1].strip()

    def down(self) -> None:
        try:
            self._stop_machine(timeout=10)
        finally:
            if self.detach or not self.own_rundir:
                (self.workdir / "state.json").unlink(missing_ok=True)
            if self.own_rundir:
                # the per-run key and share are worthless once the lab is gone
                shutil.rmtree(self.rundir, ignore_errors=True)

    def console_tail(self, n: int = 20) -> str:
        return console_tail(Path(self.machine.spec.console_log), n) if self.machine else ""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.down()
