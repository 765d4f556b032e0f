"""`vmlab run`: lab up -> guest up with the buffer as ivshmem BAR2 -> baseline read ->
for each move: move -> guest read -> per-page verdict -> summary, results directory.

The results directory is written before anything boots (config copy, reproduce.sh,
results.json with status "running") and completed whatever happens, so a crashed or
interrupted run still explains itself.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from xml.sax.saxutils import escape

from . import config as cfgmod
from . import caching, hwtrace, kvm_evidence, lab_snapshot, oracle, proc, report, reuse
from .errors import CouldNotTest, NotApplicable, RemoteError, UserError, WaitTimeout
from .exporter import AgentRequestFailed, HostAgent
from .guest import GuestOptions
from .guest_agent import GuestAgent
from .hotplug import HotPlug
from .qemu import qemu_version
from .paths import repo_root
from .health import compare_states, kernel_health, kernel_state, parse_kernel_state
from .run_dir import cli_passthrough, results_dir, table, write_junit, write_reproducer
from .ssh import ChannelReader
from .watch import Watch
from .lab import ResidentNotGone, lab_facts
from .stack import GUEST_BOOT_ATTEMPTS, LAB_BOOT_ATTEMPTS, Stack, lab_options
from .versions import qemu_upstream_version

log = logging.getLogger("vmlab.experiment")
_PLUG_SEQ = itertools.count(1)
DEFAULT_CONFIG = repo_root() / "configs" / "experiments" / "default.yaml"
IVSHMEM_DIR = "/run/vmlab/ivshmem"   # one socket per guest name
VHOST_USER_DIR = "/run/vmlab/vhost-user"
# transport virtio-shm: QEMU's vhost-user-test-device-pci with a VIRTIO id that no Linux
# driver claims (21, "signal distribution"; QEMU asserts the id has a name), so the guest
# agent does the VIRTIO handshake itself. Its shared memory region is BAR 4.
VIRTIO_SHM_ID = 21
VIRTIO_SHM_PCI = f"1af4:{0x1040 + VIRTIO_SHM_ID:04x}"
VIRTIO_SHM_BAR = 4
MIN_SHM_QEMU = (11, 1)   # vhost-user SHMEM_MAP and GET_SHMEM_CONFIG
AGENT = "vmlab-guest-agent"
TAG_BASE = 0x766D6C6100000000  # "vmla" << 32
# Measured 2026-11-26 on lab kernel 7.3 (not on 6.1/6.12, which do not check): an NPF on
# the guest's own store to the BAR, exit info 0x400/error code 7, stopped as "during event
# delivery". QEMU's TCG SVM marks EVENTINJ valid while it delivers an event and copies it
# to EXITINTINFO at #VMEXIT (target/i386/tcg/seg_helper.c do_interrupt_all,
# sysemu/svm_helper.c do_vmexit), so an exit TCG takes amid a delivery carries it.
TCG_VECTORING_NOTE = "lab artifact, not a verdict: see vmlab/experiment.py TCG_VECTORING_NOTE"


class VMMDied(Exception):
    pass


def guest_options(exp: cfgmod.Experiment, o: dict, name: str = "guest",
                  port: int = GuestOptions.ssh_port) -> tuple[GuestOptions, str]:
    """The guest this experiment boots, with its buffer's device on the command line, and
    the buffer's socket in the lab."""
    if exp.raw.get("transport", "ivshmem") == "virtio-shm":
        sock = f"{VHOST_USER_DIR}/{name}.sock"
        device = ["-chardev", f"socket,path={sock},id=vu0",
                  "-device", f"vhost-user-test-device-pci,chardev=vu0,virtio-id={VIRTIO_SHM_ID},num_vqs=1"]
    else:
        sock = f"{IVSHMEM_DIR}/{name}.sock"
        device = ["-chardev", f"socket,path={sock},id=ivs0",
                  "-device", "ivshmem-doorbell,chardev=ivs0,vectors=1"]
    return GuestOptions(name=name, ssh_port=port,
                        memory_mb=o["guest_memory_mb"], gpu=o["guest_gpu"],
                        boot_timeout=o["guest_boot_timeout"],
                        align_mappings=o.get("guest_align", "4K"),
                        # a started vhost-user device hands the back-end the guest's RAM
                        shared_ram=exp.raw.get("transport") == "virtio-shm",
                        extra_qemu_args=device), sock


def resident_options(gopts: GuestOptions) -> GuestOptions:
    """The guest a lab snapshot holds for a run that would boot ``gopts``: the same guest,
    its buffer left for hot-plug (root ports instead), with a key port for its next key."""
    from .hotplug import root_port_args
    return dataclasses.replace(gopts, extra_qemu_args=root_port_args(), key_port=True)


VMM_TICK = 0.5    # seconds between VMM checks while the guest works (Run._guest_exec)


class _GuestKernelState:
    """The guest's taint mask and dmesg from its agent (``kernel-state``, printed as the
    guest's dmesg prints it) through the run's guest path: its VMM checks, and an exec
    when the agent's channel is gone (health.kernel_state falls back to its own exec)."""

    def __init__(self, run: "Run"):
        self.run = run

    def kernel_state(self) -> dict:
        rc, out, err = self.run._guest_exec(f"{AGENT} kernel-state", 60)
        if rc != 0:
            raise RemoteError(f"guest agent kernel-state exited {rc}: {err.strip()[-200:]}")
        return parse_kernel_state(out)


def hotplug_blocker(exp: cfgmod.Experiment, o: dict) -> str | None:
    """Why this experiment's buffer cannot be hot-plugged into a running guest, or None."""
    from .hotplug import HOTPLUG_MAX_BAR
    if exp.raw.get("transport", "ivshmem") != "ivshmem":
        return "its buffer travels over a vhost-user device that boots with the guest"
    if exp.size > HOTPLUG_MAX_BAR:    # the buffer is ivshmem's BAR 2 (config checks: a power of 2)
        return (f"its BAR ({exp.size >> 20} MiB) is larger than a hot-plugged BAR can be "
                f"({HOTPLUG_MAX_BAR >> 20} MiB: half a root port's reserved window, vmlab/hotplug.py)")
    if exp.raw.get("gpu_roundtrip"):
        return "it drives the guest's virtio-gpu"
    if any(mv.get("inject") == "kill-vmm" for mv in exp.raw.get("moves") or []):
        return "it kills the guest's QEMU"
    if (exp.raw.get("exporter") or {}).get("alloc") == "HUGE_PMD" or o.get("guest_align") == "2M":
        # whether KVM can map 2 MiB depends on where the BAR lands, and a hot-plugged BAR
        # lands in a root port's window, not where the boot-time device would
        return "its verdict depends on where the BAR lands (2 MiB alignment), which hot-plug changes"
    return None


class Run:
    def __init__(self, exp: cfgmod.Experiment, opts: dict, outdir: Path, progress, *,
                 shared_lab=None, shared_guest=None, stop_guest_in_doubt: bool = False):
        """``shared_lab``: run in this lab, which is up and stays up (``vmlab matrix``);
        the run boots and stops only its guest. ``shared_guest``: run in this guest of
        that lab (``vmlab guest up``'s, reuse.persistent_guest), which stays up: the
        buffer is hot-plugged into it and unplugged at the end. ``stop_guest_in_doubt``: the
        caller lets this run stop that guest when its device cannot be unplugged (a VMM
        fault stopped the guest), so the buffer's quarantine can be freed (``vmlab matrix``;
        the guest of ``vmlab guest up`` is the user's and stays)."""
        self.exp, self.out, self.progress = exp, outdir, progress
        self.shared_lab = shared_lab
        self.shared_guest = shared_guest
        self.stop_guest_in_doubt = stop_guest_in_doubt
        self.plug: HotPlug | None = None           # the buffer's device in a shared guest
        self.qemu_log_from = 0                     # where this run's part of qemu.log starts
        self.result: dict = {"experiment": exp.name, "config": exp.raw, "status": "running",
                             "started": datetime.now(timezone.utc).isoformat(), "moves": [],
                             "passed": False}
        self.opts = opts
        self.result["options"] = opts
        self.stack: Stack | None = None
        self.agent: HostAgent | None = None
        self.buf: dict = {}
        self.watch: Watch | None = None
        self.watch_tried = False     # a watcher may run in the guest (Run.unplug)
        self.moves_plan: list[dict] = []
        self.baseline_expect: list[str] = ["REFAULTED"]
        self.health_start: dict = {}
        self.health_end: dict = {}        # what check_health read (Run.judge_teardown)
        self.aborted: BaseException | None = None   # what cut the run short, if anything
        self.injected_kill = False
        self.mapping = opts["guest_mapping"]
        self.transport = exp.raw.get("transport", "ivshmem")
        self.remap = exp.raw.get("vmm_on_move", "none") == "remap"
        # how the guest agent finds the buffer: ivshmem's BAR 2 (its default) or the region
        self.dev_args = (f" --pci-id {VIRTIO_SHM_PCI} --bar {VIRTIO_SHM_BAR}"
                         if self.transport == "virtio-shm" else "")
        self.hw: hwtrace.HwTrace | None = None    # the hardware oracle, when asked for
        self.hw_moved_at: int | None = None        # time.monotonic_ns() when the move returned
        self.gagent: GuestAgent | None = None      # the guest agent's `serve` process
        self.bar2_gpa: int | None = None           # where the guest sees the buffer
        self.ktrace = False                        # KVM's tracepoints recorded per move
        # (the last judged move's record, the generation below which its read let the
        # quarantine go): sent with the next move's requests, or after the last move
        self.pending_release: tuple[dict, int] | None = None
        self.resident_taken = False                # the guest came with the lab's snapshot
        self._phase_t = time.monotonic()           # where a run's seconds go: mark()

    def mark(self, phase: str) -> None:
        """The seconds since the last mark, as ``phase_seconds[phase]`` (bench profile)."""
        now = time.monotonic()
        ph = self.result.setdefault("phase_seconds", {})
        ph[phase] = round(ph.get(phase, 0) + now - self._phase_t, 3)
        self._phase_t = now

    # --- helpers ------------------------------------------------------------------------
    def save(self) -> None:
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(self.result, indent=2, sort_keys=True, default=str) + "\n")
        tmp.rename(self.out / "results.json")

    def guest_agent(self, cmd: str, timeout: float = 120) -> dict:
        """Run the guest agent; returns its JSON. Raises VMMDied when the guest's QEMU
        died or stopped, so the caller records VMM_FAULT instead of hanging."""
        try:
            rc, out, err = self._guest_exec(f"{AGENT} {cmd}", timeout)
        except (WaitTimeout, OSError, EOFError, RemoteError) as e:
            self.check_vmm()
            raise RemoteError(f"guest agent '{cmd}' did not answer: {e}")
        if rc == 3:
            return {"guest_fault": json.loads(out or "{}"), "stderr": err.strip()}
        if rc != 0:
            self.check_vmm()
            raise RemoteError(f"guest agent '{cmd}' exited {rc}: {err.strip() or out.strip()}")
        return json.loads(out)

    def _guest_exec(self, command: str, timeout: float) -> tuple[int, str, str]:
        """Run in the guest while watching its VMM: a vCPU stopped by KVM_RUN failing
        would otherwise look like a slow guest until the timeout. Agent commands go to
        the run's one agent process (one round trip each); anything else is an exec."""
        # a QMP query-status every half second: a stopped vCPU (a VMM fault, often the
        # verdict) is found within it, where the guest would never answer (a stopped VM
        # runs no guest code, so no answer means no check missed: a check before each
        # command cost a QMP round trip, ~45 ms while the guest reads). An agent whose
        # channel an earlier failure closed leaves its commands to an exec each.
        if self.gagent is not None and self.gagent.chan is not None and command.startswith(AGENT + " "):
            return self.gagent.run(command[len(AGENT) + 1:], timeout, on_tick=self.check_vmm, tick=VMM_TICK)
        chan = self.stack.guest.session.open_exec(command)
        try:
            chan.shutdown_write()
            rd = ChannelReader(chan, f"guest: {command[:60]}")
            rd.read_until_exit(time.monotonic() + timeout, on_tick=self.check_vmm, tick=VMM_TICK)
        finally:
            chan.close()
        return rd.rc, rd.out.decode(errors="replace"), rd.err.decode(errors="replace")

    def check_vmm(self) -> None:
        g = self.stack.guest
        # a QEMU that answers QMP is alive: the process check (an exec in the lab) is
        # only needed when it does not
        try:
            status, alive = g.cmd("query-status").get("status"), True
        except Exception as e:  # a wedged QMP is itself a VMM problem...
            status = f"qmp-error: {e}"
            time.sleep(1.0)      # ...unless QEMU is just dying: then say that
            alive = g.alive()
        if not alive or status in ("internal-error", "shutdown", "guest-panicked") or \
                (status and status.startswith("qmp-error")):
            _, qlog, _ = self.stack.lab.run(
                # this run's part of the log only: a shared guest's QEMU also wrote for others
                f"tail -c +{self.qemu_log_from + 1} {g.dir}/qemu.log > {g.dir}/qemu.log.run{os.getpid()}; "
                f"grep -i -m 3 -e 'error' -e 'failed' {g.dir}/qemu.log.run{os.getpid()}; "
                f"tail -n 1 {g.dir}/qemu.log.run{os.getpid()}; rm -f {g.dir}/qemu.log.run{os.getpid()}",
                timeout=30, check=False)
            words = [ln for ln in qlog.splitlines() if ln.strip()]
            last = words[0] if words else ""
            what = f"guest QEMU {'exited' if not alive else 'stopped: ' + str(status)}; last words: {last.strip()}"
            # VMM_FAULT is a verdict, so it needs evidence: KVM_RUN failing (internal-error,
            # or QEMU's own words), a guest panic, or the kill this experiment injected. A
            # QEMU that died silently (OOM killer) or a wedged monitor is infrastructure.
            said = any(w in qlog.lower() for w in ("kvm run failed", "kvm_run", "error", "failed"))
            if "Suberror: 3" in qlog and self.stack.lab.accel == "tcg" and not self.injected_kill:
                raise CouldNotTest(f"{what}: KVM_INTERNAL_ERROR_DELIVERY_EV, KVM refusing to emulate "
                                   f"during event delivery, which a TCG lab's emulated SVM reports "
                                   f"where hardware would not ({TCG_VECTORING_NOTE})")
            if status in ("internal-error", "guest-panicked") or self.injected_kill or said:
                raise VMMDied(what)
            raise RemoteError(f"{what} (no KVM error and no injected kill: not a VMM fault verdict)")

    def take_resident(self, lab, gopts: GuestOptions) -> None:
        """Run in the guest that came with the lab's snapshot (hot-plugging the buffer, as
        in a shared guest), when it is the guest this run would boot; else stop it and
        boot one. A guest that does not come back is stopped too, and its snapshot goes."""
        try:
            g = lab.take_resident(gopts, self.progress, blocker=hotplug_blocker(self.exp, self.opts))
        except ResidentNotGone as e:
            raise CouldNotTest(str(e))
        if g is None:
            return                          # the run boots its own
        self.resident_taken = True
        self.shared_guest = self.stack.shared_guest = g
        self.stop_guest_in_doubt = True     # it is this run's, gone with its lab anyway
        self.plug_name = f"run{os.getpid()}n{next(_PLUG_SEQ)}"
        self.buffer_sock = f"{IVSHMEM_DIR}/{g.opts.name}-{self.plug_name}.sock"

    # --- phases ----------------------------------------------------------------------------
    def run(self) -> int:
        exp_cfg = self.exp.section("exporter")
        o = self.opts
        size = self.exp.size
        if self.shared_guest is not None:
            # a guest other runs use after us: a socket of this run's own, a device by hot-plug
            gopts = self.shared_guest.opts
            # QMP ids and a socket of this run's own: a guest keeps an id until QEMU
            # finalizes the device, and one process runs many cells in it (the matrix)
            self.plug_name = f"run{os.getpid()}n{next(_PLUG_SEQ)}"
            self.buffer_sock = f"{IVSHMEM_DIR}/{gopts.name}-{self.plug_name}.sock"
        else:
            name, port = "guest", GuestOptions.ssh_port
            if self.shared_lab is not None and self.shared_lab.reused_from:
                # a lab other commands may share: a guest name, port and socket of our own
                name, port = reuse.guest_identity(self.shared_lab)
            gopts, self.buffer_sock = guest_options(self.exp, o, name, port)
        plugin = None
        if "hw" in o.get("oracle", ()):
            plugin = str(hwtrace.plugin_path(self.progress))
            if o["sources"].get("accel") == "oracle hw":
                self.progress("hardware oracle: the lab runs under TCG (the oracle is a TCG plugin "
                              "in the lab's QEMU)")
            self.result["hw_oracle"] = {"plugin": plugin, "qemu": hwtrace.qemu_source_version()[1],
                                        "guest_map_va": hex(hwtrace.GUEST_MAP_VA)}
        lab_opts = lab_options(o, hwtrace_plugin=plugin)
        if self.shared_lab is None and self.shared_guest is None and \
                hotplug_blocker(self.exp, o) is None:
            # the lab's snapshot may then hold a guest this run takes by hot-plug
            lab_opts = dataclasses.replace(lab_opts, resident_guest=resident_options(gopts))
        self.stack = Stack(self.out, self.progress, lab_opts, gopts,
                           guest_kernel=o["guest_kernel"], build=not o["no_build"],
                           lab_boot_attempts=o.get("lab_boot_attempts", LAB_BOOT_ATTEMPTS),
                           # the vhost-user back-end serves one connection: no second boot
                           guest_boot_attempts=1 if self.transport == "virtio-shm" else
                           o.get("guest_boot_attempts", GUEST_BOOT_ATTEMPTS),
                           shared_lab=self.shared_lab, shared_guest=self.shared_guest)
        try:
            shm_checked = False
            if self.transport == "virtio-shm" and self.shared_lab is None:
                # refused before anything boots where the lab image says which QEMU it
                # carries (not a box's, not a build directory's: known once it answers)
                image_qemu = self.stack.lab_qemu_version()
                if image_qemu is not None:
                    self.require_shm_qemu(image_qemu, "the lab image's QEMU")
                    shm_checked = True
            lab = self.stack.up_lab()
            self.mark("lab")
            if self.shared_lab is None and getattr(lab, "resident_guest", None) is not None:
                self.take_resident(lab, gopts)     # a shared lab's is its owner's (CellGuest)
                self.mark("guest")
            if plugin:
                self.hw = hwtrace.HwTrace(lab.hwtrace_socket)
                self.result["hw_oracle"]["plugin_hello"] = self.hw.connect()
                self.progress("hardware oracle: the TCG plugin in the lab's QEMU answers")
            self.agent = HostAgent(lab, self.out / "hostagent.log")   # the teardown closes it
            # the lab's facts from the agent: an exec of the facts script cost the TCG lab
            # 0.2-0.3 s, more than the agent's start, beside which it used to run
            facts = lab_facts(lab, self.agent)
            release = facts.pop("release", None) or lab.kernel_release()
            self.result["lab"] = {"kernel": release, "accel": lab.accel,
                                  "accel_reason": lab.accel_reason, "boot_seconds": lab.boot_seconds,
                                  "reused_from": lab.reused_from,
                                  "snapshot": getattr(lab, "snapshot", None)}
            # which VMMs: the lab's QEMU (runs the guest under KVM) and the one running the lab
            self.result["lab"]["qemu"] = facts.pop("qemu", None)
            self.result["lab"]["qemu_source"] = o.get("qemu", "default")
            img = self.stack.lab_image or getattr(lab, "image", None)
            self.result["lab"]["kernel_source"] = (img.manifest.get("kernel_source") if img else None) \
                or ({"form": "box", "spec": f"the running kernel of {lab.name}"} if lab.kind in ("ssh", "local")
                    else {"spec": o["kernel"], "form": "suite"})
            lacks = (self.result["lab"]["kernel_source"] or {}).get("config_missing_optional")
            if lacks:
                self.progress(f"the lab kernel's .config lacks {', '.join(lacks)}: experiments "
                              f"that need them are not applicable on it")
            if o.get("lab_append"):
                self.result["lab"]["append"] = o["lab_append"]
            self.result["lab"]["outer_qemu"] = qemu_version() if lab.kind == "nested" else None
            self.result["lab"]["kind"] = lab.kind
            self.result["lab"].update(facts)
            if self.transport == "virtio-shm" and not shm_checked:
                self.require_shm_qemu(self.result["lab"]["qemu"], "the lab's QEMU",
                                      matrix=self.shared_lab is not None and not self.shared_lab.reused_from)
            why_not = self.exp.not_applicable_on(release)
            if why_not:
                raise NotApplicable(why_not)
            # which expectation applies is decided by the kernel that really booted
            self.moves_plan = self.exp.expectations_for(release)
            self.baseline_expect = self.exp.baseline_expect_for(release)
            self.save()
            self.mark("lab_facts")
            self.result["lab"]["agent"] = self.agent.request("hello")
            self.health_start["lab"] = kernel_state(lab, self.agent)
            self.check_applicable(self.result["lab"]["agent"], release)
            create = {"kind": exp_cfg["kind"], "size": size}
            if exp_cfg["kind"] == "vmlab":
                create.update(caching=exp_cfg.get("caching", "WB"), alloc=exp_cfg.get("alloc", "ORDER0"),
                              fault=exp_cfg.get("fault", "read-write"))
            if exp_cfg["kind"] == "udmabuf":
                create["backing"] = exp_cfg.get("backing", "shmem")
            try:
                self.buf = self.agent.request("create", **create)
            except AgentRequestFailed as e:
                # a lab kernel that cannot make this kind of buffer at all: not applicable
                if exp_cfg["kind"] == "udmabuf" and create["backing"] != "shmem" and \
                        e.errname in ("ENOTSUP", "EOPNOTSUPP", "EINVAL"):
                    raise NotApplicable(f"lab kernel {release}: {e.resp.get('error')}")
                if create.get("alloc") == "HUGE_PMD" and e.errname in ("ENOTSUP", "EOPNOTSUPP"):
                    raise NotApplicable(f"lab kernel {release}: the exporter maps huge PFNMAP PMDs "
                                        f"only from 6.12 (\"mm: Support huge pfnmaps\": before it "
                                        f"GUP-fast takes such a PMD for a THP)")
                raise
            self.progress(f"{exp_cfg['kind']} buffer {self.buf['id']:#x} ({size} bytes) created; "
                          f"exported over {self.transport}")
            if self.transport == "virtio-shm":
                self.agent.request("serve_vhost_user", buf=self.buf["buf"], socket=self.buffer_sock)
            else:
                self.agent.request("serve_ivshmem", buf=self.buf["buf"], socket=self.buffer_sock)
            self.mark("buffer")
            guest = self.stack.up_guest()
            self.gagent = GuestAgent(guest.session)
            if self.transport == "virtio-shm":
                self.result["vmm"] = self.map_shared_memory()
            # with the kernel, a read of the guest's RNG and its clock's distance from ours:
            # guests restored from one snapshot must differ in the one, agree in the other
            words = guest.run("uname -r; cat /proc/sys/kernel/random/uuid; date +%s",
                              timeout=30)[1].split()
            self.result["guest"] = {"name": guest.opts.name, "kernel": words[0] if words else "?",
                                    "random_uuid": words[1] if len(words) > 1 else None,
                                    "clock_minus_controller_s": int(words[2]) - int(time.time())
                                    if len(words) > 2 and words[2].isdigit() else None,
                                    "query_kvm": guest.cmd("query-kvm"),
                                    "boot_seconds": guest.boot_seconds}
            self.mark("guest")
            # before the hot-plug: what the guest's kernel says about the buffer's device
            # arriving (its BAR's assignment, the probe) is the run's, as its leaving is
            self.health_start["guest"] = kernel_state(guest, _GuestKernelState(self))
            if self.shared_guest is not None:
                t0 = time.monotonic()
                try:
                    self.qemu_log_from = self.qemu_log_size() or 0
                except Exception as e:   # then check_vmm reads the whole log, as before
                    log.warning("qemu.log size: %s", e)
                self.plug = HotPlug(guest, self.buffer_sock, self.plug_name)
                self.plug.plug()
                self.dev_args = f" --device {self.plug.bdf}"
                self.result["guest"].update(reused_from=guest.reused_from,
                                            # restored with the lab, or booted and saved with it
                                            with_lab_snapshot=self.resident_taken,
                                            hotplug={"port": self.plug.port, "bdf": self.plug.bdf,
                                                     "seconds": round(time.monotonic() - t0, 3)})
                self.progress(f"buffer hot-plugged at {self.plug.bdf} in {time.monotonic() - t0:.1f}s")
            self.mark("hotplug")
            self.check_guest_can_store()
            if exp_cfg["kind"] == "vmlab":
                self.result["vmm_mapping"] = self.vmm_mapping()
            self.result["caching_chain"] = self.caching_chain()
            self.start_kvm_trace()
            self.save()
            self.mark("caching_chain")
            if self.exp.raw.get("gpu_roundtrip"):
                self.gpu_roundtrip(gopts.gpu)
            try:
                self.baseline()
            except VMMDied as e:
                self.progress(f"VMM fault during the baseline read: {e}")
                self.result["vmm_fault"] = str(e)
                self.result["baseline"] = {"verdict": "VMM_FAULT", "detail": str(e),
                                           "expected": self.baseline_expect,
                                           "passed": "VMM_FAULT" in self.baseline_expect}
            self.mark("baseline")
            self.moves()
            self.mark("moves")
        except BaseException as e:
            if not isinstance(e, VMMDied):
                self.aborted = e
                raise
            # the VMM died before the baseline read finished (e.g. in the caching chain's
            # first touch of the BAR): that is the baseline's verdict, and no move runs
            self.progress(f"VMM fault: {e}")
            self.result["vmm_fault"] = str(e)
            if "baseline" not in self.result:
                self.result["baseline"] = {"verdict": "VMM_FAULT", "detail": str(e),
                                           "expected": self.baseline_expect,
                                           "passed": "VMM_FAULT" in self.baseline_expect}
                self.moves()
        finally:
            with proc.signals_deferred():
                self.finish()
        return 0 if self.result["passed"] else 1

    def require_shm_qemu(self, version: str | None, what: str, *, matrix: bool = False) -> None:
        """transport virtio-shm needs QEMU's vhost-user SHMEM_MAP (11.1): a user error
        before boot for `vmlab run`, a cell that does not apply in a matrix."""
        have = qemu_upstream_version(version)
        if have is not None and have >= MIN_SHM_QEMU:
            return
        why = (f"transport: virtio-shm needs QEMU >= {'.'.join(map(str, MIN_SHM_QEMU))} "
               f"(vhost-user SHMEM_MAP); {what} is {version or 'unknown'} "
               f"(e.g. --kernel trixie-backports, or --qemu suite:trixie-backports)")
        if matrix:
            raise NotApplicable(why)
        raise UserError(f"{self.exp.path}: {why}")

    def map_shared_memory(self) -> dict:
        """Start the guest's VIRTIO device (the guest agent does the handshake no driver
        does) and have the back-end map the buffer into its region: the VMM's map of a
        host-visible blob. QEMU's memslot changes are traced from here on (its
        kvm_set_user_memory events, in the guest's qemu.log), the evidence of a remap."""
        g = self.stack.guest
        g.cmd("trace-event-set-state", name="kvm_set_user_memory", enable=True)
        start = self.guest_agent(f"virtio-start --pci-id {VIRTIO_SHM_PCI} --bar {VIRTIO_SHM_BAR}")
        log_at = self.qemu_log_size()
        try:
            mapped = self.agent.request("vhost_map", buf=self.buf["buf"], wait_s=30, timeout=60)
        except AgentRequestFailed as e:
            raise RemoteError(f"the vhost-user back-end could not map the buffer: {e}")
        m = self.guest_agent(f"map --caching {self.mapping}{self.dev_args}")   # where the BAR is
        if m.get("bar2_phys"):
            self.bar2_gpa = int(str(m["bar2_phys"]), 16)
        mapped["memslot_seen_s"] = self.wait_memslot(log_at, need="present")
        self.progress(f"virtio-shm: device {start.get('bdf')} started by the guest agent; buffer "
                      f"mapped into its shared memory region (BAR {VIRTIO_SHM_BAR}) in "
                      f"{mapped['map_s']:.3f}s; on a move the VMM does "
                      f"{'SHMEM_UNMAP/SHMEM_MAP' if self.remap else 'nothing (MMU notifier only)'}")
        return {"transport": "virtio-shm", "on_move": "remap" if self.remap else "none",
                "virtio_id": VIRTIO_SHM_ID, "pci_id": VIRTIO_SHM_PCI, "bar": VIRTIO_SHM_BAR,
                "guest_start": start, "backend": mapped["state"],
                "memslot_seen_s": mapped["memslot_seen_s"]}

    def qemu_log_size(self) -> int | None:
        path = f"{self.stack.guest.dir}/qemu.log"
        if self.agent is not None:
            f = self.agent.read_files([path], max_bytes=0)[0]
            return None if f is None else f[0]
        _, out, _ = self.stack.lab.run(f"stat -c %s {path}", timeout=20, check=False)
        return int(out) if out.strip().isdigit() else None

    def wait_memslot(self, since: int | None, timeout: float = 10, need: str = "recreated") -> float | None:
        """Seconds until QEMU's log shows the region's memslot whole again (``need``:
        "recreated" after a remap, "present" after the first map), or None. QEMU acks a
        SHMEM_MAP before it commits the new memory map, so a read right after the ack
        could meet the unmap window: the verified read waits for the memslot (evidence,
        not a verdict: after the timeout the read decides)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.memslot_evidence(since).get(need):
                return round(time.monotonic() - t0, 3)
            time.sleep(0.05)
        self.progress(f"no memslot creation for the region in QEMU's log within {timeout:.0f}s "
                      f"after SHMEM_MAP; reading anyway")
        return None

    def memslot_evidence(self, since: int | None) -> dict:
        """QEMU's KVM_SET_USER_MEMORY_REGION calls since byte ``since`` of its log, for the
        buffer's guest-physical range: a delete is size 0, a (re)creation the region's size."""
        if since is None or self.bar2_gpa is None:
            return {"error": "no qemu.log offset or no BAR address"}
        _, out, _ = self.stack.lab.run(f"tail -c +{since + 1} {self.stack.guest.dir}/qemu.log | "
                                       f"grep kvm_set_user_memory", timeout=30, check=False)
        return kvm_evidence.memslot_changes(out.splitlines(), self.bar2_gpa, self.exp.size)

    def check_applicable(self, hello: dict, release: str) -> None:
        """NotApplicable when the lab kernel lacks the exporter this experiment needs
        (Debian's 6.1 has neither udmabuf nor dma-heaps): a cell with a reason, not a crash
        and not a verdict. The vmlab exporter is always built for the lab kernel, so its
        absence is a broken lab, not a missing feature."""
        kind = self.exp.kind
        if kind == "udmabuf" and not hello.get("udmabuf"):
            raise NotApplicable(f"lab kernel {release} has no /dev/udmabuf (CONFIG_UDMABUF)")
        if kind == "vgem" and not hello.get("vgem"):
            raise NotApplicable(f"lab kernel {release} has no vgem DRM device (CONFIG_DRM_VGEM)")
        if kind == "dmaheap" and "system" not in (hello.get("dma_heaps") or []):
            raise NotApplicable(f"lab kernel {release} has no system dma-heap "
                                f"(/dev/dma_heap/system, CONFIG_DMABUF_HEAPS_SYSTEM)")

    def check_guest_can_store(self) -> None:
        """An AVX store needs AVX in the guest: where the guest has no XSAVE (the nested
        TCG lab's KVM offers none that adds up: GuestVM.cpu), the experiment does not apply."""
        if not any(mv["store"] == "avx" for mv in self.moves_plan):
            return
        rc, out, _ = self.stack.guest.run(
            # AVX without XSAVE is no AVX (the guest agent asks the CPU the same way)
            "grep -qw avx /proc/cpuinfo && grep -qw xsave /proc/cpuinfo && echo yes; "
            "dmesg | grep -m1 -i 'xsave consistency'",
            timeout=30, check=False)
        if not out.startswith("yes"):
            why = out.strip().split("] ", 1)[-1] or "no avx flag in /proc/cpuinfo"
            raise NotApplicable(f"the guest has no AVX, so no AVX store can be tried ({why})")

    def judge_health(self) -> None:
        """check_health, where a check that could not be made is no pass: said, and the
        run fails."""
        try:
            self.check_health()
        except Exception as e:
            log.warning("kernel health check: %s", e)
            self.result["kernel_health_error"] = f"{type(e).__name__}: {e}"
            self.result["passed"] = False
            if self.aborted is None:
                self.progress(f"the kernels' health could not be checked: {e}")

    def check_health(self) -> None:
        """WARN/BUG/Oops or a new taint flag in either kernel fails the run unless the
        experiment says it expects them (``expect_kernel_warnings: true``)."""
        lab = self.stack.lab if self.stack else None
        health = kernel_health({"lab": lab, "guest": self.stack.guest if self.stack else None},
                               self.health_start, vmm_fault=self.result.get("vmm_fault"),
                               lab_console=Path(lab.machine.spec.console_log)
                               if getattr(lab, "machine", None) else self.out / "lab-console.log",
                               agents={"lab": self.agent, "guest": _GuestKernelState(self)},
                               ends=self.health_end)
        self.result["kernel_health"] = health
        bad = {k: v for k, v in health.items() if v.get("ok") is False}
        if bad and not self.exp.raw.get("expect_kernel_warnings"):
            self.result["kernel_health_failed"] = sorted(bad)
            for k, v in bad.items():
                if "error" in v:
                    # no judgement: a kernel that died, or (after the lab's mark) a host
                    # agent that could not say what came since; never a pass
                    self.progress(f"{k} kernel's health could not be read at the end: {v['error'][:200]}"
                                  + (f"; its console: {v['bad_lines'][-1][:160]}" if v["bad_lines"] else ""))
                elif v["bad_line_count"] or v["new_taint"]:
                    self.progress(f"{k} kernel complained during the run: new taint '{v['new_taint']}', "
                                  f"{v['bad_line_count']} WARN/BUG lines, first: "
                                  f"{(v['bad_lines'] or [''])[0][:160]}")
                else:
                    self.progress(f"{k} kernel logged more during the run than could be read "
                                  f"(overwritten {v.get('overruns', 0)} times"
                                  f"{', read cut short' if v.get('truncated') else ''}): not vouched for")

    def gpu_roundtrip(self, mode: str) -> None:
        from . import doctor, gpu_roundtrip
        probe = doctor.gpu_probe(self.stack.guest)
        if mode == "blob":
            res = gpu_roundtrip.blob(self.stack.guest)
        elif mode == "host-blob":
            res = gpu_roundtrip.host_blob(self.stack.guest, self.agent)
            self.result["caching_chain"]["virtio_gpu_map_info"] = res["map_info"]
        else:
            res = {"mode": mode, "passed": False, "error": "gpu_roundtrip needs guest.gpu blob or host-blob"}
        res["probe"] = probe
        self.result["virtio_gpu"] = res
        self.progress(f"virtio-gpu {mode} round trip: {'ok' if res['passed'] else 'FAILED'} "
                      f"{res.get('error', '')}")
        self.save()

    def caching_chain(self) -> dict:
        """Each layer's caching attribute for the buffer, asked of that layer (the
        analysis is vmlab/caching.py's); also where the guest sees the BAR."""
        exp_cfg = self.exp.section("exporter")
        exporter: dict = {"kind": exp_cfg["kind"], "requested": exp_cfg.get("caching", "WB")}
        host_pte = None
        if exp_cfg["kind"] == "vmlab":
            info = self.agent.request("info", buf=self.buf["buf"])
            exporter.update(caching=info["caching"], vm_prot=info["vm_prot"])
            try:
                host_pte = self.agent.request("host_pte", buf=self.buf["buf"])
            except AgentRequestFailed as e:
                host_pte = {"error": str(e)}
        m = self.guest_agent(f"map --caching {self.mapping}{self.dev_args}")
        if m.get("bar2_phys"):
            self.bar2_gpa = int(str(m["bar2_phys"]), 16)
        npt = self.result["lab"].get("module_params", {}).get("kvm_amd", {}).get("npt", "-")
        return caching.chain(exporter, host_pte, npt, m, self.mapping)

    def start_kvm_trace(self) -> None:
        """KVM's MMU tracepoints for the BAR's frames, recorded around every move
        (``kvm_evidence``); off with the option ``kvm_evidence: false`` (benches)."""
        if not self.opts.get("kvm_evidence", True) or self.bar2_gpa is None:
            return
        try:
            st = self.agent.request("ktrace_start", gfn=self.bar2_gpa >> 12, pages=self.exp.size // 4096)
        except AgentRequestFailed as e:
            self.result["kvm_trace"] = {"error": str(e)}
            return
        self.result["kvm_trace"] = st
        self.ktrace = True

    def pre_move_batch(self, requests: list[dict]) -> list:
        """``requests`` answered in one round trip (HostAgent.batch) after the quarantine
        release the last judged move earned, whose answer goes into that move's record."""
        pending, self.pending_release = self.pending_release, None
        if pending is not None:
            # EBUSY is an answer (record_release); any other failure is vmlab's and
            # stops the batch before the move
            requests = [{"op": "release_quarantine", "buf": self.buf["buf"],
                         "max_generation": pending[1], "may_fail": ["EBUSY"]}] + requests
        try:
            answers = self.agent.batch(requests, timeout=120)
        except (WaitTimeout, RemoteError) as e:
            if pending is not None:
                pending[0]["release_error"] = f"unknown: {e}"
            raise
        if pending is not None:
            self.record_release(pending[0], answers.pop(0))
        return answers

    @staticmethod
    def record_release(rec: dict, got) -> None:
        if isinstance(got, AgentRequestFailed):
            if got.errname != "EBUSY":
                # vmlab's own failure, said in the move that earned the release: the
                # run ends (the batch stopped before anything after it ran)
                rec["release_error"] = str(got)
                raise got
            # the exporter knows a host PTE may still map an old set (a move without
            # zap): it stays quarantined until the guest is gone
            rec["released_pages"] = 0
            rec["quarantine_busy"] = str(got)
        elif got is not None:
            rec["released_pages"] = got["freed_pages"]

    def evidence_begin_requests(self) -> list[dict]:
        """What kvm_evidence_begun needs: the trace cleared, the exporter's pfns then."""
        if not self.ktrace:
            return []
        reqs = [{"op": "ktrace_clear", "may_fail": True}]
        if self.exp.kind == "vmlab":
            reqs.append({"op": "info", "buf": self.buf["buf"], "pfns": True})
        return reqs

    def kvm_evidence_begun(self, answers: list) -> list[int] | None:
        """The pfns before a move (None: no evidence for it). Evidence, not a verdict:
        a trace that fails is recorded and the move goes on."""
        if not self.ktrace:
            return None
        if not isinstance(answers[0], dict):
            self.result.setdefault("kvm_trace", {})["error"] = f"clear: {answers[0]}"
            self.ktrace = False
            return None
        if len(answers) < 2:
            return None
        return HostAgent.answered(answers[1], "reading the exporter's pfns")["pfns"]

    def kvm_evidence_begin(self) -> list[int] | None:
        """kvm_evidence_begun, in a round trip of its own (before a guest's write)."""
        reqs = self.evidence_begin_requests()
        if not reqs:
            return None
        try:
            answers = self.pre_move_batch(reqs)
        except WaitTimeout as e:
            answers = [e]
        return self.kvm_evidence_begun(answers)

    def evidence_end_requests(self, old_pfns: list[int] | None) -> list[dict]:
        if not self.ktrace:
            return []
        reqs = [{"op": "ktrace_collect", "may_fail": True}]
        if old_pfns is not None:
            reqs.append({"op": "info", "buf": self.buf["buf"], "pfns": True})
        return reqs

    def kvm_evidence_end(self, rec: dict, old_pfns: list[int] | None, answers: list | None = None) -> None:
        """KVM's events since kvm_evidence_begun into ``rec``; ``answers``: those of
        evidence_end_requests when they were sent with other requests."""
        if not self.ktrace:
            return
        if answers is None:
            try:
                answers = self.agent.batch(self.evidence_end_requests(old_pfns), timeout=120)
            except WaitTimeout as e:
                answers = [e]
        got = answers[0]
        if not isinstance(got, dict):
            rec["kvm_evidence"] = {"error": str(got)}
            self.ktrace = False
            return
        new_pfns = None if old_pfns is None else \
            HostAgent.answered(answers[1], "reading the exporter's pfns")["pfns"]
        st = self.result["kvm_trace"]
        # the TDP MMU runs only with nested paging on (kvm.tdp_mmu only allows it)
        npt = self.result.get("caching_chain", {}).get("kvm", {}).get("mmu") == "NPT"
        tdp = npt and st.get("tdp_mmu") == "Y" and "kvmmmu/kvm_tdp_mmu_spte_changed" in st.get("enabled", ())
        ev = kvm_evidence.summarize(kvm_evidence.parse(got["lines"]), self.bar2_gpa >> 12,
                                    self.exp.size // 4096, old_pfns, new_pfns, got.get("overrun", 0),
                                    tdp_mmu=tdp)
        rec["kvm_evidence"] = ev
        if rec.get("verdict") == "STALE" and ev.get("kept_old_pages"):
            rec["detail"] = "; ".join(x for x in (rec.get("detail"), ev["summary"]) if x)

    def vmm_mapping(self) -> dict:
        """Where the guest's QEMU mapped the buffer (BAR 2), and whether KVM could map it with
        2 MiB nested entries: the host address must be 2 MiB-aligned like the BAR."""
        got = self.agent.request("vmm_mapping", buf=self.buf["buf"], pid=self.stack.guest.pid)
        vmas = got["vmas"]
        out = {"vmas": vmas, "thp_enabled": got.get("thp_enabled"),
               "align_mappings": self.opts.get("guest_align", "4K"),
               "aligned_2m": bool(vmas) and all(v["aligned_2m"] for v in vmas)}
        if self.exp.section("exporter").get("alloc") == "HUGE_PMD" and not out["aligned_2m"]:
            out["note"] = ("QEMU mapped the BAR at " + ", ".join(v["start"] for v in vmas) +
                           ": not 2 MiB-aligned, so neither QEMU's page tables nor KVM's nested "
                           "ones can use 2 MiB entries (guest.align_mappings: 2M aligns it)")
            self.progress(out["note"])
        return out

    def read_and_judge(self, generation: int | list[int], expect_tag: int | None) -> dict:
        r = self.guest_agent(f"read --caching {self.mapping}{self.dev_args}", timeout=300)
        if "guest_fault" in r:
            return {"verdict": "GUEST_FAULT", "pages": {}, "detail": r}
        j = oracle.judge(oracle.records(r), buffer_id=self.buf["id"], generation=generation,
                         npages=self.exp.size // 4096, expect_tag=expect_tag)
        j["read_ns"] = r.get("read_ns")
        j["guest_memtype"] = r.get("memtype")
        return j

    # --- the hardware oracle ---------------------------------------------------------------
    def hw_pfns(self) -> list[int]:
        return self.agent.request("info", buf=self.buf["buf"], pfns=True)["pfns"]

    def hw_judge(self, rec: dict) -> None:
        """The hardware's verdict on the epoch just read, folded into ``rec``: the worse of
        the two verdicts, the disagreement in words, and no pass without a hardware verdict
        or when the hardware contradicts the stamps."""
        if self.hw is None or rec.get("verdict") in ("VMM_FAULT", "GUEST_FAULT", None):
            return
        hw = hwtrace.verdict(self.hw.dump(), self.exp.size // 4096, self.hw_moved_at)
        rec["hw_oracle"] = hw
        rec["stamps_verdict"] = rec["verdict"]
        rec["verdict"], why, contradiction = hwtrace.combine(rec["verdict"], hw)
        if why:
            rec["oracle_disagreement"] = why
            rec["detail"] = "; ".join(filter(None, [rec.get("detail"), why]))
        if contradiction:
            rec["hw_blind"] = True

    def baseline(self) -> None:
        self.check_vmm()
        if self.hw is not None:
            self.hw.setup(hwtrace.GUEST_MAP_VA, hwtrace.GUEST_MAP_VA + self.exp.size, self.hw_pfns())
            self.hw.epoch(0)
        j = self.read_and_judge(1, None)
        self.hw_judge(j)
        info = self.exporter_info()
        if info is not None:
            j["exporter_info"] = info
        j["expected"] = self.baseline_expect
        j["passed"] = j["verdict"] in self.baseline_expect and not j.get("hw_blind")
        self.result["baseline"] = j
        self.progress(f"baseline read: {j['pages']} -> {j['verdict']} "
                      f"(expected {'/'.join(self.baseline_expect)})")

    def exporter_info(self) -> dict | None:
        if self.exp.section("exporter")["kind"] != "vmlab":
            return None
        return self.agent.request("info", buf=self.buf["buf"])

    def moves(self) -> None:
        generation = 1
        npages = self.exp.size // 4096
        # the generation each page must show: a page-range move changes only its range
        page_gens = [1] * npages
        base = self.result.get("baseline", {}).get("verdict")
        for mv in self.moves_plan:
            rec = {"n": mv["n"], "mode": mv["mode"], "expected": mv["expect"], "caching": mv["caching"]}
            if mv.get("pages"):
                rec["page_range"] = mv["pages"]
            self.result["moves"].append(rec)
            tag = None
            if self.result.get("vmm_fault"):
                rec.update(verdict="VMM_FAULT", pages={}, detail="not run: the VMM died earlier")
                rec["passed"] = "VMM_FAULT" in mv["expect"]
                continue
            if base != "REFAULTED":
                rec.update(verdict=None, pages={}, detail=f"not run: the baseline read was {base}",
                           passed=False)
                continue
            try:
                if self.hw is not None:   # from here on every access counts for this move
                    self.hw.epoch(mv["n"])
                    self.hw_moved_at = None
                # KVM's evidence covers the guest's write too (a write to a read-only
                # PTE is where KVM emulates): then it starts in a round trip of its own,
                # else with the move
                # (for a move without a write the window opens with the move's batch: after
                # an injected kill and the watcher's start, not before them)
                ev_pfns = self.kvm_evidence_begin() if mv["guest_write"] else None
                ev_reqs = [] if mv["guest_write"] else self.evidence_begin_requests()
                if mv["guest_write"]:
                    tag = TAG_BASE | mv["n"]
                    w = self.guest_agent(f"write --tag {tag} --caching {self.mapping}{self.dev_args} "
                                         f"--store {mv['store']}")
                    rec["guest_write"] = {"tag": hex(tag), "store": w.get("store", mv["store"]),
                                          "readback_ok": w.get("readback_ok")}
                    if "guest_fault" in w:
                        # e.g. SIGILL: KVM could not emulate the store and injected #UD
                        rec.update(verdict="GUEST_FAULT", pages={},
                                   detail=f"the guest's {mv['store']} store faulted: {w['guest_fault']}")
                        self.kvm_evidence_end(rec, ev_pfns)
                        continue
                if mv["concurrent"] and self.watch is None:
                    self.watch_tried = True   # its exec may start although Watch() fails
                    self.watch = Watch(self.stack.guest, self.mapping + self.dev_args)
                if mv["inject"] == "kill-vmm":
                    self.injected_kill = True
                    self.stack.lab.run(f"kill -KILL {self.stack.guest.pid}", timeout=20, check=False)
                    rec["injected"] = "SIGKILL to the guest's QEMU before the move"
                info_req = [{"op": "info", "buf": self.buf["buf"]}] \
                    if mv["mode"] == "ZAP_ONLY" and self.exp.kind == "vmlab" else []
                log_at = self.qemu_log_size() if self.transport == "virtio-shm" else None
                window_end = None    # under remap: when the memslot was seen back
                sends_move = mv["inject"] != "skip-zap" and mv["mode"] != "NONE"
                move_req = [{"op": "move", "buf": self.buf["buf"], "mode": mv["mode"],
                             "caching": mv["caching"], "pages": mv.get("pages"), "remap": self.remap,
                             "inject": mv["inject"]}] if sends_move else []
                # one round trip: the last move's release, the evidence's start, ZAP_ONLY's
                # before, the move (t_sent is the move's: the others cost the lab ~1 ms)
                t_sent = time.monotonic()
                answers = self.pre_move_batch(ev_reqs + info_req + move_req)
                move_in_lab = None
                if move_req and self.agent.batch_elapsed:
                    # the move began when the agent was done with the requests before it
                    t_sent += sum(self.agent.batch_elapsed[:-1])
                    move_in_lab = self.agent.batch_elapsed[-1]
                if ev_reqs:
                    ev_pfns = self.kvm_evidence_begun(answers[:len(ev_reqs)])
                    answers = answers[len(ev_reqs):]
                before = HostAgent.answered(answers.pop(0), "reading the exporter's info") if info_req else None
                try:
                    if mv["inject"] == "skip-zap":
                        # the oracle's negative control: a "zap" that changes nothing
                        mres = {"generation": generation,
                                "what": "injected: the ZAP_ONLY request was never sent"}
                    elif mv["mode"] == "NONE":
                        mres = {"generation": generation, "what": "no move: the guest's write, then a read"}
                    else:
                        mres = HostAgent.answered(answers[0], "the move")
                except AgentRequestFailed as e:
                    if e.errname in ("EOPNOTSUPP", "ENOTSUP"):
                        rec.update(verdict="UNSUPPORTED", pages={}, detail=str(e))
                        continue
                    if e.errname == "ENOSPC":
                        raise RemoteError(f"move {mv['n']}: the exporter's quarantine is full "
                                          f"(max_quarantine_mb): {e}")
                    raise
                t_moved = time.monotonic()
                if mres["generation"] != generation:
                    r = mv.get("pages") or {"first": 0, "count": npages}
                    page_gens[r["first"]:r["first"] + r["count"]] = \
                        [mres["generation"]] * r["count"]
                generation = mres["generation"]
                rec["generation"] = generation
                rec["exporter_note"] = mres.get("what")
                if "remap" in mres:
                    rec["vmm_remap"] = mres["remap"]
                    if not mres.get("remap_error"):
                        rec["vmm_remap"]["memslot_seen_s"] = self.wait_memslot(log_at)
                        window_end = time.monotonic()
                if mres.get("remap_error"):
                    # the VMM could not map the moved buffer back: the guest has a hole
                    # where its memory was, and that is the move's outcome
                    rec.update(verdict="VMM_FAULT", pages={},
                               detail=f"SHMEM_MAP after the move failed: {mres['remap_error']}")
                    rec["memslot_evidence"] = self.memslot_evidence(log_at)
                    self.kvm_evidence_end(rec, ev_pfns)
                    continue
                if self.hw is not None:
                    # the move is done: a hit on the pages it left, from now on, is stale
                    self.hw_moved_at = time.monotonic_ns()
                    self.hw.retire(self.hw_moved_at, self.hw_pfns())
                if mv["interval_ms"]:
                    time.sleep(mv["interval_ms"] / 1000)
                t_watch = time.monotonic()
                if mv["concurrent"]:
                    rec["watch"] = self.watch.wait_generation(generation, t_sent, timeout=30)
                t_read = time.monotonic()
                # the VMM is checked (QMP) every half second while the guest reads: a
                # dead or stopped one is VMM_FAULT (a stopped VM cannot answer the read)
                j = self.read_and_judge(page_gens, tag)
                rec.update(j)
                t_end = time.monotonic()
                rec["seconds"] = round(t_end - t_sent, 4)  # move + full verified read
                # where those seconds went (vmlab bench --what move reports them)
                rec["phases_s"] = {"move": round(t_moved - t_sent, 4), "watch": round(t_read - t_watch, 4),
                                   "read": round(t_end - t_read, 4)}
                if move_in_lab is not None:
                    # the agent's own time on the move (the ioctl): the rest of "move" is transport
                    rec["phases_s"]["move_in_lab"] = round(move_in_lab, 4)
                # one round trip: the exporter's state after the read, KVM's evidence
                vmlab_kind = self.exp.kind == "vmlab"
                ev_answers = self.agent.batch(([{"op": "info", "buf": self.buf["buf"]}] if vmlab_kind else [])
                                              + self.evidence_end_requests(ev_pfns), timeout=120)
                info = HostAgent.answered(ev_answers.pop(0), "reading the exporter's info") \
                    if vmlab_kind else None
                if info is not None:
                    rec["exporter_info"] = info
                if before is not None and info is not None and rec["verdict"] == "REFAULTED":
                    ev = oracle.zap_evidence(before, info, npages)
                    rec["zap_evidence"] = ev
                    if not ev["ok"]:
                        rec.update(verdict="NOT_ZAPPED", detail=ev["detail"])
                if mv["concurrent"] and not rec["watch"]["seen"]:
                    # a watcher that died cannot vouch for anything; one that is alive but
                    # never showed the new generation kept seeing old pages: stale
                    dead = self.watch.exited()
                    rec["verdict"] = oracle.worst([rec["verdict"], "GUEST_FAULT" if dead else "STALE"])
                    rec["detail"] = (f"the guest watcher {'exited and ' if dead else ''}never showed "
                                     f"generation {generation}; last lines: {self.watch.last(3)}"
                                     + (f"; lost: {self.watch.lost}" if self.watch.lost else ""))
                if self.watch is not None:
                    # everything it saw since the last move's judgement, the gap between
                    # the two moves included
                    window = self.watch.take_unjudged()
                    faults = [e for e in window if "error" in e]
                    if faults:
                        rec["verdict"] = oracle.worst([rec["verdict"], "GUEST_FAULT"])
                        rec["detail"] = f"the guest watcher faulted: {faults[0]}"
                    ws = oracle.watch_stale(window, generation=generation)
                    rec.setdefault("watch", {}).update(ws)
                    if ws["stale_observations"]:
                        rec["verdict"] = oracle.worst([rec["verdict"], "STALE"])
                        rec["detail"] = ws["detail"]
                    # a page with no stamp is the VMM's unmap window only under remap, and
                    # only from this move until the memslot is back (+1 s for the line to
                    # arrive); anywhere else, before this move too, it is memory that should
                    # not be there
                    holes = [e for e in window if e.get("status") == "hole"]
                    outside = [e for e in holes if e["rx"] < t_sent or window_end is None
                               or e["rx"] > window_end + 1.0]
                    rec["watch"]["holes_outside_window"] = len(outside)
                    if outside:
                        rec["verdict"] = oracle.worst([rec["verdict"], "TORN"])
                        rec["detail"] = (f"the guest watcher read {len(outside)} pages with no stamp "
                                         f"outside the VMM's unmap window (page {outside[0].get('page')})")
                self.hw_judge(rec)
                self.kvm_evidence_end(rec, ev_pfns, ev_answers)
                if log_at is not None:
                    rec["memslot_evidence"] = self.memslot_evidence(log_at)
                hw_clear = self.hw is None or rec.get("hw_oracle", {}).get("verdict") == "HW_REFAULTED"
                if rec["verdict"] == "REFAULTED" and hw_clear and info is not None and generation > 1:
                    # every page was read at the new generation: no guest mapping of the
                    # older pages is left, so their quarantine may end (with the next
                    # move's requests: later is as safe, and a round trip less)
                    self.pending_release = (rec, generation - 1)
            except VMMDied as e:
                rec.update(verdict="VMM_FAULT", pages={}, detail=str(e))
                self.result["vmm_fault"] = str(e)
            finally:
                rec["passed"] = rec.get("verdict") in mv["expect"] and not rec.get("hw_blind")
                self.progress(f"move {mv['n']:3} {mv['mode']:15} -> {rec.get('verdict') or '?':12} "
                              f"expected {'/'.join(mv['expect'])} {rec.get('pages', '')}")
                self.save()
        if self.pending_release is not None:
            self.pre_move_batch([])      # the last move's release: no move follows
            self.save()

    def finish(self) -> None:
        # the report's plots are drawn while the run tears down (waits on the lab, mostly)
        plots = threading.Thread(target=report.prerender, name="report-plots", daemon=True,
                                 args=({k: self.result.get(k) for k in ("baseline", "moves", "config")},))
        plots.start()
        self._plots = plots
        moves = self.result["moves"]
        base = self.result.get("baseline", {})
        # every planned move must have been judged: a run cut short never passes
        self.result["passed"] = (bool(base.get("passed")) and len(moves) == len(self.moves_plan)
                                 and all(m.get("passed") for m in moves) and self.aborted is None)
        if self.exp.raw.get("gpu_roundtrip"):
            self.result["passed"] = self.result["passed"] and bool(self.result.get("virtio_gpu", {}).get("passed"))
        if self.aborted is None:
            self.result["status"] = "finished"
        else:
            interrupted = isinstance(self.aborted, KeyboardInterrupt) or \
                type(self.aborted).__name__ == "Terminated"
            self.result["status"] = ("interrupted" if interrupted else "not_applicable"
                                     if isinstance(self.aborted, NotApplicable) else "could_not_test"
                                     if isinstance(self.aborted, CouldNotTest) else "error")
            self.result["error"] = f"{type(self.aborted).__name__}: {self.aborted}"
            if isinstance(self.aborted, NotApplicable):
                self.result["not_applicable"] = self.aborted.reason
        if self.watch is not None:
            self.result["watch"] = self.watch.close()
            lat = sorted(m["watch"]["latency_s"] for m in moves
                         if m.get("watch", {}).get("latency_s") is not None)
            if lat:
                self.result["watch"]["move_to_guest_latency_s"] = {
                    "n": len(lat), "p50": lat[len(lat) // 2], "p99": lat[math.ceil(len(lat) * 0.99) - 1],
                    "note": "controller clock, from sending MOVE to receiving the guest's watch line "
                            "(an upper bound: includes SSH transport both ways)"}
        self.result["ended"] = datetime.now(timezone.utc).isoformat()
        if self.stack is not None and self.stack.boot_failures:
            # also when every attempt failed: the first one's console is the evidence
            self.result.setdefault("lab", {})["boot_failures_retried"] = self.stack.boot_failures
            self.progress(f"note: the lab's boot was retried after: "
                          f"{'; '.join(f['cause'] for f in self.stack.boot_failures)}")
        if self.stack is not None and self.stack.guest_boot_failures:
            self.result.setdefault("guest", {})["boot_failures_retried"] = self.stack.guest_boot_failures
            self.progress(f"note: the guest's boot was retried after: "
                          f"{'; '.join(f['cause'] for f in self.stack.guest_boot_failures)}")
        try:
            if self.agent is not None and self.exp.section("exporter")["kind"] == "vmlab" and self.buf:
                try:
                    self.result["final_exporter_info"] = self.agent.request("info", buf=self.buf["buf"])
                except Exception as e:
                    self.result["final_exporter_info"] = {"error": str(e)}
            self.mark("moves")          # what was left of it, after a failure
            self.judge_health()
            self.mark("health")
            if self.result.get("kernel_health_failed"):
                self.result["passed"] = False
        finally:
            try:
                self.teardown()
            finally:
                self.mark("teardown")
                self.save()
                write_junit(self.out / "junit.xml", self.result)
                self.write_report()

    def write_report(self) -> None:
        """report.html beside results.json: a report that cannot be drawn is logged and
        says so in its place, it never changes the run's outcome."""
        plots = getattr(self, "_plots", None)
        if plots is not None:
            plots.join(timeout=15)     # not drawn by then: run_html draws them itself
        try:
            page = report.run_html(self.result, self.out)
        except Exception as e:
            log.warning("report.html: %s: %s", type(e).__name__, e)
            page = (f"<!doctype html><meta charset=utf-8><title>vmlab run</title><p>no report: "
                    f"{escape(type(e).__name__)}: {escape(str(e))}; see results.json</p>")
        (self.out / "report.html").write_text(page)

    def teardown(self) -> None:
        """Guest, buffer, host agent, lab: each step runs whatever the one before did."""
        if self.hw is not None:
            self.hw.close()
        if self.stack is None:
            self.close_guest_agent()
            return
        guest_gone = True
        logs_of = None
        try:
            if self.stack.guest is not None and self.stack.guest is self.shared_guest:
                g = self.stack.guest
                guest_gone = self.unplug()
                if guest_gone:   # running (a stopped guest would leave dmesg to its timeout)
                    self.save_guest_dmesg(g)
                self.close_guest_agent()
                if not guest_gone and self.stop_guest_in_doubt:
                    # no KVM mapping of the buffer is left once its QEMU is gone
                    guest_gone = g.down()
                    self.result["guest"]["stopped_by_run"] = "its device could not be unplugged"
                logs_of = g
                self.stack.guest = None
            elif self.stack.guest is not None:
                self.close_guest_agent()
                guest_gone = self.stack.guest.down()
                self.stack.guest = None
        finally:
            self.close_guest_agent()
            try:
                try:
                    if self.agent is not None:
                        self.release_buffer(guest_gone)
                finally:
                    try:
                        if logs_of is not None:
                            # the shared guest's whole console and QEMU log so far: this
                            # run's evidence too; read after the release, so that a slow
                            # read never keeps the buffer's pages quarantined
                            logs_of.fetch_logs(self.out, agent=self.agent if self.agent is not None
                                               and self.agent.answering else None)
                    finally:
                        if self.agent is not None:
                            try:
                                self.judge_lab_teardown()
                            finally:
                                self.agent.close()
            finally:
                self.stack.down()


    def judge_lab_teardown(self) -> None:
        """lab-dmesg.log from the host agent's shutdown, and the lab's lines since the
        health check's read of its mark judged (judge_teardown). A lab whose log was
        marked but that gave no lines back is judged as one that could not be read: the
        lab runs with oops=panic, so a BUG at the buffer's close or quarantine release
        looks exactly like an agent that stopped answering."""
        ans = self.stack.save_lab_dmesg(self.agent) if self.agent.answering else None
        start = self.health_start.get("lab") or {}
        if not start.get("mark"):
            return          # no mark (its start was an exec's): nothing since it to read
        before = self.health_end.get("lab") or start
        sm = (ans or {}).get("since_mark")
        if sm is None:
            self.judge_teardown("lab", before, None,
                                error="the lab's host agent gave no kernel lines at its shutdown "
                                      + ("(no answer)" if ans is None else "(no mark left)"))
            return
        try:
            after = HostAgent.kernel_lines(sm)
        except (KeyError, TypeError, ValueError) as e:
            self.judge_teardown("lab", before, None, error=f"the host agent's kernel lines at its shutdown: {e!r}")
            return
        self.judge_teardown("lab", before, after)

    def close_guest_agent(self) -> None:
        # not waited for (it was 2 s, ~0.06 s when it answers): an open agent is idle,
        # maps nothing, and exits at the EOF of its channel's close; one whose command
        # failed was closed then, and the unplug kills it
        if self.gagent is not None:
            gagent, self.gagent = self.gagent, None
            gagent.close(wait=0)

    def save_guest_dmesg(self, g) -> None:
        """The shared guest's log after the unplug (its lines are this run's too): from
        the run's guest agent while it serves (the same text as the guest's dmesg; a
        request, where an exec costs ~0.1 s), else the agent's command over an exec."""
        try:
            st = _GuestKernelState(self).kernel_state()
        except Exception as e:
            log.warning("%s-dmesg.log: %s", g.opts.name, e)
            if "guest" in self.health_end:   # the check read it: now it cannot be read
                self.judge_teardown("guest", self.health_end["guest"], None,
                                    error=f"the guest's kernel log after the unplug: {type(e).__name__}: {e}")
            return
        (self.out / f"{g.opts.name}-dmesg.log").write_text(st["dmesg"])
        if "guest" in self.health_end:
            self.judge_teardown("guest", self.health_end["guest"], st)

    def judge_teardown(self, name: str, before: dict, after: dict | None, error: str | None = None) -> None:
        """What ``name``'s kernel said while the run tore down (health.compare_states)
        fails the run as what it said during the moves does: a WARN at the buffer's
        unplug, close or quarantine release is as much the run's. ``after`` None: it
        could not be read (``error`` says why), which is no pass either."""
        h = {"ok": False, "error": error, "new_taint": "?", "bad_lines": [], "bad_line_count": 0}
        if after is not None:
            try:
                h = compare_states(before, after)
            except Exception as e:       # no state to compare: said, never a pass made up
                h["error"] = f"{type(e).__name__}: {e}"
        kh = self.result.setdefault("kernel_health", {}).setdefault(name, {})
        kh["teardown"] = h
        if h["ok"] is False and not self.exp.raw.get("expect_kernel_warnings"):
            kh.update(ok=False, teardown_failed=True)
            self.result["kernel_health_failed"] = sorted(set(self.result.get("kernel_health_failed", [])) | {name})
            self.result["passed"] = False
            self.progress(f"{name} kernel complained while the run tore down: new taint "
                          f"'{h.get('new_taint', '?')}', {h['bad_line_count']} WARN/BUG lines"
                          + (f", first: {h['bad_lines'][0][:160]}" if h["bad_lines"] else "")
                          + (f"; {h['error']}" if "error" in h else "")
                          + ("; lines were lost" if h.get("overruns") or h.get("truncated") else ""))

    def unplug(self) -> bool:
        """The buffer's device out of the shared guest; True once QEMU has finalized it
        (no BAR, memslot or mapping of the buffer left in that VM)."""
        if self.plug is None:
            return True
        try:
            status = self.stack.guest.cmd("query-status").get("status")
        except Exception as e:
            status = f"no answer over QMP ({e})"
        if status != "running":
            # a stopped vCPU (KVM_RUN failed) never ejects the device: waiting for it
            # would only run out the unplug's timeout
            self.result.setdefault("guest", {})["unplug_error"] = f"not unplugged: the guest is {status}"
            return False
        # nothing of this run may outlive it in a guest others use: the watcher runs for
        # an hour unless killed, and an agent that did not exit holds the BAR. When every
        # agent command went through the one serve process, which answered them all,
        # none is left (an exec in the guest less: ~0.1 s)
        if self.watch_tried or self.gagent is None or not self.gagent.idle:
            self.close_guest_agent()    # the kill takes its serve process too
            try:
                self.stack.guest.run("busybox pkill -KILL -f '[v]mlab-guest-agent'; true",
                                     timeout=30, check=False)
            except Exception as e:
                log.warning("stopping this run's guest agents: %s", e)
        try:
            self.plug.close()
        except Exception as e:
            log.warning("unplugging the buffer: %s", e)
        gone = self.plug.gone()
        if not gone:
            self.result.setdefault("guest", {})["unplug_error"] = (
                f"{self.plug.device} not confirmed gone from the guest")
        return gone

    def release_buffer(self, guest_gone: bool) -> None:
        """Close the buffer; once the guest's QEMU is gone (its VM, and with it every KVM
        mapping of the buffer, destroyed) release the quarantine the exporter keeps for
        the closed buffer, retired generations and last pages alike. Not before: a stale
        spte may be exactly what this run found."""
        if not self.buf or self.exp.section("exporter")["kind"] != "vmlab":
            return
        try:
            bid = self.agent.request("close", buf=self.buf["buf"])["id"]
            if guest_gone and bid:
                self.result["released_at_end"] = self._release_quarantine(bid)
            else:
                self.result["released_at_end"] = None
                log.warning("guest QEMU not confirmed gone: buffer %s stays quarantined", bid)
        except Exception as e:
            log.warning("closing the buffer: %s", e)


    def _release_quarantine(self, bid: int) -> int | None:
        """Free a closed buffer's quarantine. After an unplug the guest's QEMU drops its
        mapping a moment later (an RCU callback): the exporter answers EBUSY while a host
        PTE may still map a page, so ask again for a few seconds, then leave the pages
        quarantined (they go with the lab) rather than force anything."""
        deadline = time.monotonic() + (5 if self.plug is not None else 0)
        while True:
            try:
                return self.agent.request("release_quarantine", id=bid)["freed_pages"]
            except AgentRequestFailed as e:
                if e.errname != "EBUSY" or time.monotonic() >= deadline:
                    if e.errname == "EBUSY":
                        log.warning("buffer %s: still mapped 5 s after the unplug; it stays "
                                    "quarantined until the lab goes", bid)
                        return None
                    raise
                time.sleep(0.2)


def main(args, progress) -> int:
    path = args.config or str(DEFAULT_CONFIG)
    exp = cfgmod.load(path)  # ConfigError -> exit 2 before anything starts
    opts = cfgmod.resolve(exp, args)
    keep, fresh = bool(getattr(args, "keep", False)), bool(getattr(args, "fresh", False))
    if opts["lab_kind"] != "nested":
        if keep:
            raise UserError(f"--keep: {exp.path} runs on a test box (lab.kind "
                            f"{opts['lab_kind']}), which vmlab does not keep")
    if keep and fresh:
        raise UserError("--keep runs in the lab that 'vmlab lab up' keeps, --fresh in one of "
                        "the run's own: choose one")
    if keep and "hw" in opts["oracle"]:
        raise UserError(f"--keep: {exp.path} uses the hardware oracle, whose TCG plugin a kept "
                        f"lab does not load")
    if keep:
        state, why = reuse.mismatch_of_running(reuse.wanted_shape(opts))
        if why:
            raise UserError(f"--keep: the lab that is up (pid {state['pid']}) does not fit this "
                            f"run: {why}; 'vmlab lab down' first, or run without --keep")
    out = results_dir(exp.name, args.out)
    write_reproducer(out, exp, cli_passthrough(args))
    fh = logging.FileHandler(out / "vmlab.log")
    fh.setLevel(logging.DEBUG)
    fh.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(fh)
    root.setLevel(logging.DEBUG)
    # the report's plots: matplotlib's font search is hundreds of DEBUG lines of no use
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    for h in root.handlers:
        if h is not fh and not args.verbose:
            h.setLevel(logging.WARNING)
    progress(f"experiment {exp.name}: results in {out}")
    r, interrupted = None, False
    # a lab that comes up after this point was started by this run (a Ctrl-C right after
    # its boot must not leave it behind)
    was_up = reuse.lab_running()
    # whether this run is booting the lab it keeps: lab_up claims it under the lab's lock,
    # so a run interrupted while another command's `vmlab lab up` holds that lock (or
    # that found it up) never stops that command's lab
    claimed: list = []
    try:
        if keep and not was_up:
            reuse.lab_up(opts, progress, claimed=claimed)
        # the hardware oracle's plugin is never in a `vmlab lab up` lab
        # a test box is never a 'vmlab lab up' lab
        with (reuse.persistent_lab(opts, progress, fresh=fresh,
                                   hwtrace_plugin="(the hardware oracle's plugin)"
                                   if "hw" in opts["oracle"] else None,
                                   lock_wait=120 if keep else 2)
              if opts["lab_kind"] == "nested" else contextlib.nullcontext(None)) as lab:
            if keep and lab is None:
                raise UserError("--keep: the run cannot use the lab that is up (said above); "
                                "'vmlab lab down' first, or run without --keep")
            with reuse.persistent_guest(lab, guest_options(exp, opts)[0], hotplug_blocker(exp, opts),
                                        progress, out) as guest:
                r = Run(exp, opts, out, progress, shared_lab=lab, shared_guest=guest)
                r.save()
                try:
                    rc = r.run()
                finally:
                    # a run that never plugged anything into the guest cannot have damaged it
                    doubt = reuse.guest_doubt(r.result) if guest is not None and r.plug is not None \
                        else None
                    if doubt:   # still under the guest's lock
                        reuse.mark_guest_in_doubt(reuse.lab_dir(), doubt)
                        progress(f"this run left the guest of 'vmlab guest up' in doubt ({doubt}): "
                                 f"later runs will not use it; 'vmlab guest down' and 'vmlab guest "
                                 f"up' replace it")
    except BaseException as e:
        interrupted = not isinstance(e, Exception)   # Ctrl-C, SIGTERM
        raise
    finally:
        root.removeHandler(fh)
        fh.close()
        passed = r is not None and r.result.get("passed") is True
        started = bool(claimed) and reuse.lab_running()
        if started and (passed or interrupted or r is None):
            # nothing to inspect in the lab this run started (or nothing ran in it), or
            # the user wants out
            with proc.signals_deferred():
                reuse.lab_down(progress)
        elif keep and not passed and reuse.lab_running():
            progress(f"the lab stays up for inspection: 'vmlab lab exec -- CMD' (results in "
                     f"{out}); stop it with 'vmlab lab down'")
    print(table(r.result))
    print(f"{'PASSED' if r.result['passed'] else 'FAILED'}: results in {out}")
    return rc

