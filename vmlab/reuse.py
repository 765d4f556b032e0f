"""Running an experiment in the lab that ``vmlab lab up`` left running (and in the guest
that ``vmlab guest up`` left running in it), instead of booting them.

A lab is reused only when everything that shaped it matches what the command would boot:
kernel, QEMU, accelerator, lab memory, extra QEMU arguments, plugin, and the very lab and
guest images (their cache keys cover the exporter build). Anything else boots a lab of
the command's own and says which difference kept it from reusing; ``--fresh`` always
does. While a command uses the lab it holds a shared lock on it, so ``vmlab lab down``
waits for it, and its guest gets a name, port, socket and directory of its own, so
commands that share the lab do not meet each other (nor the guest of ``vmlab guest up``).

The guest of ``vmlab guest up`` is booted with hot-plug root ports and no buffer. A run
whose guest would be booted the same way (memory, vCPUs, machine, GPU, mappings...) and
whose buffer can arrive by hot-plug (ivshmem; no virtio-gpu round trip, no injected VMM
kill) takes that guest under an exclusive lock for its duration, hot-plugs its buffer
(vmlab/hotplug.py) and unplugs it at the end; the guest stays up. A guest that is busy
(another run holds it), dead, or has no free port is said in one line, and the run boots
a guest of its own.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, fields

from . import images
from .errors import UserError, WaitTimeout
from .guest import BOOT_ARGS, Guest, GuestOptions, guest_mismatch
from .hotplug import free_ports, root_port_args
from .exporter import agent_digest
from .lab import NestedLab
from .paths import locked, read_json, state_dir, write_atomic

# what must be equal, in the order a mismatch is reported
_KEYS = ("kernel", "base", "append", "qemu", "memory_mb", "extra_qemu_args", "hwtrace_plugin",
         "image", "guest_image", "agent")


def lab_dir():
    return state_dir() / "lab"


def wanted_shape(o: dict, hwtrace_plugin: str | None = None) -> dict:
    """The shape of the lab this command would boot (images as found in the cache; a
    missing one cannot match any running lab)."""
    def path(kind, kernel, qemu=None, base=None):
        img = images.find(images.recipe(kind, kernel, qemu, base))
        return str(img.path) if img else None
    return {"kernel": o["kernel"], "qemu": o.get("qemu", "default"),
            "base": o.get("lab_base"), "append": o.get("lab_append") or "",
            "agent": agent_digest(),
            "memory_mb": o["lab_memory_mb"],
            "extra_qemu_args": list(o.get("lab_qemu_args") or ()), "hwtrace_plugin": hwtrace_plugin,
            "accel": o["accel"],
            "image": path("lab", o["kernel"], o.get("qemu", "default"), o.get("lab_base")),
            "guest_image": path("guest", o.get("guest_kernel") or "trixie")}


def shape_mismatch(have: dict | None, want: dict) -> str | None:
    """None when a lab of shape ``have`` serves a command that wants ``want``, else the
    first difference in words. ``accel: auto`` takes whatever the lab got."""
    if not have:
        return "it records no shape (started by an older vmlab)"
    for k in _KEYS:
        if have.get(k) != want.get(k):
            if k in ("image", "guest_image") and want.get(k) is None:
                return f"this run's {k.replace('_', ' ')} is not built yet"
            return f"its {k} is {have.get(k)!r}, this run wants {want.get(k)!r}"
    if want.get("accel") not in ("auto", have.get("accel")):
        return f"its accel is {have.get('accel')!r}, this run wants {want['accel']!r}"
    return None


def lab_running() -> bool:
    return NestedLab.read_state(lab_dir())[0] is not None


def mismatch_of_running(want: dict) -> tuple[dict | None, str | None]:
    """(state of the running lab or None, why a command of shape ``want`` (wanted_shape)
    cannot use it, or None)."""
    state, _ = NestedLab.read_state(lab_dir())
    if state is None:
        return None, None
    return state, shape_mismatch(state.get("shape"), want)


@contextlib.contextmanager
def persistent_lab(o: dict, progress, *, fresh: bool, hwtrace_plugin: str | None = None,
                   lock_wait: float = 2):
    """The running ``vmlab lab up`` lab, attached and share-locked for the duration, when
    it matches (else None, after one line saying why, when a lab is up at all)."""
    st = lab_dir()
    want = wanted_shape(o, hwtrace_plugin)   # hashes the agent and the image recipes: once
    state, why = mismatch_of_running(want)
    if state is None:
        yield None
        return
    if fresh:
        progress("a lab is up ('vmlab lab up'); --fresh: booting one of this run's own")
        yield None
        return
    if why:
        progress(f"not using the running lab (pid {state['pid']}): {why}; booting one of this "
                 f"run's own")
        yield None
        return
    try:
        lock = locked(st / "lab.lock", "the persistent lab", timeout=lock_wait, shared=True)
        lock.__enter__()
    except WaitTimeout:
        progress("the running lab is being started or stopped; booting one of this run's own")
        yield None
        return
    # the lab may have gone down (or been replaced) while we waited for the lock
    state, why = mismatch_of_running(want)
    if state is None or why:
        lock.__exit__(None, None, None)
        progress(f"the running lab changed while this run waited ({why or 'it is down'}); "
                 f"booting one of this run's own")
        yield None
        return
    try:
        try:
            lab = NestedLab.attach(st)
        except Exception as e:   # recorded alive, yet not answering: not ours to fix
            progress(f"could not attach to the running lab ({e}); booting one of this run's own")
            yield None
            return
        lab.reused_from = str(st)
        progress(f"running in the lab that 'vmlab lab up' started (pid {state['pid']}, "
                 f"{state['accel']}); --fresh boots one of this run's own")
        try:
            yield lab
        finally:
            if lab.session is not None:
                lab.session.close()
    finally:
        lock.__exit__(None, None, None)


def lab_up(o: dict, progress, claimed: list | None = None) -> bool:
    """Boot the persistent lab (``vmlab lab up``, ``vmlab run --keep``): detached, its state
    in lab_dir(). False, after saying so, when one is up already. ``claimed`` gets an entry
    once the lab to come is this call's (the lock held, no lab up): a caller interrupted
    after that stops what came up, one interrupted before (waiting for the lock behind
    another command's boot) must not."""
    from .stack import lab_images, lab_options
    st = lab_dir()
    with locked(st / "lab.lock", "the persistent lab"):
        state, _ = NestedLab.read_state(st)
        if state is not None:
            progress(f"a lab is already up (pid {state['pid']}); 'vmlab lab down' first")
            return False
        if claimed is not None:
            claimed.append(True)
        for stale in ("state.json", "guest.json"):
            (st / stale).unlink(missing_ok=True)
        lab_img, guest_img = lab_images(o["kernel"], o["guest_kernel"], build=not o["no_build"],
                                        progress=progress, qemu=o["qemu"], base=o["lab_base"])
        lab = NestedLab(st, lab_options(o), detach=True, rundir=st)
        lab.up(lab_img, guest_img, progress)
        lab.session.close()
    return True


def lab_down(progress) -> bool:
    """Stop the persistent lab from its state file alone (a hung one too); False when none
    was up."""
    st = lab_dir()
    with locked(st / "lab.lock", "the persistent lab"):
        return NestedLab.stop_recorded(st, progress)


def guest_identity(lab) -> tuple[str, int]:
    """A guest name and a free lab-local SSH port of this process's own, for a guest in a
    lab that other commands may share."""
    rc, out, _ = lab.run("python3 -c 'import socket; s=socket.socket(); "
                         "s.bind((\"127.0.0.1\", 0)); print(s.getsockname()[1])'", timeout=30)
    return f"run{os.getpid()}", int(out.strip())


# --- the guest of `vmlab guest up` -------------------------------------------------------
def guest_state(st) -> "os.PathLike":
    return st / "guest.json"


def record_guest(st, guest: Guest, hotplug_ports: int) -> None:
    write_atomic(guest_state(st), json.dumps({"pid": guest.pid, "opts": asdict(guest.opts),
                                              "hotplug_ports": hotplug_ports, "boot_args": BOOT_ARGS}))


def guest_attach(lab, workdir=None) -> tuple[Guest, dict]:
    """The recorded guest of the lab, not yet connected, and its record; UserError (exit 2)
    when none is recorded or the record is not this vmlab's."""
    gs = guest_state(lab.workdir)
    rec = read_json(gs)
    if rec is None or not isinstance(rec.get("opts"), dict) or not isinstance(rec.get("pid"), int):
        raise UserError("no guest is up; start one with 'vmlab guest up'" if not gs.exists() else
                        f"no guest is up: {gs} is corrupt; 'vmlab guest down' removes it")
    known = {f.name for f in fields(GuestOptions)}
    if set(rec["opts"]) - known:
        raise UserError(f"no guest is up: {gs} is from another vmlab (options "
                        f"{sorted(set(rec['opts']) - known)}); 'vmlab guest down' removes it")
    g = Guest(lab, GuestOptions(**rec["opts"]), workdir or lab.workdir)
    g.pid = rec["pid"]
    return g, rec


def guest_doubt(result: dict) -> str | None:
    """Why a run leaves the guest it shared in doubt (so no later run may use it), or None:
    a run that failed or could not test, a VMM fault, a failed kernel health check, a
    device not known gone. An interrupted run is no doubt by itself: its teardown still
    kills its agents and unplugs, and says so when the unplug is not confirmed."""
    g = result.get("guest") or {}
    if result.get("status") not in ("finished", "not_applicable", "interrupted"):
        return f"status {result.get('status')}"
    if result.get("vmm_fault"):
        return "a VMM fault"
    if result.get("kernel_health_failed"):
        return "a kernel health check failed"
    if result.get("kernel_health_error"):
        return f"the kernels' health could not be checked ({result['kernel_health_error']})"
    if g.get("unplug_error"):
        return f"the unplug did not finish ({g['unplug_error']})"
    return None


def mark_guest_in_doubt(st, why: str) -> None:
    """Say in the guest's record that a run left it in doubt: later runs refuse it."""
    rec = read_json(guest_state(st))
    if isinstance(rec, dict):
        rec["doubt"] = why
        write_atomic(guest_state(st), json.dumps(rec))


@contextlib.contextmanager
def persistent_guest(lab, want: GuestOptions, blocker: str | None, progress, workdir, *,
                     lock_wait: float = 2):
    """The guest of ``vmlab guest up`` in ``lab`` (a reused persistent lab), connected and
    exclusively locked for the duration, when the run may use it (else None, after one
    line saying why, when such a guest is up at all). ``blocker``: why this experiment's
    buffer cannot arrive by hot-plug, or None. The guest is disconnected, never stopped."""
    st = lab_dir()
    if lab is None or not lab.reused_from or not guest_state(st).exists():
        yield None
        return
    if blocker is None:   # a guest that cannot serve this run is said as such, busy or not
        try:
            blocker = guest_mismatch(guest_attach(lab)[1]["opts"], want)
        except UserError:
            pass             # said after the lock, with the rest
    if blocker:
        progress(f"not using the running guest: {blocker}; booting one of this run's own")
        yield None
        return
    try:
        lock = locked(st / "guest.lock", "the persistent guest", timeout=lock_wait)
        lock.__enter__()
    except WaitTimeout:
        progress("the running guest is in use by another command; booting one of this run's own")
        yield None
        return
    g = None
    try:
        why = None
        try:
            g, rec = guest_attach(lab, workdir)
        except UserError as e:
            why = str(e)
        if why is None:
            why = guest_mismatch(rec["opts"], want)
        if why is None and rec.get("doubt"):
            why = (f"an earlier run left it in doubt ({rec['doubt']}); 'vmlab guest down' and "
                   f"'vmlab guest up' replace it")
        if why is None and not rec.get("hotplug_ports"):
            why = "it was booted without hot-plug ports (by an older vmlab)"
        if why is None and rec.get("boot_args") != BOOT_ARGS:
            # a guest kernel argument may decide where a hot-plugged BAR lands
            why = "its kernel was booted with other fixed arguments (by an older vmlab)"
        if why is None and rec["opts"].get("extra_qemu_args") != root_port_args():
            # the ports' reserved windows decide where a hot-plugged BAR lands
            why = "its hot-plug ports were made another way (by an older vmlab)"
        if why is None:
            try:
                g.connect(timeout=30)
            except Exception as e:
                # asked only now: on the way in it is an exec in the lab, and a guest
                # that answers SSH is running
                why = (f"its QEMU (lab pid {g.pid}) is gone; 'vmlab guest down' clears it"
                       if not g.alive() else f"could not connect to it ({e})")
        if why is None:
            try:
                status = g.cmd("query-status").get("status")
                if status != "running":
                    why = (f"its QEMU is {status} (an earlier run's VMM fault?); 'vmlab guest down' "
                           f"and 'vmlab guest up' replace it")
                elif len(free_ports(g)) != rec["hotplug_ports"]:
                    why = "a hot-plug port still holds a device (a buffer never given back)"
            except Exception as e:
                why = f"its QMP does not answer ({type(e).__name__}: {e})"
        if why:
            progress(f"not using the running guest: {why}; booting one of this run's own")
            yield None
            return
        g.reused_from = str(guest_state(st))
        progress(f"running in the guest that 'vmlab guest up' started (lab pid {g.pid}); its "
                 f"buffer arrives by hot-plug")
        yield g
    finally:
        try:
            if g is not None:
                g.disconnect()
        finally:
            lock.__exit__(None, None, None)
