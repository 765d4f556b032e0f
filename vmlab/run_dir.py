"""A run's results directory: made for it alone, with what reproduces it (config copy,
reproduce.sh), and what a person or a CI reads of it (junit.xml, the verdict table).
report.html is vmlab/report.py's."""
from __future__ import annotations

import json
import os
import shlex
import shutil
from datetime import datetime, timezone
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import yaml

from . import config as cfgmod
from .errors import UserError
from .paths import repo_root


def results_dir(name: str, out: str | None) -> Path:
    """The run's own results directory, created here and by nobody else.

    ``--out`` must not exist or be an empty directory: vmlab never writes into (or
    changes the mode of, or deletes from) a directory that holds the user's files. The
    default is results/<UTC>-<name>[-N]/, made with an exclusive mkdir so two runs started
    in the same second get two directories."""
    if out:
        d = Path(out)
        if d.exists() and not d.is_dir():
            raise UserError(f"--out {out}: exists and is not a directory")
        if d.is_dir() and any(d.iterdir()):
            raise UserError(f"--out {out}: directory is not empty; vmlab writes results "
                            f"only into a new or empty directory")
        if not d.exists():
            try:
                d.mkdir(parents=True)
            except FileExistsError:
                pass
        try:  # claim it: of two runs given the same --out, exactly one gets it
            os.close(os.open(d / ".vmlab-run", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            raise UserError(f"--out {out}: another vmlab run is using it")
        return d
    ts = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    parent = Path.cwd() / "results"
    parent.mkdir(parents=True, exist_ok=True)
    for n in range(1000):
        d = parent / (f"{ts}-{name}" + (f"-{n}" if n else ""))
        try:
            d.mkdir()
            return d
        except FileExistsError:
            continue
    raise UserError(f"cannot make a new results directory under {parent}")


def cli_passthrough(args, **override) -> list[str]:
    """The options of this command line that decide how an experiment runs, for its
    reproduce.sh (``override``: e.g. kernel= for one matrix cell)."""
    vals = {flag: getattr(args, flag, None) for flag in
            ("accel", "kernel", "guest_kernel", "qemu", "lab_memory",
             "boot_timeout", "guest_memory", "guest_boot_timeout")}
    vals.update(override)
    out = [f"--{flag.replace('_', '-')}={v}" for flag, v in vals.items() if v is not None]
    return out + [f"--lab-qemu-arg={v}" for v in (getattr(args, "lab_qemu_arg", None) or ())]


def write_reproducer(d: Path, exp: cfgmod.Experiment, argv: list[str], raw: dict | None = None) -> None:
    """``raw``: the config as it ran when it is not the file's (a matrix cell on a box)."""
    if raw is not None:
        (d / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    else:
        shutil.copyfile(exp.path, d / "config.yaml")
    script = ("#!/bin/sh\n# Re-run this experiment with the same config (copied beside this script).\n"
              "here=$(cd \"$(dirname \"$0\")\" && pwd) || exit 1\n"
              f"cd {shlex.quote(str(repo_root()))} || exit 1\n"
              "VMLAB=.venv/bin/vmlab; [ -x \"$VMLAB\" ] || VMLAB=vmlab\n"
              f"exec \"$VMLAB\" run \"$here/config.yaml\" {' '.join(shlex.quote(a) for a in argv)} \"$@\"\n")
    (d / "reproduce.sh").write_text(script)
    os.chmod(d / "reproduce.sh", 0o755)


def write_junit(path: Path, res: dict) -> None:
    cases, fails = [], 0
    cls = quoteattr("vmlab." + res["experiment"])
    checks = []
    if "baseline" in res:
        checks.append(("baseline", res["baseline"]))
    checks += [(f"move{m['n']:03d}-{m['mode']}", m) for m in res["moves"]]
    for name, m in checks:
        body = ""
        if not m.get("passed"):
            fails += 1
            msg = f"verdict {m.get('verdict')} expected {'/'.join(m.get('expected') or [])}"
            body = f"<failure message={quoteattr(msg)}>{escape(json.dumps(m, default=str)[:4000])}</failure>"
        cases.append(f'  <testcase classname={cls} name={quoteattr(name)}>{body}</testcase>')
    if res.get("not_applicable"):
        cases.append(f'  <testcase classname={cls} name="applicable"><skipped message='
                     f'{quoteattr("not applicable: " + res["not_applicable"])}/></testcase>')
    if res.get("kernel_health_failed"):
        fails += 1
        msg = "kernel warnings or new taint during the run: " + ", ".join(res["kernel_health_failed"])
        detail = json.dumps(res.get("kernel_health"), default=str)[:4000]
        cases.append(f'  <testcase classname={cls} name="kernel-health"><failure message={quoteattr(msg)}>'
                     f'{escape(detail)}</failure></testcase>')
    if not res.get("not_applicable"):
        # the run as a whole, as vmlab's exit status has it: a run cut short (moves never
        # run, a lab that never booted, an error) fails here when none of the cases above could
        body = ""
        if res.get("passed") is not True:
            fails += 1
            msg = f"the run did not pass (status {res.get('status', 'unknown')})"
            if res.get("error"):
                msg += f": {res['error']}"
            body = f"<failure message={quoteattr(msg[:1000])}/>"
        cases.append(f'  <testcase classname={cls} name="run">{body}</testcase>')
    path.write_text(f'<?xml version="1.0" encoding="UTF-8"?>\n<testsuite name={cls} '
                    f'tests="{len(cases)}" failures="{fails}">\n' + "\n".join(cases) + "\n</testsuite>\n")


def table(res: dict) -> str:
    lines = [f"{'move':>4}  {'mode':15} {'verdict':12} {'expected':22} pages"]
    for m in res["moves"]:
        lines.append(f"{m['n']:>4}  {m['mode']:15} {m.get('verdict', '?'):12} {'/'.join(m['expected']):22} "
                     f"{json.dumps(m.get('pages', {}))}{'' if m.get('passed') else '   <-- MISMATCH'}")
    return "\n".join(lines)
