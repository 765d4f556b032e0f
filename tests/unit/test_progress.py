"""vmlab.progress: timestamped lines for logs, a live line on a terminal."""
from __future__ import annotations

import io
import re

from vmlab.progress import Progress


def test_plain_lines_have_the_time_and_the_elapsed_seconds():
    out = io.StringIO()
    p = Progress(out, live=False)
    p("booting lab host")
    p.steps(1, 3)          # nothing to draw in a log
    p.close()
    assert re.fullmatch(r"\[vmlab \d\d:\d\d:\d\dZ +\d+\.\ds\] booting lab host\n", out.getvalue())


def test_on_a_terminal_every_step_is_printed_once_and_the_live_line_goes_at_close():
    out = io.StringIO()
    p = Progress(out, live=True)
    p("cell 1/2 a[trixie]: running")
    p.steps(0, 2)
    p("cell 1/2 a[trixie]: REFAULTED (expected REFAULTED): match")
    p.steps(1, 2)
    p.close()
    text = out.getvalue()
    assert text.count("cell 1/2 a[trixie]: running") >= 1 and "match" in text
    assert p._bar is None
    p("after close")        # never a live line again: a plain line
    assert re.search(r"\[vmlab \d\d:\d\d:\d\dZ .*\] after close", out.getvalue())
