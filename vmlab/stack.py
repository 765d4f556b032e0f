"""Lab host + guest brought up together for one command, and torn down together.

Teardown order is the reverse of bring-up; it runs on normal exit, errors, Ctrl-C and
SIGTERM (the CLI turns SIGTERM into an exception), every VM's logs land in the results
directory before it is stopped, and no teardown step may raise over the error it cleans
up after (a dead transport is expected then, not exceptional).
"""
from __future__ import annotations

import logging
from pathlib import Path

from . import images, proc
from .errors import BootFailure
from .guest import Guest, GuestOptions
from .lab import LabOptions, NestedLab
from .paths import set_aside

log = logging.getLogger("vmlab.stack")
LAB_BOOT_ATTEMPTS = 2
GUEST_BOOT_ATTEMPTS = 2


def lab_options(o: dict, hwtrace_plugin: str | None = None) -> LabOptions:
    """LabOptions from resolved options (``vmlab.config.resolve``)."""
    return LabOptions(accel=o["accel"], kernel=o["kernel"], qemu=o.get("qemu", "default"),
                      base=o.get("lab_base"),
                      append=o.get("lab_append") or "",
                      kind=o.get("lab_kind", "nested"), box=o.get("box"),
                      memory_mb=o["lab_memory_mb"], boot_timeout=o["lab_boot_timeout"],
                      extra_qemu_args=tuple(o.get("lab_qemu_args") or ()),
                      hwtrace_plugin=hwtrace_plugin,
                      accel_why={"oracle hw": "the hardware oracle is a TCG plugin",
                                 "config": "chosen in the experiment (lab.accel)"}.get(
                          o.get("sources", {}).get("accel"), "chosen with --accel"))


def lab_images(kernel: str, guest_kernel: str | None, *, build: bool, progress,
               need_guest: bool = True, qemu: str = "default", base: str | None = None,
               need_lab: bool = True) -> tuple[images.Image | None, images.Image | None]:
    """The lab image for ``kernel`` (with the QEMU ``qemu`` names) and the guest image for
    ``guest_kernel``: built when missing, or ImageMissing (exit 2) when building is not
    allowed. A test box (``need_lab`` False) takes only the guest image."""
    get = (lambda r: images.ensure(r, progress)[0]) if build else images.require
    lab_img = get(images.recipe("lab", kernel, qemu, base)) if need_lab else None
    guest_img = get(images.recipe("guest", guest_kernel or "trixie")) if need_guest else None
    return lab_img, guest_img


class Stack:
    def __init__(self, workdir: Path, progress, lab_opts: LabOptions,
                 guest_opts: GuestOptions | None = None, *, guest_kernel: str | None = None,
                 build: bool = True, lab_boot_attempts: int = LAB_BOOT_ATTEMPTS,
                 shared_lab: NestedLab | None = None, shared_guest: Guest | None = None,
                 guest_boot_attempts: int = GUEST_BOOT_ATTEMPTS):
        """``shared_lab``: a lab that is already up and belongs to the caller (``vmlab
        matrix`` runs many experiments in one lab): up_lab() returns it and down() leaves
        it running; only the guest is this stack's. ``shared_guest``: a guest of that
        lab, up and the caller's too: up_guest() returns it and down() leaves it."""
        self.workdir = Path(workdir)
        self.progress = progress
        self.lab_opts = lab_opts
        self.guest_opts = guest_opts or GuestOptions()
        self.guest_kernel = guest_kernel
        self.build = build
        self.shared_lab = shared_lab
        self.shared_guest = shared_guest
        self.lab: NestedLab | None = shared_lab
        self.guest: Guest | None = None
        self.lab_image = self.guest_image = None
        self.boot_failures: list[dict] = []   # lab boots that failed and were retried
        self.guest_boot_failures: list[dict] = []   # guest boots that failed and were retried
        self.lab_dmesg_saved = False   # by save_lab_dmesg (the host agent), not down()'s exec
        self.guest_boot_attempts = guest_boot_attempts  # 1 for benches that count flakes
        self.lab_boot_attempts = lab_boot_attempts  # 1 for benches that count flakes

    def up_lab(self) -> NestedLab:
        """Boot the lab; a started lab that does not come up (a panic or a hang: TCG's
        SVM emulation flakes about once in 80 boots) is booted once more, and counted in
        ``boot_failures``. A QEMU that refuses its arguments is not retried."""
        if self.shared_lab is not None:
            return self.shared_lab
        if self.lab_image is None:   # found once: a reboot (the matrix) boots the same images
            self.lab_image, self.guest_image = lab_images(self.lab_opts.kernel, self.guest_kernel, base=self.lab_opts.base,
                                                          build=self.build, progress=self.progress,
                                                          qemu=self.lab_opts.qemu,
                                                          need_lab=self.lab_opts.kind == "nested")
        if self.lab_opts.kind in ("ssh", "local"):
            # the user's box (or this machine), booted as it is: nothing to retry
            from .box_lab import BoxLab, BoxSpec
            box = self.lab_opts.box
            lab = BoxLab(self.workdir, None if self.lab_opts.kind == "local" else
                         BoxSpec(**{**box, "key": Path(box["key"]), "known_hosts": Path(box["known_hosts"])}))
            lab.up(None, self.guest_image, self.progress)
            self.lab = lab
            return lab
        for attempt in range(1, self.lab_boot_attempts + 1):
            self.lab = NestedLab(self.workdir, self.lab_opts)
            try:
                self.lab.up(self.lab_image, self.guest_image, self.progress)
                return self.lab
            except BootFailure as e:
                self.lab = None
                if not e.retryable or attempt == self.lab_boot_attempts:
                    if self.boot_failures:
                        e.args = (f"{e} (attempt {attempt} of {attempt}; attempt 1: "
                                  f"{self.boot_failures[0]['cause']})",)
                    raise
                kept = self._keep_attempt_logs(attempt)
                self.boot_failures.append({"attempt": attempt, "cause": e.cause, "logs": kept})
                self.progress(f"lab host did not come up (attempt {attempt} of "
                              f"{self.lab_boot_attempts}): {e.cause} (console: {kept[0] if kept else '-'}); "
                              f"booting it again")
        raise AssertionError("unreachable")

    def lab_qemu_version(self) -> str | None:
        """The QEMU package version the lab image carries (its manifest), found or built
        as for a boot, before anything boots."""
        if self.shared_lab is not None or self.lab_opts.kind != "nested":
            return None   # a box's QEMU is known once the box is reached
        if self.lab_image is None:
            self.lab_image, self.guest_image = lab_images(self.lab_opts.kernel, self.guest_kernel, base=self.lab_opts.base,
                                                          build=self.build, progress=self.progress,
                                                          qemu=self.lab_opts.qemu,
                                                          need_lab=self.lab_opts.kind == "nested")
        return self.lab_image.manifest.get("qemu_version")

    def _keep_attempt_logs(self, attempt: int) -> list[str]:
        return set_aside(self.workdir, ("lab-console.log", "lab.qemu.log"), f"attempt{attempt}")

    def up_guest(self) -> Guest:
        if self.shared_guest is not None:
            self.guest = self.shared_guest
            return self.guest
        attempts = self.guest_boot_attempts
        for attempt in range(1, attempts + 1):
            self.guest = Guest(self.lab, self.guest_opts, self.workdir)
            try:
                self.guest.up(self.progress)
                return self.guest
            except BootFailure as e:
                self.guest = None
                if not e.retryable or attempt == attempts:
                    raise
                # a TCG artifact (an oops in the guest's early boot, about 1 in 80 boots):
                # once more, the failed attempt's console kept and counted
                name = self.guest_opts.name
                kept = set_aside(self.workdir, (f"{name}-console.log", f"{name}.qemu.log"),
                                 f"attempt{attempt}")
                self.guest_boot_failures.append({"attempt": attempt, "cause": e.cause, "logs": kept})
                self.progress(f"guest did not come up (attempt {attempt} of {attempts}): "
                              f"{e.cause}; booting it again")
        raise AssertionError("unreachable")

    def up(self) -> "Stack":
        self.up_lab()
        self.up_guest()
        return self

    def _save_dmesg(self, vm, name: str) -> None:
        if vm is None or getattr(vm, "session", None) is None or not vm.session.active():
            return
        try:
            _, out, _ = vm.run("dmesg", timeout=60, check=False)
            (self.workdir / name).write_text(out)
        except Exception as e:
            log.warning("%s: %s", name, e)

    def save_lab_dmesg(self, agent) -> dict | None:
        """lab-dmesg.log from the lab's host agent as it shuts down (its buffers, trace
        and control file closed first, so what they print is in it; /dev/kmsg read in
        the lab: a request, where down()'s exec of dmesg costs the TCG lab 0.2 s). The
        agent's answer (op_shutdown), None when it gave none."""
        try:
            ans = agent.request("shutdown", timeout=60)
        except Exception as e:      # down() takes the exec instead
            log.warning("lab-dmesg.log from the host agent: %s", e)
            return None
        (self.workdir / "lab-dmesg.log").write_text(ans["text"])
        self.lab_dmesg_saved = True
        return ans

    def down(self) -> None:
        try:
            if self.guest is not None:
                self._save_dmesg(self.guest, f"{self.guest.opts.name}-dmesg.log")
                if self.guest is not self.shared_guest:
                    self.guest.down()
                self.guest = None
        finally:
            if self.lab is not None:
                if not self.lab_dmesg_saved:
                    self._save_dmesg(self.lab, "lab-dmesg.log")
                if self.lab is not self.shared_lab:
                    self.lab.down()
                self.lab = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        with proc.signals_deferred():
            self.down()
