"""`vmlab matrix`: every catalog entry on every lab kernel, one cell each.

Each lab kernel is booted once and kept for all the entries that agree on how the lab
runs (accelerator, memory, QEMU, oracle). In it one guest with hot-plug root ports is kept
across cells (``CellGuest``): a cell whose guest would boot the same way and whose buffer
can arrive by hot-plug runs in it, its buffer plugged and unplugged, so such a cell costs
neither a lab nor a guest boot; any other cell boots a guest of its own. A lab that stops
answering between cells is booted again. Every cell is a full `vmlab run` results directory under
``<out>/<kernel>/<entry>/`` (kept whatever the outcome); the matrix writes ``matrix.json``,
``junit.xml`` (one testcase per cell, ``<entry>[<kernel>]``) and ``report.html``.

Exit status: 0 when every applicable cell met its expectation; 1 when one did not (or
its run failed); else 125 when a cell could not be tested (its lab did not come up; the
cell is ``match: false``) or no cell was applicable; 2 for bad input (before anything
boots).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from . import catalog, proc, report, strategies
from . import config as cfgmod
from .errors import CouldNotTest, ConfigError, UserError
from .paths import set_aside
from .reuse import guest_doubt
from .stack import Stack, lab_images, lab_options

log = logging.getLogger("vmlab.matrix")
DEFAULT_KERNELS = ("trixie", "trixie-backports")
# a cell that could not test (its guest did not boot; the TCG lab's artifacts) runs again,
# up to this many times in all; every attempt's results are kept
CELL_ATTEMPTS = 3


class CellGuest:
    """The matrix's guest in one lab, shared by the cells that can take their buffer by
    hot-plug. Booted at the first such cell, with that cell's guest shape and hot-plug
    ports; kept while later cells want the same shape; stopped when a cell wants another,
    and when a cell leaves it in doubt (anything but a finished or not-applicable run, a
    VMM fault, a failed kernel health check, a device it did not give back), so no cell
    runs in a guest an earlier cell may have damaged."""

    NAME, PORT = "cells", 2223     # never "guest": _CLEAN_LAB stops those between cells

    def __init__(self, workdir: Path, progress, enabled: bool = True):
        self.workdir, self.progress, self.enabled = workdir, progress, enabled
        self.guest = None

    def get(self, lab, exp, o):
        """The guest for this cell, or None: the cell boots its own."""
        from dataclasses import asdict, replace
        from .experiment import guest_options, hotplug_blocker
        from .guest import Guest
        from .hotplug import root_port_args
        from .guest import guest_mismatch
        if not self.enabled and getattr(lab, "resident_guest", None) is not None:
            lab.drop_resident()     # a lab booted again brought one: not used here, not kept
        if not self.enabled or hotplug_blocker(exp, o):
            return None
        want = guest_options(exp, o)[0]
        if self.guest is not None and self.guest.lab is not lab:
            self.guest = None          # the lab was booted again: its guests went with it
        if self.guest is None and getattr(lab, "resident_guest", None) is not None:
            self._take_resident(lab, want)
            if not self.enabled:
                return None
        if self.guest is not None:
            why = guest_mismatch(asdict(self.guest.opts), want)
            if why is None and not self.guest.alive():
                why = "its QEMU is gone"
            if why:
                self.progress(f"matrix guest: {why}; stopping it")
                self.stop()
        if self.guest is None:
            g = Guest(lab, replace(want, name=self.NAME, ssh_port=self.PORT,
                                   extra_qemu_args=root_port_args()), self.workdir)
            try:
                g.up(self.progress)
            except Exception as e:   # Guest.up stops what it started
                self.progress(f"matrix guest did not come up ({type(e).__name__}: {e}); the cell "
                              f"boots a guest of its own")
                return None
            g.reused_from = f"the matrix's guest '{self.NAME}' of this lab"
            self.guest = g
        return self.guest

    def _take_resident(self, lab, want) -> None:
        """The guest saved with the lab's snapshot (``resident_options``) becomes this
        lab's matrix guest when it has the cell's shape; else it is stopped."""
        from .lab import ResidentNotGone
        try:
            g = lab.take_resident(want, self.progress)
        except ResidentNotGone as e:
            # its name and port may still be taken: no shared guest in this lab
            self.progress(f"matrix guest: {e}; the cells of this lab boot guests of their own")
            self.enabled = False
            return
        if g is None:
            return
        g.reused_from = f"the matrix's guest '{self.NAME}' of this lab (saved with its snapshot)"
        self.guest = g

    def resident_options(self, members):
        """The guest a new lab's snapshot should hold for these cells: the first cell
        that takes a shared guest, in this class's name and port; None when none does."""
        from dataclasses import replace
        from .experiment import guest_options, hotplug_blocker, resident_options
        if not self.enabled:
            return None
        for exp, o in members:
            if not hotplug_blocker(exp, o):
                return replace(resident_options(guest_options(exp, o)[0]), name=self.NAME,
                               ssh_port=self.PORT)
        return None

    def after(self, result: dict) -> None:
        """Keep the guest only when the cell left it as it found it."""
        if self.guest is None:
            return
        doubt = guest_doubt(result)
        if doubt:
            self.progress(f"matrix guest: the cell ended with {doubt}; stopping it")
            self.stop()

    def stop(self) -> None:
        if self.guest is not None:
            g, self.guest = self.guest, None
            g.down()

    def forget(self) -> None:
        """A guest whose boot or check failed half-way: stopped if it got that far."""
        try:
            self.stop()
        except Exception as e:
            log.warning("matrix guest: stopping it: %s", e)
            self.guest = None


def parse_kernels(text: str | None) -> list[str]:
    if not text:
        return list(DEFAULT_KERNELS)
    ks = [k.strip() for k in text.split(",")]
    for k in ks:
        if k not in cfgmod.KERNEL_SUITES and not k.startswith(("deb:", "tree:")):
            raise ConfigError("<command line>", "--kernels", f"{k!r} is not a lab kernel "
                              f"(one of: {', '.join(cfgmod.KERNEL_SUITES)}, deb:PATH, tree:DIR)")
    if len(set(ks)) != len(ks):
        raise ConfigError("<command line>", "--kernels", f"{text!r} names a kernel twice")
    return ks


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``K/N`` (1 <= K <= N) -> (K, N); None when not given."""
    if text is None:
        return None
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        k = n = 0
    if not 1 <= k <= n <= 1000:
        raise ConfigError("<command line>", "--shard", f"{text!r}: want K/N with 1 <= K <= N <= 1000, "
                          f"e.g. 2/4")
    return k, n


def shard(planned: dict, k: int, n: int) -> dict:
    """Shard ``k`` of ``n``: the cells in kernel-major order (kernels as given, entries as
    listed) cut into ``n`` contiguous runs of near-equal length. Every machine computes
    the same cut from the same catalog and --kernels, the shards are disjoint and cover
    the matrix, and a shard spans as few kernels (lab boots) as the cut allows."""
    cells = [(kern, i) for kern, lst in planned.items() for i in range(len(lst))]
    lo, hi = (k - 1) * len(cells) // n, k * len(cells) // n
    out: dict = {}
    for kern, i in cells[lo:hi]:
        out.setdefault(kern, []).append(planned[kern][i])
    return out


def _lab_key(o: dict) -> tuple:
    """Entries whose resolved settings agree on this share one lab boot."""
    return (o["accel"], o["qemu"], o["lab_memory_mb"], o["lab_boot_timeout"],
            tuple(o["lab_qemu_args"]), "hw" in o["oracle"], o["guest_kernel"])


def cell_record(exp: cfgmod.Experiment, kernel: str, res: dict, cell_dir: Path,
                seconds: float) -> dict:
    """One matrix cell from the run's results.json: match is True/False, or None (with
    ``reason``) when the entry does not apply to this kernel."""
    lab = res.get("lab") or {}
    checks = ([res["baseline"]] if "baseline" in res else []) + list(res.get("moves") or [])
    rec = {"entry": exp.name, "title": exp.raw.get("title"), "links": exp.raw.get("links"),
           "kernel_suite": kernel, "kernel_release": lab.get("kernel"),
           "kernel_package": lab.get("kernel_package"), "kernel_cmdline": lab.get("cmdline"),
           "module_params": lab.get("module_params"), "qemu": lab.get("qemu"),
           "verdicts": [c.get("verdict") for c in checks],
           "expected": [c.get("expected") for c in checks],
           "kvm_evidence": [m.get("kvm_evidence", {}).get("summary") for m in res.get("moves") or []
                            if m.get("kvm_evidence")],
           "results": str(cell_dir), "reproduce": str(cell_dir / "reproduce.sh"),
           "seconds": round(seconds, 2), "status": res.get("status")}
    if res.get("not_applicable"):
        rec.update(match=None, reason=res["not_applicable"])
    elif res.get("status") != "finished":
        # could_not_test (the guest did not come up): match false, and exit 125 unless
        # another cell missed; an error of vmlab's own: match false
        rec.update(match=False, reason=res.get("error") or f"status {res.get('status')}")
    else:
        rec["match"] = bool(res.get("passed"))
        if not rec["match"]:
            bad = [f"{i}: {c.get('verdict')} (expected {'/'.join(c.get('expected') or [])})"
                   for i, c in enumerate(checks) if not c.get("passed")]
            health = res.get("kernel_health_failed")
            rec["reason"] = "; ".join(bad[:4]) or (
                f"kernel health: {', '.join(health)}" if health else
                "virtio-gpu round trip failed" if res.get("virtio_gpu") and not res["virtio_gpu"].get("passed")
                else "not passed")
    return rec


def _failed_cell(exp, kernel, cell_dir: Path, why: str, status: str) -> dict:
    return {"entry": exp.name, "title": exp.raw.get("title"), "links": exp.raw.get("links"),
            "kernel_suite": kernel, "kernel_release": None, "verdicts": [], "expected": [],
            "kvm_evidence": [], "results": str(cell_dir), "seconds": 0.0, "status": status,
            "match": False, "reason": why}


def plan(entries, kernels, args, box: dict | None = None) -> dict[str, list[tuple[cfgmod.Experiment, dict]]]:
    """Every (kernel, entry) resolved (the kernel as if given with --kernel), before
    anything is created or booted: bad input is exit 2 with nothing started. With a
    ``box`` (``--lab FILE``) every entry runs there, on the box's own kernel: one column,
    named by ``cfgmod.box_label``."""
    if box is not None:
        on_box = [cfgmod.Experiment(e.path, {**e.raw, "lab": {**(e.raw.get("lab") or {}), **box}})
                  for e in entries]
        return {cfgmod.box_label(box): [(e, cfgmod.resolve(e, args)) for e in on_box]}
    out = {}
    for k in kernels:
        ns = argparse.Namespace(**{**vars(args), "kernel": k})
        out[k] = [(e, cfgmod.resolve(e, ns)) for e in entries]
    return out


class Matrix:
    def __init__(self, planned: dict, out: Path, progress, args=None, *, entries=None,
                 shard_of: tuple[int, int] | None = None, box: dict | None = None):
        """``entries``: the catalog's names in order (a shard's plan may lack some);
        ``shard_of``: (K, N) when ``planned`` is shard K of N."""
        self.plan, self.out, self.progress = planned, out, progress
        self.args = args       # the command line, for each cell's reproduce.sh
        self.box = box         # --lab FILE: every cell on that box (its kernel, its QEMU)
        self.cells: list[dict] = []
        if entries is None:
            entries = [e.name for e, _ in next(iter(planned.values()))]
        self.result = {"started": datetime.now(timezone.utc).isoformat(), "status": "running",
                       "kernels": list(planned), "entries": list(entries), "cells": self.cells}
        if shard_of:
            self.result["shard"] = f"{shard_of[0]}/{shard_of[1]}"

    def save(self) -> None:
        tmp = self.out / "matrix.json.tmp"
        tmp.write_text(json.dumps(self.result, indent=2, sort_keys=True, default=str) + "\n")
        tmp.rename(self.out / "matrix.json")

    def run(self) -> int:
        from .experiment import Run
        total = sum(len(v) for v in self.plan.values())
        groups = {k: self._groups(planned) for k, planned in self.plan.items()}
        try:
            # every image first: a missing one under --no-build is exit 2 before any boot
            images = {(k, gi): lab_images(ms[0][1]["kernel"], ms[0][1]["guest_kernel"],
                                          build=not ms[0][1]["no_build"],
                                          progress=self.progress, qemu=ms[0][1]["qemu"],
                                          base=ms[0][1]["lab_base"],
                                          need_lab=ms[0][1]["lab_kind"] == "nested")
                      for k, gs in groups.items() for gi, ms in enumerate(gs)}
            for kernel, gs in groups.items():
                for gi, members in enumerate(gs):
                    self._run_group(kernel, gi, members, total, Run, images[(kernel, gi)])
            self.result["status"] = "finished"
        except BaseException as e:
            self.result["status"] = "interrupted" if isinstance(e, KeyboardInterrupt) or \
                type(e).__name__ == "Terminated" else "error"
            self.result["error"] = f"{type(e).__name__}: {e}"
            raise
        finally:
            self.finish()
        if not self.plan:
            return 0       # an empty shard: nothing to run, nothing failed
        rc = exit_status(self.cells)
        if rc == 125:
            self.progress("matrix: a lab did not come up, or no cell was applicable")
        return rc

    @staticmethod
    def _groups(planned) -> list[list]:
        groups: dict[tuple, list] = {}
        for exp, o in planned:
            groups.setdefault(_lab_key(o), []).append((exp, o))
        return list(groups.values())

    def _reproducer(self, cell_dir: Path, exp, kernel: str) -> None:
        from .run_dir import cli_passthrough, write_reproducer
        if self.box is not None:
            # the entry with the box as its lab (config.yaml), on the box's own kernel
            write_reproducer(cell_dir, exp, cli_passthrough(self.args), raw=exp.raw)
        else:
            write_reproducer(cell_dir, exp, cli_passthrough(self.args, kernel=kernel))

    def _run_group(self, kernel, gi, members, total, Run, images) -> None:
        kdir = self.out / kernel / (f"lab-{gi}" if gi else "lab")
        kdir.mkdir(parents=True)
        o0 = members[0][1]
        plugin = None
        if "hw" in o0["oracle"]:
            from . import hwtrace
            plugin = str(hwtrace.plugin_path(self.progress))
        cell_guest = CellGuest(kdir, self.progress,
                               enabled=not getattr(self.args, "own_guests", False))
        lab_opts = lab_options(o0, hwtrace_plugin=plugin)
        if self.box is None:
            # a restored lab then brings the cells' shared guest with it
            lab_opts = replace(lab_opts, resident_guest=cell_guest.resident_options(members))
        stack = Stack(kdir, self.progress, lab_opts,
                      guest_kernel=o0["guest_kernel"], build=not o0["no_build"])
        stack.lab_image, stack.guest_image = images
        lab_failed: str | None = None
        boots = 0
        try:
            for exp, o in members:
                n = len(self.cells) + 1
                cell_dir = self.out / kernel / exp.name
                cell_dir.mkdir(parents=True)
                self._reproducer(cell_dir, exp, kernel)
                if lab_failed is None and (stack.lab is None or not _clean_lab(stack.lab, self.progress)):
                    if stack.lab is not None:
                        # keep the console of the lab that stopped answering, then boot anew
                        self.progress(f"lab {kernel} stopped answering: booting it again")
                        with proc.signals_deferred():
                            stack.down()
                        set_aside(kdir, ("lab-console.log", "lab.qemu.log", "lab-dmesg.log"), f"boot{boots}")
                    try:
                        boots += 1
                        stack.up_lab()
                    except CouldNotTest as e:
                        lab_failed = f"the lab did not come up: {e}"
                if lab_failed is not None:
                    # one lab that does not boot is enough: the rest of its cells say so
                    self._add(_failed_cell(exp, kernel, cell_dir, lab_failed, "could_not_test"), n, total)
                    continue
                t0 = time.monotonic()
                self.progress(f"cell {n}/{total} {exp.name}[{kernel}]: running")
                self.steps(n - 1, total)
                r = self._run_cell(Run, exp, o, cell_dir, stack.lab, cell_guest)
                retried = []
                while (r.result.get("status") == "could_not_test" and len(retried) < CELL_ATTEMPTS - 1
                       and _clean_lab(stack.lab, self.progress)):
                    # a guest that did not come up, or the TCG lab's EXITINTINFO artifact:
                    # again, every earlier attempt kept beside it
                    kept = cell_dir.with_name(f"{exp.name}.attempt{len(retried) + 1}")
                    cell_dir.rename(kept)
                    retried.append({"error": r.result.get("error"), "results": str(kept)})
                    self.progress(f"cell {n}/{total} {exp.name}[{kernel}]: could not test "
                                  f"({r.result.get('error')}); attempt {len(retried) + 1} of {CELL_ATTEMPTS}")
                    cell_dir.mkdir()
                    self._reproducer(cell_dir, exp, kernel)
                    r = self._run_cell(Run, exp, o, cell_dir, stack.lab, cell_guest)
                    r.result["retried_after"] = retried
                    r.save()
                cell = cell_record(exp, kernel, r.result, cell_dir, time.monotonic() - t0)
                cell["retried_after"] = retried
                self._add(cell, n, total)
        finally:
            with proc.signals_deferred():
                try:
                    cell_guest.stop()
                finally:
                    stack.down()
            if stack.boot_failures:
                self.result.setdefault("lab_boot_failures", []).append(
                    {"kernel": kernel, "failures": stack.boot_failures})

    def _run_cell(self, Run, exp, o, cell_dir: Path, lab, cell_guest: CellGuest):
        try:
            guest = cell_guest.get(lab, exp, o)
        except Exception as e:   # the shared guest's trouble is not this cell's: it boots its own
            self.progress(f"matrix guest: {type(e).__name__}: {e}; the cell boots a guest of its own")
            cell_guest.forget()
            guest = None
        r = Run(exp, o, cell_dir, self.progress, shared_lab=lab, shared_guest=guest,
                stop_guest_in_doubt=True)
        r.save()
        try:
            r.run()
        except CouldNotTest:
            pass     # NotApplicable, a guest that did not boot: the run's results say which
        except Exception as e:
            # vmlab's own failure in one cell (its results say status error) must not
            # cost the cells after it; Ctrl-C and SIGTERM still end the matrix
            log.warning("cell %s: %s", cell_dir, e)
        finally:
            if guest is not None:
                cell_guest.after(r.result)
        return r

    def _add(self, cell: dict, n: int, total: int) -> None:
        # where the cell's directory is inside this matrix: a merge on another machine
        # finds it there when the absolute path does not exist
        cell["results_rel"] = str(Path(cell["results"]).relative_to(self.out))
        self.cells.append(cell)
        self.save()
        what = {True: "match", False: "MISMATCH", None: "not applicable"}[cell["match"]]
        exp = "; ".join("/".join(e or []) for e in cell["expected"])
        self.progress(f"cell {n}/{total} {cell['entry']}[{cell['kernel_suite']}]: "
                      f"{' '.join(str(v) for v in cell['verdicts']) or '-'} (expected {exp or '-'}): "
                      f"{what}{': ' + cell['reason'] if cell.get('reason') else ''}")
        self.steps(n, total)

    def steps(self, done: int, total: int) -> None:
        """Cell k of N for a live progress line (vmlab.progress); a plain callable has none."""
        step = getattr(self.progress, "steps", None)
        if step is not None:
            step(done, total)

    def finish(self) -> None:
        self.result["ended"] = datetime.now(timezone.utc).isoformat()
        m = [c["match"] for c in self.cells]
        self.result["summary"] = {"cells": len(m), "match": m.count(True), "mismatch": m.count(False),
                                  "not_applicable": m.count(None)}
        self.save()
        write_junit(self.out / "junit.xml", self.cells)
        (self.out / "report.html").write_text(report.matrix_html(self.result, base=self.out))


def exit_status(cells: list[dict]) -> int:
    """A missed expectation is "bad" (1) even when another lab did not boot; a lab that
    did not boot is "could not test" (125, git bisect's skip), never a silent pass."""
    judged = [c for c in cells if c["status"] != "could_not_test"]
    if any(c["match"] is False for c in judged):
        return 1
    if len(judged) < len(cells) or not any(c["match"] is not None for c in judged):
        return 125
    return 0


# Between cells: nothing of the last cell may be left in a shared lab (a guest QEMU
# holds the guest's port and directory, a host agent the ivshmem socket path).
# [g]/[h]: the patterns must not match this script's own command line
_CLEAN_LAB = r"""
strays() { pgrep -f -- '-name [g]uest '; pgrep -f '[h]ostagent.py serve'; FORKED }
left=$(strays)
[ -z "$left" ] && exit 0
echo "left: $(echo $left)"; kill -KILL $left 2>/dev/null
for i in $(seq 50); do
  [ -z "$(strays)" ] && exit 0
  sleep 0.2
done
exit 1
"""
# a nested lab's agents forked by its fork server (exporter.warm_command), by the name
# they give themselves (hostagent.FORKED_AGENT_NAME; their command line is the server's,
# and their server may be gone); never the server: it holds nothing of a cell's
_FORKED = "pgrep -x vmlab-agent;"


def clean_lab_script(lab) -> str:
    """_CLEAN_LAB for ``lab``. A nested lab is vmlab's own: any guest named guest and any
    host agent is an earlier cell's. A box is the user's machine: only this run's (a guest
    in vmlab's run directory there, a host agent started from the run's directory)."""
    if getattr(lab, "kind", "nested") == "nested":
        return _CLEAN_LAB.replace("FORKED", _FORKED)
    from .box_lab import RUN_DIR
    guests = f"/[{RUN_DIR[1]}]{RUN_DIR[2:]}/guest/"
    agents = f"/[{lab.share_dir[1]}]{lab.share_dir[2:]}/hostagent.py serve"
    return (_CLEAN_LAB.replace("-name [g]uest ", guests).replace("[h]ostagent.py serve", agents)
            .replace("FORKED", ""))


def _clean_lab(lab, progress) -> bool:
    """True when the lab answers and no guest or host agent of an earlier cell is left
    (strays are killed); False means the lab must be booted again."""
    try:
        rc, out, _ = lab.run(clean_lab_script(lab), timeout=30, check=False)
    except Exception as e:
        log.warning("lab health probe: %s", e)
        return False
    if out.strip():
        progress(f"lab: stopped what an earlier cell left running ({out.strip()})")
    return rc == 0


def write_junit(path: Path, cells: list[dict]) -> None:
    cases, fails, skips = [], 0, 0
    for c in cells:
        name = quoteattr(f"{c['entry']}[{c['kernel_suite']}]")
        body = ""
        if c["match"] is None:
            skips += 1
            body = f"<skipped message={quoteattr('not applicable: ' + (c.get('reason') or ''))}/>"
        elif not c["match"]:
            fails += 1
            body = (f"<failure message={quoteattr(c.get('reason') or 'mismatch')}>"
                    f"{escape(json.dumps(c, default=str)[:4000])}</failure>")
        cases.append(f'  <testcase classname="vmlab.matrix" name={name} '
                     f'time="{c.get("seconds", 0)}">{body}</testcase>')
    path.write_text(f'<?xml version="1.0" encoding="UTF-8"?>\n<testsuite name="vmlab.matrix" '
                    f'tests="{len(cases)}" failures="{fails}" skipped="{skips}">\n'
                    + "\n".join(cases) + "\n</testsuite>\n")


def compact(verdicts: list) -> str:
    """['REFAULTED', 'REFAULTED', 'STALE'] -> 'REFAULTEDx2 STALE' (baseline first)."""
    out: list[list] = []
    for v in verdicts:
        if out and out[-1][0] == v:
            out[-1][1] += 1
        else:
            out.append([v, 1])
    return " ".join(f"{v}x{n}" if n > 1 else str(v) for v, n in out) or "-"


def table(result: dict) -> str:
    kernels = result["kernels"]
    by = {(c["entry"], c["kernel_suite"]): c for c in result["cells"]}
    cell = {}
    for key, c in by.items():
        mark = {True: "ok", False: "MISMATCH", None: "n/a"}[c["match"]]
        cell[key] = f"{compact(c['verdicts'])} {mark}" if c["verdicts"] else mark
    w = max([len(e) for e in result["entries"]] + [5])
    cw = max([len(v) for v in cell.values()] + [len(k) for k in kernels] + [3])
    lines = [f"{'entry':{w}}  " + "  ".join(f"{k:{cw}}" for k in kernels)]
    for e in result["entries"]:
        lines.append(f"{e:{w}}  " + "  ".join(f"{cell.get((e, k), '-'):{cw}}" for k in kernels))
    return "\n".join(lines)


def main(args, progress) -> int:
    from .run_dir import results_dir
    kernels = parse_kernels(args.kernels)
    only = [i.strip() for i in args.only.split(",")] if args.only else None
    shard_of = parse_shard(getattr(args, "shard", None))
    strategy = None
    if getattr(args, "strategies", None):
        if args.catalog or only:
            raise UserError("--strategies runs a strategy file's cells: it takes no --catalog or --only")
        strategy, entries = strategies.load(args.strategies)
    else:
        entries = catalog.load(args.catalog, only)
    box = None
    if getattr(args, "lab", None):
        if args.kernels:
            raise ConfigError("<command line>", "--kernels", "a box (--lab) runs its own kernel: "
                                                              "it is the matrix's one column")
        box = cfgmod.load_box_file(args.lab)
        kernels = [cfgmod.box_label(box)]
    planned = plan(entries, kernels, args, box)
    if shard_of:
        planned = shard(planned, *shard_of)
    out = results_dir("matrix", args.out)
    m = Matrix(planned, out, progress, args, entries=[e.name for e in entries], shard_of=shard_of,
               box=box)
    m.result["planned_kernels"] = kernels   # what the shards of one cut share
    if strategy is not None:
        strategies.write_cells(entries, out / "strategy-cells")
        m.result["strategy"] = {"file": str(args.strategies), "name": strategy["name"],
                                "title": strategy["title"], "axes": list(strategy["axes"]),
                                "cells": strategy["cells"]}
    cells = sum(len(v) for v in planned.values())
    progress(f"matrix: {len(entries)} entries x {len(kernels)} kernels"
             f"{f'; shard {shard_of[0]}/{shard_of[1]}: {cells} cells' if shard_of else ''}; "
             f"results in {out}")
    try:
        rc = m.run()
    finally:
        print(table(m.result))
        print(f"matrix: {m.result.get('summary')}; {out}/report.html")
    return rc
