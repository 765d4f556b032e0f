"""What a test needs from the machine, and what its absence means.

Locally a missing tool skips the test with the reason; under CI (any CI other than
empty, 0, false, no) it fails it: host-tools/install-deps installs every tool named
here, so its absence in CI is a broken set-up, never a pass."""
from __future__ import annotations

import os
import shutil

import pytest


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(what: str) -> None:
    """Fail (CI) or skip (locally) because ``what`` is not available."""
    if under_ci():
        pytest.fail(f"prerequisite missing under CI: {what}", pytrace=False)
    pytest.skip(what)


def need_tools(*tools: str) -> None:
    absent = [t for t in tools if shutil.which(t) is None]
    if absent:
        missing(f"{', '.join(absent)} not installed (run host-tools/install-deps)")
