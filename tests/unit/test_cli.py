"""`vmlab` command line without a lab: help, status of no lab, images list, doctor --no-boot."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vmlab import cli, errors

ROOT = Path(__file__).resolve().parents[2]


def vmlab(args, tmp_path, timeout=60):
    env = dict(os.environ, VMLAB_STATE_DIR=str(tmp_path / "state"),
               VMLAB_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "vmlab.cli", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_help(tmp_path):
    r = vmlab(["--help"], tmp_path)
    assert r.returncode == 0
    for cmd in ("images", "lab", "guest", "doctor", "bench", "run", "matrix"):
        assert cmd in r.stdout


def test_version(tmp_path):
    from vmlab import __version__
    r = vmlab(["--version"], tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == f"vmlab {__version__}"


def test_no_command_is_usage_error(tmp_path):
    r = vmlab([], tmp_path)
    assert r.returncode == 2 and "usage" in r.stderr


def test_lab_status_without_lab(tmp_path):
    r = vmlab(["lab", "status"], tmp_path)
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("vmlab: error: no lab is up")
    assert str(tmp_path / "state") in lines[0]


def test_lab_down_without_lab(tmp_path):
    r = vmlab(["lab", "down"], tmp_path)
    assert r.returncode == 0
    assert "no lab is up" in r.stderr


def test_guest_exec_without_lab(tmp_path):
    r = vmlab(["guest", "exec", "true"], tmp_path)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1


def test_images_list_empty(tmp_path):
    r = vmlab(["images", "list"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""


def test_images_list_one(tmp_path):
    d = tmp_path / "cache" / "images" / "lab-x"
    d.mkdir(parents=True)
    (d / "manifest.json").write_text(json.dumps({"kind": "lab", "kernel_suite": "trixie",
                                                 "kernel_release": "6.12.0-1-amd64",
                                                 "build_seconds": 42}))
    r = vmlab(["images", "list"], tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1
    assert lines[0].split() == ["lab", "trixie", "6.12.0-1-amd64", "42s", str(d)]


def test_doctor_no_boot_json(tmp_path):
    r = vmlab(["doctor", "--no-boot", "--json"], tmp_path)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["lab"] is None and rep["guest"] is None
    m = rep["machine"]
    assert m["kernel"] == os.uname().release
    assert m["cpus"] == os.cpu_count()
    assert m["dev_kvm"] == os.path.exists("/dev/kvm")
    v = m["qemu_version"]
    assert isinstance(v, str) and v and not v.startswith("unavailable"), v
    assert v[0].isdigit(), v
    real = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True,
                          timeout=20).stdout.splitlines()[0]
    assert v in real
    assert not (tmp_path / "state" / "doctor").exists()  # nothing was booted


def test_doctor_no_boot_text(tmp_path):
    r = vmlab(["doctor", "--no-boot"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("machine: kernel ")
    assert "QEMU" in r.stdout


# --- exit codes: the contract `git bisect run` and CI read ----------------------------------
@pytest.mark.parametrize("exc, code, prefix", [
    (lambda: errors.ConfigError("x.yaml", "moves[0].mode", "bad"), 2, "vmlab: error:"),
    (lambda: errors.BootFailure("lab", "kernel panic: boom", "/r/lab-console.log"), 125,
     "vmlab: could not test:"),
    (lambda: errors.BootFailure("lab", "QEMU exited early", None, retryable=False), 125,
     "vmlab: could not test:"),
    (lambda: errors.QemuRefused("lab: QEMU exited early: 'x' is not a valid device model"), 2,
     "vmlab: error:"),
    (lambda: errors.RemoteError("agent said no"), 1, "vmlab: failed:"),
    (lambda: KeyboardInterrupt(), 130, "vmlab: interrupted"),
    (lambda: cli.Terminated(), 143, "vmlab: terminated"),
])
def test_exit_codes(monkeypatch, capsys, exc, code, prefix):
    def boom(_a):
        raise exc()
    monkeypatch.setattr(cli.signal, "signal", lambda *a: None)   # pytest keeps its handlers
    monkeypatch.setattr(cli, "cmd_run", boom)
    assert cli.main(["run"]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(prefix), err


def test_a_command_that_returns_passes_its_code_through(monkeypatch):
    monkeypatch.setattr(cli.signal, "signal", lambda *a: None)
    monkeypatch.setattr(cli, "cmd_run", lambda _a: 1)   # an expectation missed
    assert cli.main(["run"]) == 1
    monkeypatch.setattr(cli, "cmd_run", lambda _a: 0)
    assert cli.main(["run"]) == 0


def _subparsers(p):
    import argparse as ap
    for a in p._actions:
        if isinstance(a, ap._SubParsersAction):
            for name, sp in a.choices.items():
                yield name, sp
                yield from ((f"{name} {n}", s) for n, s in _subparsers(sp))


def test_help_speaks_to_users():
    """Every command says what it does with an example and the exit codes in words;
    every argument is described; no developer docstring leaks into --help."""
    p = cli.parser()
    top = p.format_help()
    assert "``" not in top and "UserError" not in top and "exit status (vmlab run):" in top
    for name, sp in _subparsers(p):
        if " " not in name:   # the commands themselves
            h = sp.format_help()
            assert "example:\n  vmlab " in h and "125 could not test" in h, name
        for a in sp._actions:
            if a.dest != "help" and not a.__class__.__name__.startswith("_SubParsers"):
                assert a.help, f"vmlab {name}: {a.option_strings or a.dest} has no help"


def test_an_interrupted_vmlab_exits_with_its_own_status_not_by_the_signal(tmp_path):
    """After the first Ctrl-C vmlab tears down and returns 130; a Ctrl-C that arrives while
    Python finalizes (which restores SIG_DFL for Python-level handlers) must not turn that
    into death by SIGINT (seen in CI: -2 instead of 130)."""
    prog = textwrap.dedent("""
        import os, signal, sys, vmlab.cli as cli
        def fake(a):
            os.kill(os.getpid(), signal.SIGINT)   # the first Ctrl-C, mid-command
            raise AssertionError("the handler should have raised KeyboardInterrupt")
        cli.cmd_doctor = fake
        rc = cli.main(["doctor", "--no-boot"])
        # what finalization would do to a Python handler, then the late Ctrl-C
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        sys.exit(rc)
    """)
    r = subprocess.run([sys.executable, "-c", prog], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, env=dict(os.environ, VMLAB_STATE_DIR=str(tmp_path)))
    assert r.returncode == 130, (r.returncode, r.stderr)
    assert "interrupted" in r.stderr
