"""vmlab run --keep stops only a lab it booted itself (the persistent lab's calls faked at
reuse's boundary; tests/lab/test_cli_lifecycle.py runs --keep for real)."""
from __future__ import annotations

import argparse

import pytest

from vmlab import experiment, reuse


class Stop(Exception):
    """Ends the run right where it would take the lab."""


def keep_run(monkeypatch, tmp_path, lab_up_answer, running_after: bool, claims: bool = True):
    """``lab_up_answer``: what lab_up returns (or raises); ``claims``: whether it got as
    far as claiming the lab (the lock held, no lab up) before that."""
    downs = []
    running = iter([False] + [running_after] * 5)     # was_up, then in finally
    monkeypatch.setattr(reuse, "lab_running", lambda: next(running))
    monkeypatch.setattr(reuse, "mismatch_of_running", lambda shape: ({}, None))

    def lab_up(opts, progress, claimed):
        if claims:
            claimed.append(True)
        if isinstance(lab_up_answer, BaseException):
            raise lab_up_answer
        return lab_up_answer
    monkeypatch.setattr(reuse, "lab_up", lab_up)

    def persistent_lab(*a, **kw):
        raise Stop()
    monkeypatch.setattr(reuse, "persistent_lab", persistent_lab)
    monkeypatch.setattr(reuse, "lab_down", lambda progress: downs.append(True))
    args = argparse.Namespace(config=None, keep=True, fresh=False, out=str(tmp_path / "out"),
                              verbose=False)
    for k in ("kernel", "guest_kernel", "accel", "qemu", "lab_memory", "no_build"):
        setattr(args, k, None)
    with pytest.raises((Stop, KeyboardInterrupt)):
        experiment.main(args, lambda msg: None)
    return downs


def test_keep_leaves_another_commands_lab_up(monkeypatch, tmp_path):
    """Another 'vmlab lab up' won the race: lab_up said so (False); the lab is not ours."""
    assert keep_run(monkeypatch, tmp_path, False, running_after=True, claims=False) == []


def test_keep_interrupted_behind_another_commands_boot_leaves_it_up(monkeypatch, tmp_path):
    """Ctrl-C while lab_up waits for the lock another command's boot holds."""
    assert keep_run(monkeypatch, tmp_path, KeyboardInterrupt(), running_after=True, claims=False) == []


def test_keep_stops_the_lab_it_booted_when_nothing_ran(monkeypatch, tmp_path):
    assert keep_run(monkeypatch, tmp_path, True, running_after=True) == [True]


def test_keep_stops_a_lab_whose_boot_was_interrupted(monkeypatch, tmp_path):
    assert keep_run(monkeypatch, tmp_path, KeyboardInterrupt(), running_after=True) == [True]
