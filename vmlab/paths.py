"""Where vmlab keeps things: images in the user's cache, live state per user, results per run."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
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


def sha256_file(p: Path) -> str:
    """The hex SHA256 of a file, read in 1 MiB chunks (images and .debs are large)."""
    import hashlib
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def repo_root() -> Path:
    """The source tree vmlab runs from (recipes, host-tools, guest agent source)."""
    return Path(__file__).resolve().parent.parent


def private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def runtime_dir(prefix: str = "vmlab-") -> Path:
    """A new private (0700) directory for one command's secrets and sockets: its SSH key,
    the lab share, QMP sockets. Never the user's --out directory; short enough for
    unix-socket paths. The caller removes it."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if not base or not os.path.isdir(base):
        base = None  # tempfile's default (/tmp)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def write_atomic(path: Path, text: str, mode: int = 0o600) -> None:
    """Readers see the old file or the new one, never half of it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_json(path: Path) -> dict | None:
    """A JSON object from ``path``, or None when it is missing, unreadable or corrupt."""
    try:
        v = json.loads(Path(path).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return v if isinstance(v, dict) else None


@contextlib.contextmanager
def locked(path: Path, what: str, timeout: float = 900, shared: bool = False):
    """An exclusive (``shared``: shared) flock on ``path`` for the duration; waits at most
    ``timeout``."""
    from .errors import WaitTimeout
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        end = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= end:
                    raise WaitTimeout(f"the lock on {what} ({path}); another vmlab holds it", timeout)
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def set_aside(directory: Path, names, tag: str) -> list[str]:
    """Each ``NAME.log`` of ``names`` that exists in ``directory`` renamed to
    ``NAME.TAG.log``, out of the way of the next VM of that name (a retried boot, a guest
    replaced); the new names."""
    kept = []
    for name in names:
        src = Path(directory) / name
        if src.exists():
            dst = src.with_name(f"{name[:-len('.log')]}.{tag}.log")
            src.rename(dst)
            kept.append(dst.name)
    return kept
