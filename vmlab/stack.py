"""Lab host + guest brought up together for one command, and torn down together.

Teardown order is the reverse of bring-up; it runs on normal exit, errors, Ctrl-C and
SIGTERM (the CLI turns SIGTERM into an exception), and every VM's logs land in the
results directory before it is stopped.
"""
from __future__ import annotations

import logging
from pathlib import Path

from .guest import Guest, GuestOptions
from .lab import LabOptions, NestedLab

log = logging.getLogger("vmlab.stack")


class Stack:
    def __init__(self, args, workdir: Path, progress, guest_opts: GuestOptions | None = None,
                 lab_opts: LabOptions | None = None):
        self.args = args
        self.workdir = Path(workdir)
        self.progress = progress
        self.guest_opts = guest_opts or GuestOptions()
        self.lab_opts = lab_opts
        self.lab: NestedLab | None = None
        self.guest: Guest | None = None
        self.lab_image = self.guest_image = None

    def up_lab(self) -> NestedLab:
        from .cli import _images, _lab_opts
        self.lab_image, self.guest_image = _images(self.args)
        self.lab = NestedLab(self.workdir, self.lab_opts or _lab_opts(self.args))
        self.lab.up(self.lab_image, self.guest_image, self.progress)
        return self.lab

    def up_guest(self) -> Guest:
        self.guest = Guest(self.lab, self.guest_opts, self.workdir)
        self.guest.up(self.progress)
        return self.guest

    def up(self) -> "Stack":
        self.up_lab()
        self.up_guest()
        return self

    def collect_lab_logs(self) -> None:
        if self.lab and self.lab.session:
            try:
                _, out, _ = self.lab.run("dmesg", timeout=60, check=False)
                (self.workdir / "lab-dmesg.log").write_text(out)
            except Exception as e:
                log.warning("lab dmesg: %s", e)

    def down(self) -> None:
        try:
            if self.guest is not None:
                if self.guest.session is not None:
                    try:
                        _, out, _ = self.guest.run("dmesg", timeout=60, check=False)
                        (self.workdir / f"{self.guest.opts.name}-dmesg.log").write_text(out)
                    except Exception as e:
                        log.warning("guest dmesg: %s", e)
                self.guest.down()
                self.guest = None
        finally:
            if self.lab is not None:
                self.collect_lab_logs()
                self.lab.down()
                self.lab = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.down()
