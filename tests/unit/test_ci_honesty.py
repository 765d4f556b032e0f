"""Under CI a missing lab prerequisite fails the run; it never passes as skipped/xfailed."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ONE_LAB_TEST = "tests/lab/test_lifecycle.py::test_missing_image"


def _pytest(env_extra: dict) -> subprocess.CompletedProcess:
    # No qemu-system-x86_64 and no mmdebstrap on PATH: the lab prerequisites are missing.
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(PATH="/nonexistent", **env_extra)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           ONE_LAB_TEST], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("ci", ["true", "1", "yes"])
def test_missing_prerequisite_fails_under_ci(ci):
    r = _pytest({"CI": ci})
    assert r.returncode == 1, r.stdout + r.stderr
    assert ("1 failed" in r.stdout or "1 error" in r.stdout) and "prerequisite missing under CI" in r.stdout
    assert "xfail" not in r.stdout and "skipped" not in r.stdout


def test_missing_prerequisite_skips_locally():
    r = _pytest({})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 skipped" in r.stdout


def test_missing_tool_fails_unit_tests_under_ci(monkeypatch):
    """The unit tests' own tools (gcc, make, cpio) follow the same rule."""
    from tests.prereq import need_tools
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no-such-tool-vmlab"):
        need_tools("no-such-tool-vmlab")
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception):
        need_tools("no-such-tool-vmlab")
