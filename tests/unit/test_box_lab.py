"""lab.kind ssh: the box's address, key and known_hosts from the config, and what a box
config may not say (it runs its own kernel and QEMU)."""
from __future__ import annotations

import re

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
