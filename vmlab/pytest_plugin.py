"""vmlab in your own pytest suite (loaded through the ``pytest11`` entry point whenever
vmlab is installed).

Fixtures:
- ``vmlab_lab``: the lab host for the test's kernel (``--vmlab-kernel``, or the marker
  ``@pytest.mark.vmlab_kernel("trixie-backports")``; default trixie). One lab per kernel
  per session, booted on first use, stopped at the end of the session.
- ``vmlab_guest``: a running guest in that lab (one per lab, shared by the session's
  tests), booted with PCIe root ports that buffers are hot-plugged into.
- ``vmlab_buffer(kind="vmlab", size="1M", caching="WB", alloc="ORDER0", mapping="uc")``:
  a factory; each buffer is its own ivshmem device in the guest, with ``.move(mode,
  caching=None)`` (the exporter moves it, the guest reads it, the oracle judges every
  page: a dict with "verdict" and "pages") and ``.read()``. Unplugged after the test.
- ``vmlab_run(config)``: an experiment (a path or a dict) run in the test's lab, as
  ``vmlab run`` would; its results dict (with "passed" and "moves").

Each test's results directory (``--vmlab-results``, default results/pytest/) is named in
its JUnit properties (``vmlab_results``). A missing prerequisite (root, QEMU, mmdebstrap)
fails the test under CI (CI set and not 0/false/no) and skips it with the reason elsewhere.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

DEFAULT_KERNEL = "trixie"


def pytest_addoption(parser):
    g = parser.getgroup("vmlab")
    g.addoption("--vmlab-kernel", default=None,
                help="lab kernel suite for vmlab fixtures (default trixie; a test's "
                     "vmlab_kernel marker wins)")
    g.addoption("--vmlab-results", default=None,
                help="where vmlab fixtures keep each test's results (default results/pytest)")


def pytest_configure(config):
    config.addinivalue_line("markers", "vmlab_kernel(name): the lab kernel suite of this test's vmlab lab")


def _under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _require_machine() -> None:
    why = None
    if os.geteuid() != 0:
        why = "vmlab labs need root (image builds use mmdebstrap --mode=root)"
    for tool in ("qemu-system-x86_64", "mmdebstrap"):
        if why is None and shutil.which(tool) is None:
            why = f"{tool} is not installed (vmlab's host-tools/install-deps installs it)"
    if why:
        if _under_ci():
            pytest.fail(f"prerequisite missing under CI: {why}", pytrace=False)
        pytest.skip(why)


def _slug(nodeid: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid).strip("_")[-150:]


class LabSession:
    """The session's labs: one lab, host agent and (on first use) guest per kernel."""

    def __init__(self, root: Path):
        self.root = root
        self.labs: dict[str, dict] = {}
        self.failed: dict[str, str] = {}     # kernel -> why its lab did not come up
        self.seq = 0
        self.boots = 0

    def lab(self, kernel: str) -> dict:
        if kernel in self.failed:
            # one lab that does not boot is enough: later tests fail at once with its reason
            pytest.fail(f"the {kernel} lab did not come up earlier in this session: {self.failed[kernel]}",
                        pytrace=False)
        if kernel in self.labs and not self.labs[kernel]["stack"].lab.alive():
            self._close_one(kernel, self.labs.pop(kernel))     # it died: boot another
        if kernel not in self.labs:
            from .cli import parser, progress
            from .config import resolve
            from .exporter import HostAgent
            from .guest import GuestOptions
            from .hotplug import root_port_args
            from .stack import Stack, lab_options
            o = resolve(None, parser().parse_args(["doctor", "--kernel", kernel]))
            # this process's own directory (two sessions, or xdist workers, in one cwd),
            # a new one per boot: a lab that failed keeps its console log
            self.boots += 1
            work = self.root / "_labs" / f"{kernel}-{os.getpid()}-{self.boots}"
            work.mkdir(parents=True)
            stack = Stack(work, progress, lab_options(o),
                          # its own name and port: vmlab_run's guests use the defaults
                          GuestOptions(name="pytest", ssh_port=2299, extra_qemu_args=root_port_args()),
                          guest_kernel=o["guest_kernel"])
            try:
                stack.up_lab()
                agent = HostAgent(stack.lab, work / "hostagent.log")
            except BaseException as e:
                stack.down()
                if isinstance(e, Exception):
                    self.failed[kernel] = f"{type(e).__name__}: {e} (logs: {work})"
                raise
            self.labs[kernel] = {"stack": stack, "opts": o, "work": work, "agent": agent,
                                 "gagent": None, "ids": []}
        return self.labs[kernel]

    def guest(self, kernel: str):
        e = self.lab(kernel)
        g = e["stack"].guest
        if g is not None and (e.get("tainted") or not g.alive()):
            # dead, or holding a device it never gave back: a fresh guest for the next test
            self._guest_down(e)
        if e["stack"].guest is None:
            from .guest_agent import GuestAgent
            g = e["stack"].up_guest()
            e["gagent"] = GuestAgent(g.session)
        return e["stack"].guest

    def _guest_down(self, e: dict) -> None:
        if e["gagent"] is not None:
            e["gagent"].close(wait=2)
            e["gagent"] = None
        e["tainted"] = False
        g = e["stack"].guest
        if g is None:
            return
        e["stack"]._save_dmesg(g, "guest-dmesg.log")
        gone = g.down()
        e["stack"].guest = None
        # its QEMU is gone: no mapping of the buffers' pages is left (else they stay
        # quarantined until the lab goes)
        for buf_id in e["ids"] if gone else []:
            try:
                e["agent"].request("release_quarantine", id=buf_id, force=True)
            except Exception:
                pass
        e["ids"] = []

    def _close_one(self, kernel: str, e: dict) -> None:
        try:
            try:
                self._guest_down(e)
            finally:
                e["agent"].close()
        finally:
            e["stack"].down()

    def close(self) -> None:
        """Stop every lab (and its guest); a later fixture boots a new one. Each lab is
        stopped whatever the one before did; the first error is raised at the end."""
        labs, self.labs = self.labs, {}
        first = None
        for kernel, e in labs.items():
            try:
                self._close_one(kernel, e)
            except Exception as ex:
                first = first or ex
        if first is not None:
            raise first


@pytest.fixture(scope="session")
def _vmlab_session(request):
    opt = request.config.getoption("--vmlab-results")
    root = Path(opt) if opt else Path.cwd() / "results" / "pytest"
    root.mkdir(parents=True, exist_ok=True)
    s = LabSession(root)
    yield s
    s.close()


def _kernel(request) -> str:
    m = request.node.get_closest_marker("vmlab_kernel")
    if m and m.args:
        return str(m.args[0])
    return request.config.getoption("--vmlab-kernel") or DEFAULT_KERNEL


@pytest.fixture
def vmlab_results(request) -> Path:
    """This test's own results directory, kept, and named in its JUnit properties."""
    root = request.getfixturevalue("_vmlab_session").root
    d = root / _slug(request.node.nodeid)
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    request.node.user_properties.append(("vmlab_results", str(d)))   # JUnit <property>
    return d


@pytest.fixture
def vmlab_lab(request, _vmlab_session):
    """The running lab (vmlab.lab.NestedLab) for this test's kernel."""
    _require_machine()
    return _vmlab_session.lab(_kernel(request))["stack"].lab


@pytest.fixture
def vmlab_guest(request, vmlab_lab, _vmlab_session):
    """A running guest (vmlab.guest.Guest) in the test's lab."""
    return _vmlab_session.guest(_kernel(request))


@pytest.fixture
def vmlab_buffer(request, vmlab_guest, _vmlab_session, vmlab_results):
    from .config import parse_size
    from .hotplug import HotBuffer
    e = _vmlab_session.lab(_kernel(request))
    made: list[HotBuffer] = []

    def make(kind: str = "vmlab", size="1M", caching: str = "WB", alloc: str = "ORDER0",
             mapping: str = "uc") -> HotBuffer:
        _vmlab_session.seq += 1
        try:
            b = HotBuffer(vmlab_guest, e["agent"], e["gagent"], f"buf{_vmlab_session.seq}", kind=kind,
                          size=parse_size(size), caching=caching, alloc=alloc, mapping=mapping)
        except BaseException:
            # a plug that failed half-way may have left a device (and its pages) in the
            # guest: the next test gets a fresh guest, and this one's buffers are freed with it
            e["tainted"] = True
            raise
        made.append(b)
        e["ids"].append(b.id)
        return b
    yield make
    errors = []
    for b in made:
        try:
            b.close()
        except Exception as ex:
            errors.append(f"{b.name}: {ex}")
            if b.stuck:
                e["tainted"] = True      # the next test gets a fresh guest
    (vmlab_results / "buffers.json").write_text(json.dumps(
        [{"name": b.name, "id": hex(b.id), "bdf": getattr(b, "bdf", None), "moves": b.history}
         for b in made], indent=2) + "\n")
    if errors:
        pytest.fail(f"unplugging the test's buffers failed: {'; '.join(errors)}", pytrace=False)


@pytest.fixture
def vmlab_run(request, vmlab_lab, _vmlab_session, vmlab_results):
    """run(config): the experiment at a path (or a config dict) in the test's lab; its
    results dict. The run boots and stops a guest of its own."""
    from . import config as cfgmod
    from .experiment import Run
    e = _vmlab_session.lab(_kernel(request))
    count = [0]

    def run(config) -> dict:
        count[0] += 1
        if isinstance(config, dict):
            path = vmlab_results / f"config-{count[0]}.yaml"
            import yaml
            path.write_text(yaml.safe_dump(config))
            config = path
        exp = cfgmod.load(str(config))
        o = cfgmod.resolve(exp, _run_args(_kernel(request)))
        out = vmlab_results / f"run-{count[0]}-{exp.name}"
        out.mkdir()
        r = Run(exp, o, out, _progress, shared_lab=vmlab_lab)
        r.save()
        r.run()
        return json.loads((out / "results.json").read_text())
    return run


def _run_args(kernel: str):
    from .cli import parser
    return parser().parse_args(["run", "--kernel", kernel])


def _progress(msg: str) -> None:
    from .cli import progress
    progress(msg)
