"""fetch_logs' framing: the guest's console and QEMU log in one exec in the lab."""
from __future__ import annotations

import subprocess

from vmlab.guest import _sized_cat, _sized_parts


def test_sized_parts_split_what_the_script_wrote(tmp_path):
    (tmp_path / "a").write_bytes(b"line 1\nline 2 \xc3\xa9\n")
    script = _sized_cat([f"{tmp_path}/{n}" for n in ("a", "missing", "a")])
    out = subprocess.run(["sh", "-c", script], capture_output=True).stdout
    assert _sized_parts(out) == [b"line 1\nline 2 \xc3\xa9\n", None, b"line 1\nline 2 \xc3\xa9\n"]
    assert _sized_parts(b"5\nab") == [b"ab"]          # cut short: what arrived
    assert _sized_parts(b"") == [] and _sized_parts(b"garbage") == []
