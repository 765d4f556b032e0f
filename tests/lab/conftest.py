"""Lab tests: real nested VMs (TCG lab host with emulated SVM+NPT, KVM guest inside), the
real exporter module, real SSH and QMP. Each module boots what it needs and stops it.

Prerequisites are installed by host-tools/install-deps. Without root or QEMU these tests
are skipped with that reason locally, and FAIL under CI (any non-empty CI other than
"false"/"0"): a CI that cannot run the lab tests must go red, never green on skips or
xfails."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.prereq import missing

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(os.environ.get("VMLAB_TEST_RESULTS", ROOT / "results" / "tests"))


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "lab tests need root (image builds use mmdebstrap --mode=root)"
    for tool in ("qemu-system-x86_64", "mmdebstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (run host-tools/install-deps)"
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/lab" in str(item.fspath):
            item.add_marker(pytest.mark.lab)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before any fixture boots anything: a missing prerequisite fails (CI) or skips."""
    if "tests/lab" not in str(item.fspath):
        return
    why = _missing()
    if why:
        missing(why)


def lab_stack(workdir: Path, guest_opts=None, **cli):
    """A Stack built the way the CLI builds one: the command line (``cli``, as
    --option=value pairs) resolved over the built-in defaults."""
    from vmlab import config
    from vmlab.cli import parser, progress
    from vmlab.stack import Stack, lab_options
    argv = ["doctor", "--accel", os.environ.get("VMLAB_TEST_ACCEL", "auto")]
    argv += [f"--{k.replace('_', '-')}={v}" for k, v in cli.items()]
    o = config.resolve(None, parser().parse_args(argv))
    return Stack(workdir, progress, lab_options(o), guest_opts, guest_kernel=o["guest_kernel"])


@pytest.fixture(scope="session")
def images_ready():
    """Build (or find) the lab and guest images once; never depends on a warm cache."""
    from vmlab import images
    from vmlab.cli import progress
    lab, _ = images.ensure(images.recipe("lab"), progress)
    guest, _ = images.ensure(images.recipe("guest"), progress)
    return lab, guest


def results_dir(name: str) -> Path:
    d = RESULTS / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d


def vmlab_cmd(*args, cwd=ROOT, timeout=900, env=None, **kw) -> subprocess.CompletedProcess:
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "vmlab.cli", *args], cwd=cwd, timeout=timeout,
                          capture_output=True, text=True, env=e, stdin=subprocess.DEVNULL, **kw)


def vmlab_at_once(arg_lists, env=None, timeout=1200) -> list[tuple[int, str, str]]:
    """Several vmlab commands started together; (returncode, stdout, stderr) of each. None
    outlives the call (killed at the timeout)."""
    e = dict(os.environ, **(env or {}))
    procs = [subprocess.Popen([sys.executable, "-m", "vmlab.cli", *args], cwd=ROOT, env=e,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for args in arg_lists]
    try:
        ends = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, ends)]


def qemu_pids(marker: str) -> list[int]:
    """QEMU processes whose command line mentions ``marker`` (a test's own directory)."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "qemu-system" in cmd and marker in cmd:
            out.append(int(p.name))
    return out


class VmlabProcess:
    """vmlab in its own process group (as a shell runs it), stderr collected on a thread."""

    def __init__(self, state, *args, env=None):
        (Path(state) / "run").mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, VMLAB_STATE_DIR=str(state), XDG_RUNTIME_DIR=str(Path(state) / "run"),
                   **(env or {}))
        self.p = subprocess.Popen([sys.executable, "-m", "vmlab.cli", *args], cwd=ROOT, env=env,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.err, self.out = [], []
        # both streams drained as they come: a full pipe would stall vmlab
        self.threads = [threading.Thread(target=lambda s=sink, f=stream: s.extend(iter(f.readline, "")),
                                         daemon=True)
                        for sink, stream in ((self.err, self.p.stderr), (self.out, self.p.stdout))]
        for t in self.threads:
            t.start()

    def drained(self, timeout: float = 5) -> None:
        """Wait (bounded) for the reader threads after the process ended."""
        for t in self.threads:
            t.join(timeout)

    def stderr(self) -> str:
        return "".join(self.err)

    def stdout(self) -> str:
        return "".join(self.out)

    def wait_for(self, text, timeout):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if text in self.stderr():
                return
            if self.p.poll() is not None:
                break
            time.sleep(0.2)
        pytest.fail(f"never saw {text!r}; stderr so far:\n{self.stderr()}")
