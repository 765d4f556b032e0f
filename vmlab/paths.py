"""Where vmlab keeps things: images in the user's cache, live state per user, results per run."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(os.environ.get("VMLAB_CACHE_DIR") or os.path.join(base, "vmlab"))


def images_dir() -> Path:
    return cache_dir() / "images"


def state_dir() -> Path:
    """Live state of a lab started with ``vmlab lab up`` (QMP socket, console, key)."""
    p = Path(os.environ.get("VMLAB_STATE_DIR") or (cache_dir() / "state"))
    p.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(p, 0o700)
    return p


def repo_root() -> Path:
    """The source tree vmlab runs from (recipes, host-tools, guest agent source)."""
    return Path(__file__).resolve().parent.parent


def private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path
