"""vmlab command line. Only ``main`` turns errors into exit codes: UserError -> 2 (one
line), CouldNotTest -> 125 (one line), InfraError -> 1 (traceback in the log), Ctrl-C ->
130, SIGTERM -> 143. The users' help text is USAGE and EXIT_CODES, not this docstring."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import traceback
from pathlib import Path

from . import __version__
from .errors import ConfigError, CouldNotTest, UserError, VmlabError
from .progress import Progress

log = logging.getLogger("vmlab")


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so every ``finally`` and ``__exit__`` runs."""


# the one progress display of this process (vmlab.progress): a live line on a terminal,
# timestamped lines in a log
progress = Progress()


_first_signal: int | None = None


def _on_signal(signum, frame):
    """The first SIGINT/SIGTERM unwinds vmlab (KeyboardInterrupt / Terminated); any later
    one is noted and ignored, so a second Ctrl-C cannot cut the teardown short and leave a
    VM or a mount behind. Every teardown step is bounded; SIGKILL still ends vmlab (its
    children die with it: PR_SET_PDEATHSIG)."""
    global _first_signal
    if _first_signal is not None:
        try:
            os.write(2, b"vmlab: still stopping what it started; please wait\n")
        except OSError:
            pass
        return
    _first_signal = signum
    raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated()


def _resolved(a, exp=None) -> dict:
    from . import config as cfgmod
    return cfgmod.resolve(exp, a)


def _state():
    from .reuse import lab_dir
    return lab_dir()


@contextlib.contextmanager
def _guest_lock(st: Path):
    """The persistent guest is one: exclusive on it; the lab itself only shared, so runs
    that reuse the lab go on meanwhile."""
    from .paths import locked
    with locked(st / "lab.lock", "the persistent lab", shared=True), \
            locked(st / "guest.lock", "the persistent guest"):
        yield


# --- commands -------------------------------------------------------------------------
def cmd_images(a) -> int:
    from . import images
    if a.action in ("fetch-kernel", "fetch"):
        from . import debs
        print(debs.fetch_kernel(a.suite, progress) if a.action == "fetch-kernel"
              else debs.fetch_packages(a.suite, a.packages, progress))
        return 0
    if a.action == "list":
        for img in images.list_images():
            m = img.manifest
            print(f"{img.kind:6} {m.get('kernel_suite', '?'):20} {m.get('kernel_release', '?'):28} "
                  f"{m.get('build_seconds', '?'):>7}s  {img.path}")
        return 0
    from .config import qemu_suite_problem
    kinds = ["lab", "guest"] if a.which == "all" else [a.which]
    recipes = [images.recipe(kind, a.kernel, a.qemu if kind == "lab" else None,
                             a.lab_base if kind == "lab" else None)
               for kind in kinds]   # every input checked before anything is built
    why = qemu_suite_problem(a.qemu, recipes[0].kernel)
    if why:
        raise ConfigError("<command line>", "--qemu", why)
    for r in recipes:
        images.ensure(r, progress)
    return 0


def cmd_lab(a) -> int:
    from . import reuse
    from .lab import NestedLab
    st = _state()
    if a.action == "up":
        if reuse.lab_up(_resolved(a), progress):
            progress(f"lab is up; console {st}/lab-console.log; stop with 'vmlab lab down'")
        return 0
    if a.action == "status":
        lab = NestedLab.attach(st, qmp=True)
        try:
            status = lab.machine.cmd("query-status")
            info = {"pid": lab.machine.pid, "accel": lab.accel, "status": status.get("status"),
                    "kernel": lab.kernel_release(), "ssh_port": lab.ssh_port,
                    "console": lab.machine.spec.console_log,
                    "snapshot": (NestedLab.read_state(st)[0] or {}).get("snapshot")}
            print(json.dumps(info, indent=2) if a.json else
                  "\n".join(f"{k}: {v}" for k, v in info.items()))
        finally:
            lab.session.close()
        return 0
    if a.action == "down":
        # from the state file alone: a hung lab (no SSH, wedged QMP) stops too, and the
        # guest inside it dies with it
        if reuse.lab_down(progress):
            progress("lab is down")
        return 0
    if a.action == "exec":
        lab = NestedLab.attach(st)
        try:
            rc, out, err = lab.run(" ".join(a.cmd), timeout=a.timeout, check=False)
        finally:
            lab.session.close()
        sys.stdout.write(out)
        sys.stderr.write(err)
        return rc
    raise UserError(f"unknown lab action {a.action}")


def _guest_down(lab) -> None:
    from .reuse import guest_attach, guest_state
    try:
        g, _ = guest_attach(lab)
    except UserError:
        guest_state(lab.workdir).unlink(missing_ok=True)
        return
    g.down()
    guest_state(lab.workdir).unlink(missing_ok=True)


def cmd_guest(a) -> int:
    from .guest import Guest, GuestOptions
    from .hotplug import PORTS, root_port_args
    from .lab import NestedLab
    from .reuse import guest_attach, guest_state, record_guest
    st = _state()
    lab = NestedLab.attach(st)
    try:
        if a.action == "up":
            with _guest_lock(st):
                if guest_state(lab.workdir).exists():
                    progress("a guest is already up; 'vmlab guest down' first")
                    return 0
                # hot-plug ports: `vmlab run` brings its buffer to this guest by hot-plug
                g = Guest(lab, GuestOptions(extra_qemu_args=root_port_args()), lab.workdir)
                g.up(progress)
                record_guest(lab.workdir, g, PORTS)
            kvm = g.cmd("query-kvm")
            progress(f"guest is up: query-kvm {kvm}")
            g.disconnect()
            return 0
        if a.action == "down":
            with _guest_lock(st):
                _guest_down(lab)
            progress("guest is down")
            return 0
        if a.action == "exec":
            g, _ = guest_attach(lab)
            g.connect(timeout=30, qmp=False)
            try:
                rc, out, err = g.run(" ".join(a.cmd), timeout=a.timeout, check=False)
            finally:
                g.disconnect()
            sys.stdout.write(out)
            sys.stderr.write(err)
            return rc
    finally:
        if lab.session:
            lab.session.close()
    raise UserError(f"unknown guest action {a.action}")


def cmd_doctor(a) -> int:
    import shutil
    import tempfile
    from . import doctor
    from .paths import state_dir
    rep = {"machine": doctor.machine_facts(), "lab": None, "guest": None}
    st = _state()
    if (st / "state.json").exists():
        from .lab import NestedLab
        from .reuse import guest_attach, guest_state
        lab = NestedLab.attach(st)
        try:
            rep["lab"] = doctor.lab_facts(lab)
            if guest_state(st).exists():
                g, _ = guest_attach(lab)
                g.connect(timeout=30)
                try:
                    rep["guest"] = doctor.guest_facts(g)
                finally:
                    g.disconnect()
        finally:
            lab.session.close()
    elif not a.no_boot:
        from .stack import Stack, lab_options
        o = _resolved(a)
        # every doctor run its own directory: two at once must not share logs or sockets
        work = Path(tempfile.mkdtemp(prefix="doctor-", dir=state_dir()))
        with Stack(work, progress, lab_options(o), guest_kernel=o["guest_kernel"],
                   build=not o["no_build"]) as s:
            s.up()
            rep["lab"] = doctor.lab_facts(s.lab)
            rep["guest"] = doctor.guest_facts(s.guest)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(rep, indent=2, sort_keys=True) if a.json else doctor.render(rep))
    return 0


def cmd_bench(a) -> int:
    from . import bench
    res = bench.run(a, progress)
    print(json.dumps(res, indent=2, sort_keys=True) if a.json else bench.render(res))
    return 0


def cmd_run(a) -> int:
    from . import experiment
    return experiment.main(a, progress)


def cmd_matrix(a) -> int:
    from . import matrix
    return matrix.main(a, progress)


def cmd_compare(a) -> int:
    from . import compare
    return compare.main(a, progress)


def cmd_report(a) -> int:
    from . import merge
    return merge.merge(a.dirs, a.out, progress)


# --- parser ---------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser, *, one_kernel: bool = True) -> None:
    # Every default here is None: "not given" must stay visible, so that the command line
    # wins over the experiment config, which wins over the built-in default
    # (vmlab.config.resolve, vmlab.config.DEFAULTS).
    from .config import positive_float, positive_int
    p.add_argument("--accel", default=None, choices=["auto", "kvm", "tcg"],
                   help="lab accelerator (auto: probe /dev/kvm, else TCG with emulated SVM+NPT); "
                        "config lab.accel, default auto")
    if one_kernel:
        p.add_argument("--kernel", default=None, metavar="KERNEL",
                       help="lab kernel: a suite (trixie, trixie-backports, bookworm-backports, bullseye, "
                            "bookworm, forky), deb:PATH (a linux-image .deb or a directory of .debs with "
                            "its headers) or tree:DIR (a built kernel tree); config lab.kernel, default trixie")
    p.add_argument("--lab-base", default=None, metavar="SUITE",
                   help="the suite a deb: or tree: lab kernel is installed over; config lab.base, "
                        "default the suite a Debian .deb was built for, else trixie")
    p.add_argument("--lab-append", default=None, metavar="WORDS",
                   help="extra words for the lab kernel's command line (after vmlab's: a panic= or "
                        "rdinit= here wins); config lab.append")
    p.add_argument("--guest-kernel", default=None, metavar="KERNEL",
                   help="guest kernel: a suite, deb:PATH or tree:DIR as --kernel; config guest.kernel, "
                        "default trixie whatever the lab kernel")
    p.add_argument("--qemu", default=None, metavar="SOURCE",
                   help="the QEMU inside the lab that runs the guest (the VMM under test): "
                        "default (the lab kernel's suite), suite:NAME (e.g. suite:trixie-backports "
                        "with --kernel trixie), deb:PATH (.debs with qemu-system-x86) or build:DIR "
                        "(a QEMU build directory: qemu-system-x86_64 and pc-bios/); config lab.qemu")
    if one_kernel:
        # folded into --kernel tree:DIR; kept to say so in one line (exit 2)
        p.add_argument("--kernel-image", default=None, metavar="PATH", help=argparse.SUPPRESS)
    p.add_argument("--lab-memory", type=positive_int, default=None, metavar="MIB",
                   help="lab RAM in MiB (>= 1); config lab.memory_mb, default 3072")
    p.add_argument("--boot-timeout", type=positive_float, default=None, metavar="SECONDS",
                   help="seconds for the lab to boot (> 0); config lab.boot_timeout, default 300")
    p.add_argument("--guest-memory", type=positive_int, default=None, metavar="MIB",
                   help="guest RAM in MiB (>= 1); config guest.memory_mb, default 512")
    p.add_argument("--guest-boot-timeout", type=positive_float, default=None, metavar="SECONDS",
                   help="seconds for the guest to boot (> 0); config guest.boot_timeout, default 240")
    p.add_argument("--lab-qemu-arg", action="append", metavar="ARG",
                   help="one extra argument for the QEMU that runs the lab (this machine's; "
                        "repeat it for more)")
    p.add_argument("--no-build", action="store_true",
                   help="fail (exit 2) instead of building a missing image")


USAGE = """\
vmlab boots its own lab host (a VM with KVM and the vmlab exporter module) and
guests inside it, maps a host dma-buf into a guest's physical address space, moves
the buffer under the guest, and says whether the guest saw the new pages
(REFAULTED) or stale ones.

  vmlab run                      the default experiment: build what is missing, boot, judge
  vmlab run configs/experiments/hw-oracle.yaml --out /tmp/r1
  vmlab lab up; vmlab lab exec -- dmesg; vmlab lab down
"""

EXIT_CODES = """\
exit status (vmlab run): 0 every expectation met; 1 an expectation missed, or vmlab
itself failed; 2 the input is wrong (one line naming the file and key or option);
125 could not test (the kernel or QEMU under test could not be loaded, or the lab or
guest did not come up); 130 interrupted (Ctrl-C); 143 terminated (SIGTERM).
vmlab matrix: 0 every applicable cell met its expectation, 1 a cell did not, 125 a
lab did not come up or no cell applied. The other commands: 0 done, the rest as above; 'exec' passes on the command's status.
Every VM a command starts is stopped before it exits, except what 'lab up' and
'guest up' leave running on purpose.
"""


def _sub(sub, name: str, help: str, example: str, merge: bool = False):
    """A subcommand whose --help says what it does, shows an example and the exit codes."""
    from .config import MERGE_RULE
    import textwrap
    merge_rule = textwrap.fill(MERGE_RULE, 88) + "\n\n" if merge else ""
    epilog = f"example:\n  {example}\n\n{merge_rule}{EXIT_CODES}"
    return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                          epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)


def parser() -> argparse.ArgumentParser:
    from .config import positive_float, positive_int
    p = argparse.ArgumentParser(prog="vmlab", description=USAGE, epilog=EXIT_CODES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"vmlab {__version__}")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="debug logging on stderr, and tracebacks of internal failures")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    im = _sub(sub, "images", "build or list the lab and guest images (mmdebstrap, cached by content)",
              "vmlab images build lab --kernel trixie-backports")
    ims = im.add_subparsers(dest="action", required=True, metavar="ACTION")
    b = ims.add_parser("build", help="build an image if its recipe or inputs changed")
    b.add_argument("which", nargs="?", default="all", choices=["lab", "guest", "all"],
                   help="which image (default all)")
    b.add_argument("--kernel", default="trixie",
                   help="kernel of the image: a suite (trixie, trixie-backports, bookworm-backports, bullseye, "
                        "bookworm, forky), deb:PATH or tree:DIR (default trixie)")
    b.add_argument("--lab-base", default=None, metavar="SUITE",
                   help="the suite a deb: or tree: kernel is installed over (as 'vmlab run --lab-base')")
    b.add_argument("--qemu", default="default", metavar="SOURCE",
                   help="the lab image's QEMU: default, suite:NAME, deb:PATH or build:DIR, as 'vmlab run --qemu'")
    ims.add_parser("list", help="the images in the cache, with their kernels")
    fk = ims.add_parser("fetch-kernel", help="download a suite's current kernel .debs (image, "
                        "modules, headers, kbuild) into the cache and print their directory, "
                        "for --kernel deb:DIR")
    fk.add_argument("suite", help="trixie, trixie-backports, bookworm-backports, bullseye, bookworm, forky")
    fp = ims.add_parser("fetch", help="download a suite's current .debs of the named packages (no "
                        "dependencies) into the cache and print their directory, e.g. a QEMU for "
                        "--qemu deb:DIR")
    fp.add_argument("suite", help="as fetch-kernel")
    fp.add_argument("packages", nargs="+", metavar="PACKAGE", help="binary package names, e.g. "
                    "qemu-system-x86 qemu-system-data seabios")
    im.set_defaults(func=cmd_images)

    lab = _sub(sub, "lab", "the lab host VM that outlives one command: up, status, down, exec",
               "vmlab lab up --kernel trixie-backports && vmlab lab exec -- uname -r", merge=True)
    labs = lab.add_subparsers(dest="action", required=True, metavar="ACTION")
    import textwrap
    from .config import MERGE_RULE
    up = labs.add_parser("up", help="boot the lab and leave it running",
                         epilog=textwrap.fill(MERGE_RULE, 88))
    _common(up)
    st = labs.add_parser("status", help="whether a lab is up, and its facts")
    st.add_argument("--json", action="store_true", help="print JSON")
    labs.add_parser("down", help="stop the lab (and its guest)")
    ex = labs.add_parser("exec", help="run a command in the lab as root")
    ex.add_argument("--timeout", type=positive_float, default=300, metavar="SECONDS",
                    help="seconds for the command (> 0, default 300)")
    ex.add_argument("cmd", nargs=argparse.REMAINDER, help="the command, after --")
    lab.set_defaults(func=cmd_lab)

    g = _sub(sub, "guest", "a guest inside the running lab: up, down, exec",
             "vmlab guest up && vmlab guest exec -- cat /proc/iomem")
    gs = g.add_subparsers(dest="action", required=True, metavar="ACTION")
    gs.add_parser("up", help="boot a guest in the lab that 'vmlab lab up' started")
    gs.add_parser("down", help="stop the guest")
    gex = gs.add_parser("exec", help="run a command in the guest as root")
    gex.add_argument("--timeout", type=positive_float, default=300, metavar="SECONDS",
                     help="seconds for the command (> 0, default 300)")
    gex.add_argument("cmd", nargs=argparse.REMAINDER, help="the command, after --")
    g.set_defaults(func=cmd_guest)

    d = _sub(sub, "doctor", "what this machine, the lab and a guest can do, and why",
             "vmlab doctor --json", merge=True)
    d.add_argument("--json", action="store_true", help="print JSON")
    d.add_argument("--no-boot", action="store_true", help="only this machine; boot nothing")
    _common(d)
    d.set_defaults(func=cmd_doctor)

    be = _sub(sub, "bench", "measure boots, builds, moves and more; numbers only, never a verdict",
              "vmlab bench --json --what profile,move --repeat 3", merge=True)
    be.add_argument("--json", action="store_true", help="print JSON")
    be.add_argument("--what", default="boot,build",
                    help="comma list of: boot, build, move, soak, fuzz, hwtrace (the hardware "
                         "oracle's TCG cost, without and with the plugin), profile (where a "
                         "boot's seconds and VM exits go), matrix (the catalog matrix's seconds "
                         "per cell on --kernel), reuse (vmlab run with a lab of its own vs in the "
                         "lab 'vmlab lab up' left running), snapshot (warm runs booted vs "
                         "restored), cold (the main job with an empty cache: fresh machine -> "
                         "first verdict); default boot,build")
    be.add_argument("--repeat", type=positive_int, default=1, help="how many times (>= 1, default 1)")
    _common(be)
    be.set_defaults(func=cmd_bench)

    r = _sub(sub, "run", "run an experiment and judge every move; writes a results directory",
             "vmlab run configs/experiments/zap-only.yaml --kernel trixie-backports --out /tmp/r1",
             merge=True)
    r.add_argument("config", nargs="?", default=None,
                   help="experiment YAML (default configs/experiments/default.yaml)")
    r.add_argument("--out", default=None,
                   help="results directory: new or empty (default results/<UTC>-<name>/)")
    r.add_argument("--keep", action="store_true",
                   help="run in the lab 'vmlab lab up' keeps (starting one if none is up) and "
                        "leave it up when the run fails, for 'vmlab lab exec'; a lab this run "
                        "started goes down when the run passes or is interrupted")
    r.add_argument("--fresh", action="store_true",
                   help="boot a lab of this run's own even when 'vmlab lab up' left a matching "
                        "one running (by default the run uses that lab and boots only its guest)")
    _common(r)
    r.set_defaults(func=cmd_run)

    mx = _sub(sub, "matrix", "run every catalog entry on every lab kernel; matrix.json, junit.xml, "
              "report.html", "vmlab matrix --kernels trixie,trixie-backports --only pfnmap-compound "
              "--out /tmp/m1", merge=True)
    mx.add_argument("--kernels", default=None, metavar="K1,K2",
                    help="lab kernels, comma-separated (default trixie,trixie-backports)")
    mx.add_argument("--lab", default=None, metavar="FILE",
                    help="run every cell on a test box instead: FILE's lab: mapping is kind ssh "
                         "(host, key, known_hosts) or kind local (this machine), as in an "
                         "experiment config; the box's own kernel and QEMU are the matrix's one "
                         "column (box:HOST or local), so no --kernels")
    mx.add_argument("--catalog", default=None, metavar="DIR",
                    help="catalog directory (default configs/catalog)")
    mx.add_argument("--only", default=None, metavar="ID,...",
                    help="only these entries (their names), in this order")
    mx.add_argument("--strategies", default=None, metavar="FILE",
                    help="run a strategy file's cells instead of the catalog (e.g. "
                         "configs/strategies/caching.yaml: exporter caching x guest mapping x a "
                         "caching change); the report tabulates every layer's memtype per cell")
    mx.add_argument("--own-guests", action="store_true",
                    help="every cell boots a guest of its own (by default the cells that can "
                         "take their buffer by hot-plug share one guest per lab)")
    mx.add_argument("--shard", default=None, metavar="K/N",
                    help="run only shard K of N: the cells in kernel order cut into N runs "
                         "(every machine cuts alike; 'vmlab report merge' joins the shards)")
    mx.add_argument("--out", default=None,
                    help="results directory: new or empty (default results/<UTC>-matrix/)")
    _common(mx, one_kernel=False)
    mx.set_defaults(func=cmd_matrix)

    rp = _sub(sub, "report", "join results: 'merge' makes one matrix (matrix.json, junit.xml, "
              "report.html) of matrix shards and runs from many machines",
              "vmlab report merge shard1/ shard2/ --out merged/")
    rps = rp.add_subparsers(dest="action", required=True, metavar="ACTION")
    rm = rps.add_parser("merge", help="merge matrix results directories (shards) and vmlab run "
                        "results directories; exit 0/1/125 as vmlab matrix, 125 when a shard is "
                        "missing")
    rm.add_argument("dirs", nargs="+", metavar="DIR", help="a vmlab matrix or vmlab run results directory")
    rm.add_argument("--out", default=None,
                    help="merged results directory: new or empty (default results/<UTC>-merged/)")
    rp.set_defaults(func=cmd_report)

    cp = _sub(sub, "compare", "what changed between two results directories (matrix or run): "
              "verdicts per cell, move timing tested for a change; exit 1 on a regression",
              "vmlab compare results/yesterday-matrix results/today-matrix")
    cp.add_argument("a", metavar="A", help="the earlier (baseline) results directory")
    cp.add_argument("b", metavar="B", help="the later results directory")
    cp.add_argument("--out", default=None,
                    help="directory for compare.json and report.html: new or empty "
                         "(default results/<UTC>-compare/)")
    cp.set_defaults(func=cmd_compare)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "cmd", None) and args.cmd[:1] == ["--"]:
        args.cmd = args.cmd[1:]
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        return _dispatch(args)
    finally:
        progress.close()
        if _first_signal is not None:
            # Python's finalization puts SIG_DFL back in place of a Python handler, so a
            # later Ctrl-C would kill vmlab by the signal after it has stopped everything
            # and chosen its exit status; ignored handlers are left alone.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def _dispatch(args) -> int:
    try:
        try:
            return args.func(args)
        finally:
            progress.close()   # the live line goes before the last words are printed
    except UserError as e:
        print(f"vmlab: error: {e}", file=sys.stderr)
        return 2
    except CouldNotTest as e:
        log.debug("%s", traceback.format_exc())
        print(f"vmlab: could not test: {e}", file=sys.stderr)
        return 125
    except VmlabError as e:
        log.debug("%s", traceback.format_exc())
        print(f"vmlab: failed: {e}", file=sys.stderr)
        if args.verbose:
            traceback.print_exc()
        return e.exit_code
    except KeyboardInterrupt:
        print("vmlab: interrupted; everything it started was stopped", file=sys.stderr)
        return 130
    except Terminated:
        print("vmlab: terminated; everything it started was stopped", file=sys.stderr)
        return 143


if __name__ == "__main__":
    sys.exit(main())
