"""A report as a person sees it: Debian's headless Chromium renders report.html, and the
test reads the DOM it built and the pixels of a screenshot. A missing Chromium is a
missing prerequisite (fails under CI, skips otherwise)."""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.prereq import missing

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--disable-extensions", "--allow-file-access-from-files"]


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        missing("chromium is not installed (run host-tools/install-deps)")
    return exe


def render(page: Path, width: int = 1200, height: int = 2400) -> tuple[str, "object"]:
    """(the DOM Chromium built, the screenshot as a PIL image)."""
    from PIL import Image
    exe = chromium()
    url = page.resolve().as_uri()
    with tempfile.TemporaryDirectory() as tmp:
        dom = subprocess.run([exe, *FLAGS, f"--user-data-dir={tmp}/profile", "--dump-dom", url],
                             capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert dom.returncode == 0 and "<html" in dom.stdout, dom.stderr[-2000:]
        shot = Path(tmp) / "shot.png"
        r = subprocess.run([exe, *FLAGS, f"--user-data-dir={tmp}/profile", f"--screenshot={shot}",
                            f"--window-size={width},{height}", url],
                           capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
        img = Image.open(shot).convert("RGB")
        img.load()
    return dom.stdout, img


def colour_pixels(img, rgb: tuple[int, int, int], tolerance: int = 12) -> int:
    """How many pixels of the screenshot have (about) this colour."""
    n = 0
    for c, (r, g, b) in img.getcolors(maxcolors=1 << 22) or []:
        if abs(r - rgb[0]) <= tolerance and abs(g - rgb[1]) <= tolerance and abs(b - rgb[2]) <= tolerance:
            n += c
    return n


def hex_rgb(h: str) -> tuple[int, int, int]:
    return int(h[1:3], 16), int(h[3:5], 16), int(h[5:7], 16)
