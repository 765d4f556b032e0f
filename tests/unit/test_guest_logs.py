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


class _AgentHere:
    """HostAgent.read_files through the real op, run in this process (the lab test runs
    it in the lab)."""
    def __init__(self):
        from vmlab import hostagent
        self.op = hostagent.Agent().op_read_files
        self.calls = 0

    def read_files(self, paths, max_bytes):
        import base64
        self.calls += 1
        files = self.op({"paths": paths, "max_bytes": max_bytes})["files"]
        return [None if f is None else (f["size"], base64.b64decode(f["data"])) for f in files]


def _guest(tmp_path):
    from types import SimpleNamespace

    from vmlab.local_session import LocalSession
    d = tmp_path / "lab"
    d.mkdir()
    (tmp_path / "out").mkdir()
    return SimpleNamespace(opts=SimpleNamespace(name="g"), dir=str(d), workdir=tmp_path / "out",
                           lab=SimpleNamespace(session=LocalSession())), d


def test_logs_come_through_the_agent_and_a_big_one_by_exec(tmp_path, monkeypatch):
    from vmlab import guest
    g, d = _guest(tmp_path)
    (d / "console.log").write_bytes(b"boot\n\xff\n")
    agent = _AgentHere()
    guest.Guest.fetch_logs(g, agent=agent)          # no qemu.log: nothing written for it
    assert agent.calls == 1
    assert (g.workdir / "g-console.log").read_bytes() == b"boot\n\xff\n"
    assert not (g.workdir / "g.qemu.log").exists()
    # past the cap: every byte still arrives, by the exec
    monkeypatch.setattr(guest, "AGENT_LOG_BYTES", 4)
    (d / "qemu.log").write_bytes(b"0123456789")
    guest.Guest.fetch_logs(g, agent=agent)
    assert agent.calls == 2
    assert (g.workdir / "g.qemu.log").read_bytes() == b"0123456789"
    assert (g.workdir / "g-console.log").read_bytes() == b"boot\n\xff\n"


def test_read_files_refuses_a_negative_cap():
    import pytest

    from vmlab import hostagent
    with pytest.raises(hostagent.AgentError):
        hostagent.Agent().op_read_files({"paths": [], "max_bytes": -1})
