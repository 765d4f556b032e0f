"""images.ensure_all: a first run's missing images built side by side, and a failure or an
interrupt that stops the other builds' real steps (a `sleep` standing in for mmdebstrap,
run by the real _run_logged)."""
from __future__ import annotations

import threading
import time

import pytest

from vmlab import images


class R:
    def __init__(self, kind):
        self.kind = kind


def _step(tmp_path, kind, seconds):
    images._run_logged(["sleep", str(seconds)], tmp_path / f"{kind}.log", f"{kind} step", lambda m: None,
                       timeout=60)


def test_missing_images_are_built_at_once_in_recipe_order(monkeypatch, tmp_path):
    lab, guest, other = R("lab"), R("guest"), R("other")
    spans = {}

    def build(r, progress):
        t0 = time.monotonic()
        _step(tmp_path, r.kind, 1)
        spans[r.kind] = (t0, time.monotonic(), threading.current_thread().name)
        return f"image-{r.kind}"
    monkeypatch.setattr(images, "find", lambda r: "found-other" if r is other else None)
    monkeypatch.setattr(images, "build", build)
    assert images.ensure_all([lab, other, guest]) == ["image-lab", "found-other", "image-guest"]
    (a0, a1, a_thread), (b0, b1, b_thread) = spans["lab"], spans["guest"]
    assert a_thread == threading.main_thread().name and b_thread == "image-guest"
    assert max(a0, b0) < min(a1, b1)        # they overlapped


def test_a_failing_build_stops_the_others_steps(monkeypatch, tmp_path):
    lab, guest = R("lab"), R("guest")
    started = threading.Event()

    def build(r, progress):
        if r is guest:
            started.set()
            _step(tmp_path, "guest", 30)
            return "image-guest"
        started.wait(10)
        raise RuntimeError("mirror down")
    monkeypatch.setattr(images, "find", lambda r: None)
    monkeypatch.setattr(images, "build", build)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="mirror down"):
        images.ensure_all([lab, guest])
    assert time.monotonic() - t0 < 10          # the guest's 30 s step was stopped
    assert not [t for t in threading.enumerate() if t.name == "image-guest"]


def test_the_threads_failure_is_raised_after_the_first_build(monkeypatch, tmp_path):
    lab, guest = R("lab"), R("guest")
    done = []

    def build(r, progress):
        if r is guest:
            raise images.ImageMissing("no guest kernel")
        _step(tmp_path, "lab", 1)
        done.append("lab")
        return "image-lab"
    monkeypatch.setattr(images, "find", lambda r: None)
    monkeypatch.setattr(images, "build", build)
    with pytest.raises(images.ImageMissing):
        images.ensure_all([lab, guest])
    assert done == ["lab"]      # its image is kept for the next run


def test_one_missing_image_is_built_here(monkeypatch, tmp_path):
    lab, guest = R("lab"), R("guest")
    found = images.Image("lab", tmp_path, {})
    monkeypatch.setattr(images, "find", lambda r: found if r is lab else None)
    monkeypatch.setattr(images, "build", lambda r, p: threading.current_thread().name)
    assert images.ensure_all([lab, guest], lambda m: None) == [found, threading.main_thread().name]
