"""lab.kind ssh: the box's address, key and known_hosts from the config, and what a box
config may not say (it runs its own kernel and QEMU)."""
from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vmlab import cli, config
from vmlab.box_lab import BoxSpec, exporter_version
from vmlab.errors import ConfigError


@pytest.fixture
def files(tmp_path):
    (tmp_path / "id").write_text("k")
    (tmp_path / "kh").write_text("")
    return tmp_path


@pytest.mark.parametrize("host, want", [
    ("root@box.example:2222", ("root", "box.example", 2222)),
    ("box.example", ("root", "box.example", 22)),
    ("dev@10.0.0.5", ("dev", "10.0.0.5", 22)),
    ("root@[fe80::1]:22", ("root", "fe80::1", 22)),
])
def test_host_forms(files, host, want):
    b = BoxSpec.parse({"host": host, "key": "id", "known_hosts": "kh"}, str(files / "e.yaml"))
    assert (b.user, b.host, b.port) == want
    assert b.key == files / "id" and b.known_hosts == files / "kh"


@pytest.mark.parametrize("raw, key, why", [
    ({"host": "a b", "key": "id", "known_hosts": "kh"}, "lab.host", "USER@HOST[:PORT]"),
    ({"host": "box:99999", "key": "id", "known_hosts": "kh"}, "lab.host", "not a TCP port"),
    ({"host": "box", "key": "nope", "known_hosts": "kh"}, "lab.key", "no such file"),
    ({"host": "box", "key": "id", "known_hosts": "nope"}, "lab.known_hosts", "no such file"),
])
def test_bad_box_is_one_line(files, raw, key, why):
    with pytest.raises(ConfigError, match=re.escape(why)) as e:
        BoxSpec.parse(raw, str(files / "e.yaml"))
    assert e.value.key == key and e.value.exit_code == 2


def _exp(files, lab: str):
    y = files / "e.yaml"
    y.write_text(f"version: 1\nname: e\nlab: {lab}\nexporter: {{kind: vmlab, size: 1M}}\n"
                 "baseline: {expect: REFAULTED}\n")
    return y


def test_a_box_config_resolves_and_takes_no_kernel(files):
    exp = config.load(_exp(files, "{kind: ssh, host: 'root@127.0.0.1:2200', key: id, known_hosts: kh}"))
    o = config.resolve(exp, cli.parser().parse_args(["run"]))
    assert o["lab_kind"] == "ssh" and o["box"]["port"] == 2200 and o["box"]["key"] == str(files / "id")
    with pytest.raises(ConfigError, match="--kernel: lab.kind ssh: the box runs its own kernel"):
        config.resolve(exp, cli.parser().parse_args(["run", "--kernel", "forky"]))
    with pytest.raises(ConfigError, match="lab.kind ssh needs it"):
        config.load(_exp(files, "{kind: ssh, key: id}"))
    with pytest.raises(ConfigError, match="only lab.kind ssh takes it"):
        config.load(_exp(files, "{host: box}"))
    assert config.resolve(None, None)["box"] is None


def test_the_dkms_version_is_the_source():
    v = exporter_version()
    assert v.startswith("vmlab-") and v == exporter_version()


def test_a_key_with_a_passphrase_or_no_key_is_one_line(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from vmlab import ssh
    from vmlab.errors import UserError
    locked = tmp_path / "locked"
    locked.write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(UserError, match="protected by a passphrase"):
        ssh.SSHSession.connect("box", "127.0.0.1", 1, locked, timeout=1, known_hosts=tmp_path / "kh")
    junk = tmp_path / "junk"
    junk.write_text("not a key\n")
    with pytest.raises(UserError, match="not a private key vmlab can use"):
        ssh.SSHSession.connect("box", "127.0.0.1", 1, junk, timeout=1, known_hosts=tmp_path / "kh")


def test_local_session_runs_bounds_and_writes(tmp_path):
    from vmlab.errors import RemoteError, WaitTimeout
    from vmlab.local_session import LocalSession
    s = LocalSession()
    assert s.run("echo out; echo err >&2; exit 3", check=False) == (3, "out\n", "err\n")
    assert s.run("cat", input=b"fed")[1] == "fed"
    with pytest.raises(RemoteError, match="exited 3"):
        s.run("exit 3")
    marker = tmp_path / "late"
    with pytest.raises(WaitTimeout):
        # the whole group dies at the deadline, not only the shell
        s.run(f"(sleep 3; touch {marker}) & sleep 30", timeout=0.5)
    time.sleep(3.5)
    assert not marker.exists()
    s.put(b"x", str(tmp_path / "f"), 0o600)
    assert (tmp_path / "f").read_bytes() == b"x" and (tmp_path / "f").stat().st_mode & 0o777 == 0o600


def test_a_local_command_has_exited_while_a_child_it_left_holds_its_stdout():
    """As sshd's exit-status: the shell's exit counts once its output is in, though a
    background child keeps the pipe open (it once did only at that child's end)."""
    from vmlab.local_session import LocalChannel
    from vmlab.ssh import ChannelReader
    chan = LocalChannel("sleep 60 & echo started; exit 4")
    try:
        rd = ChannelReader(chan, "background child")
        assert rd.pump(time.monotonic() + 20) == "exit"
        assert (rd.rc, bytes(rd.out)) == (4, b"started\n")
    finally:
        chan.kill()


def test_the_lock_holder_undoes_a_run_that_vanished_and_a_second_run_waits(tmp_path, monkeypatch):
    """The box's dead-man switch, for real on this machine (lab kind local): the run's
    undo script runs when its lock channel ends without vmlab, and a second run that
    was waiting for the lock gets it only once that undo is complete."""
    from vmlab import box_lab
    from vmlab.local_session import LocalSession
    (tmp_path / "lock").mkdir()
    monkeypatch.setattr(box_lab, "LOCK", str(tmp_path / "lock" / "box.lock"))
    first, second = (box_lab.BoxLab(tmp_path / n, None) for n in ("a", "b"))
    for b in (first, second):
        b.session = LocalSession()
    first._lock(progress=lambda m: None)
    run_dir = Path(first.share_dir)
    assert run_dir.is_dir() and run_dir.name.startswith("vmlab-run.")
    done = tmp_path / "undone"
    first._will_undo("the first step", f"sleep 2; echo first >> {done}")
    first._will_undo("the second step", f"echo second >> {done}; exit 1")
    first._will_undo("a hung step", "sleep 600", timeout=2)
    # a process of the run (its argv names the run's directory), as a host agent is
    agent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)",
                              f"{run_dir}/hostagent.py"])
    said, got = [], []
    t = threading.Thread(target=lambda: got.append(second._lock(progress=said.append)), daemon=True)
    try:
        t.start()
        end = time.monotonic() + 20
        while not any("waiting up to" in m for m in said) and time.monotonic() < end:
            time.sleep(0.1)
        assert t.is_alive() and any("waiting up to" in m for m in said)
        first._stop_heartbeat()
        first._lock_chan.close()             # vmlab gone: no down(), only the channel's end
        t.join(timeout=60)
        assert got == [None]
        # the lock passed only after the whole undo: last first, each on its own (a
        # failing or hung step does not stop the ones before it), the run's processes gone
        assert done.read_text() == "second\nfirst\n"
        assert not run_dir.exists()
        assert agent.wait(timeout=10) == -9
    finally:
        agent.kill()
        if first._lock_chan is not None:
            first._lock_chan.close()
    second.down()                        # the normal way: EOF, the undo, its report
    assert not Path(second.share_dir).exists()
