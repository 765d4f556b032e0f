"""configs/ci/: the shipped GitHub Actions and GitLab CI files validate against the schemas
that check-jsonschema vendors (vendor.github-workflows, vendor.gitlab-ci), and the check can
fail: a broken copy of each is refused. The lab test of shards and merge is in
tests/lab/test_shards.py."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ..prereq import missing

ROOT = Path(__file__).resolve().parents[2]
FILES = {"github-actions.yml": "vendor.github-workflows", "gitlab-ci.yml": "vendor.gitlab-ci"}


def _check(schema: str, path: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent)) or \
        shutil.which("check-jsonschema")
    if exe is None:
        missing("check-jsonschema not installed (run host-tools/install-deps)")
    return subprocess.run([exe, "--builtin-schema", schema, str(path)], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("name", sorted(FILES))
def test_shipped_workflow_is_valid(name):
    r = _check(FILES[name], ROOT / "configs" / "ci" / name)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("name,old,new", [
    ("github-actions.yml", "runs-on: [self-hosted, linux, x64, vmlab]\n    timeout-minutes: 90",
     "timeout-minutes: 90"),
    ("gitlab-ci.yml", "  when: always\n  timeout: 30m", "  when: sometimes\n  timeout: 30m"),
])
def test_a_broken_workflow_is_refused(tmp_path, name, old, new):
    text = (ROOT / "configs" / "ci" / name).read_text()
    assert old in text
    bad = tmp_path / name
    bad.write_text(text.replace(old, new, 1))
    assert _check(FILES[name], bad).returncode != 0


@pytest.mark.parametrize("name", sorted(FILES))
def test_workflow_runs_the_shards_and_the_merge(name):
    text = (ROOT / "configs" / "ci" / name).read_text()
    assert "vmlab matrix --kernels" in text and "--shard" in text
    assert "vmlab report merge" in text and "host-tools/install-deps" in text
