"""What vmlab is doing, for a person and for a log.

On a terminal: every step is printed once, and below it one live line (rich) with the
current phase, the time since vmlab started and, for a matrix, cell k of N with an
estimate of the time left. Anywhere else (CI logs, pipes): plain lines, each with the UTC
time and the seconds since vmlab started. The same callable serves every command:
``progress("message")``; a matrix also calls ``progress.steps(done, total)``.
"""
from __future__ import annotations

import sys
import threading
import time
from datetime import datetime, timezone


class Progress:
    def __init__(self, stream=None, live: bool | None = None):
        self.t0 = time.monotonic()
        self._stream = stream
        self._live = live
        self._lock = threading.Lock()
        self._bar = None       # rich.progress.Progress while live
        self._task = None
        self._with_steps = False
        self._closed = False

    @property
    def stream(self):
        return self._stream or sys.stderr

    def live(self) -> bool:
        if self._live is None:
            try:
                self._live = self.stream.isatty()
            except (AttributeError, ValueError):
                self._live = False
        return self._live

    def __call__(self, msg: str) -> None:
        elapsed = time.monotonic() - self.t0
        with self._lock:
            if self.live() and not self._closed:
                bar = self._start()
                bar.console.print(f"[vmlab {elapsed:6.1f}s] {msg}", markup=False, highlight=False,
                                  soft_wrap=True)
                bar.update(self._task, description=msg if len(msg) <= 70 else msg[:67] + "...")
                return
        now = datetime.now(timezone.utc).strftime("%H:%M:%SZ")
        print(f"[vmlab {now} {elapsed:6.1f}s] {msg}", file=self.stream, flush=True)

    def steps(self, done: int, total: int) -> None:
        """k of N (a matrix's cells): the live line shows it and estimates the rest."""
        with self._lock:
            if self.live() and not self._closed:
                if self._bar is not None and not self._with_steps:
                    desc = self._bar.tasks[0].description
                    self._bar.stop()           # again, with k/N and the estimate
                    self._bar = None
                    self._with_steps = True
                    self._start().update(self._task, description=desc)
                self._with_steps = True
                self._start().update(self._task, completed=done, total=total)

    def _start(self):
        if self._bar is None:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as Bar, SpinnerColumn,
                                       TextColumn, TimeElapsedColumn, TimeRemainingColumn)
            counted = [BarColumn(bar_width=20), MofNCompleteColumn(), TimeRemainingColumn()] \
                if self._with_steps else []
            self._bar = Bar(SpinnerColumn(), TimeElapsedColumn(), *counted,
                            TextColumn("{task.description}"),
                            console=Console(file=self.stream, force_terminal=self._live is True),
                            transient=True, refresh_per_second=4,
                            # stdout may be a pipe while stderr is the terminal: never take it over
                            redirect_stdout=False, redirect_stderr=False)
            self._task = self._bar.add_task("", total=None)
            self._bar.start()
        return self._bar

    def close(self) -> None:
        """Stop the live line (its refresh thread) and leave the terminal as it was."""
        with self._lock:
            self._closed = True
            bar, self._bar = self._bar, None
        if bar is not None:
            try:
                bar.stop()
            except Exception:
                pass
