"""vmlab/config.py: every experiment config loads; every bad one is ONE line naming file and key.
The CLI path (`vmlab run BAD.yaml`) exits 2 before anything starts."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmlab import config
from vmlab.errors import ConfigError, UserError

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = sorted((ROOT / "configs" / "experiments").glob("*.yaml"))
DEFAULT = (ROOT / "configs" / "experiments" / "default.yaml").read_text()

GOOD_UDMABUF = """\
version: 1
name: u
exporter: {kind: udmabuf, size: 64K}
moves:
  - mode: MIGRATE
    expect: STALE
"""

# name -> (file text, substring that must appear as the key path, substring of the message)
BAD = {
    "unknown_top_key": (DEFAULT + "bogus: 1\n", "<top level>", "bogus"),
    "unknown_nested_key": (DEFAULT.replace("  alloc: ORDER0", "  alloc: ORDER0\n  colour: red"),
                           "exporter", "colour"),
    "bad_move_mode": (DEFAULT.replace("  - mode: MIGRATE_NO_ZAP", "  - mode: SHUFFLE"),
                      "moves[1].mode", "SHUFFLE"),
    "bad_expect": (DEFAULT.replace("expect: STALE", "expect: [STALE, NOPE]"),
                   "moves[1].expect", "NOPE"),
    "size_not_pow2": (DEFAULT.replace("size: 1M", "size: 3M"), "exporter.size", "power of two"),
    "size_zero": (DEFAULT.replace("size: 1M", "size: 0"), "exporter.size", "power of two"),
    "size_below_page": (DEFAULT.replace("size: 1M", "size: 2048"), "exporter.size", "4096"),
    "missing_exporter": ("version: 1\nname: x\nmoves:\n  - mode: MIGRATE\n    expect: STALE\n",
                         "<top level>", "'exporter' is a required property"),
    "yaml_syntax": ("version: 1\nname: [x\n", "line ", "not valid YAML"),
    "yaml_mapping_values": ("a: b\n  c: d\n", "line 2", "not valid YAML"),
    "yaml_tab": ("a:\n\t- b\n", "line 2", "not valid YAML"),
    "non_mapping_list": ("- 1\n- 2\n", "", "must be a mapping"),
    "non_mapping_scalar": ("just a string\n", "", "must be a mapping"),
    "empty_file": ("", "", "must be a mapping"),
    "udmabuf_caching_change": (GOOD_UDMABUF.replace("expect: STALE", "caching: WC\n    expect: STALE"),
                               "moves[0].caching", "caching change"),
    "udmabuf_zap_only": (GOOD_UDMABUF.replace("mode: MIGRATE", "mode: ZAP_ONLY"),
                         "moves[0].mode", "needs exporter.kind vmlab"),
    "zap_only_caching": (DEFAULT.replace("  - mode: MIGRATE_NO_ZAP", "  - mode: ZAP_ONLY\n    caching: WC"),
                         "moves[1].caching", "caching change"),
    "bad_version": (DEFAULT.replace("version: 1", "version: 2"), "version", "1"),
    "bad_name": (DEFAULT.replace("name: default", "name: 'a b/c'"), "name", "does not match"),
    "no_moves": (DEFAULT.split("moves:")[0] + "moves: []\n", "moves", ""),
    # a YAML *reader* error (control character): must still be one line
    "yaml_control_char": ("version: 1\nname: a\x07b\n", "", "not valid YAML"),
}


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_shipped_experiments_load(path):
    exp = config.load(path)
    assert isinstance(exp.name, str) and exp.name
    assert exp.size >= 4096 and exp.size & (exp.size - 1) == 0
    assert exp.expanded_moves()


def test_shipped_experiments_exist():
    assert any(p.name == "default.yaml" for p in EXPERIMENTS)


def test_default_expanded_moves():
    exp = config.load(ROOT / "configs" / "experiments" / "default.yaml")
    assert exp.name == "default"
    assert exp.size == 1 << 20
    mv = exp.expanded_moves()
    assert [m["n"] for m in mv] == [1, 2, 3, 4]
    assert [m["mode"] for m in mv] == ["MIGRATE"] * 3 + ["MIGRATE_NO_ZAP"]
    assert [m["spec"] for m in mv] == [0, 0, 0, 1]
    assert [m["expect"] for m in mv] == [["REFAULTED"]] * 3 + [["STALE"]]
    assert [m["guest_write"] for m in mv] == [True] * 3 + [False]
    assert all(m["caching"] == "KEEP" for m in mv)


@pytest.mark.parametrize("v,n", [("4096", 4096), ("64K", 65536), ("1M", 1 << 20), ("2G", 2 << 30),
                                 (8192, 8192), (" 1m ", 1 << 20)])
def test_parse_size(v, n):
    assert config.parse_size(v) == n


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_config_one_line(tmp_path, name):
    text, key, msg = BAD[name]
    p = tmp_path / f"{name}.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as ei:
        config.load(p)
    e = ei.value
    s = str(e)
    assert isinstance(e, UserError) and e.exit_code == 2
    assert "\n" not in s and "\r" not in s, f"not one line: {s!r}"
    assert s.startswith(str(p) + ": "), s
    assert key in s and key in (e.key or ""), s
    assert msg in s, s


def test_several_errors_reported_at_once(tmp_path):
    p = tmp_path / "multi.yaml"
    p.write_text(DEFAULT.replace("  - mode: MIGRATE_NO_ZAP", "  - mode: X") + "zz: 1\n")
    with pytest.raises(ConfigError) as ei:
        config.load(p)
    s = str(ei.value)
    assert "\n" not in s
    assert "zz" in s and "moves[1].mode" in s and "'X'" in s


def test_missing_file(tmp_path):
    p = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as ei:
        config.load(p)
    s = str(ei.value)
    assert "\n" not in s and str(p) in s and "cannot read" in s


def test_non_utf8_file_is_config_error(tmp_path):
    """A file that is not UTF-8 is a user error (exit 2, one line), not a traceback."""
    p = tmp_path / "latin1.yaml"
    p.write_bytes(b"version: 1\nname: caf\xe9\n")
    with pytest.raises(ConfigError) as ei:
        config.load(p)
    assert "\n" not in str(ei.value) and str(p) in str(ei.value)


# --- through the CLI ---------------------------------------------------------------------
def run_cli(args, cwd, timeout=30):
    env = dict(os.environ, VMLAB_STATE_DIR=str(cwd / "state"), VMLAB_CACHE_DIR=str(cwd / "cache"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "vmlab.cli", *args], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=timeout)
    return r, time.monotonic() - t0


CLI_CASES = ["bad_move_mode", "size_not_pow2", "missing_exporter", "yaml_syntax",
             "udmabuf_caching_change", "unknown_top_key", "yaml_control_char"]


@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_run_bad_config(tmp_path, name):
    text, key, msg = BAD[name]
    p = tmp_path / f"{name}.yaml"
    p.write_text(text)
    r, dt = run_cli(["run", str(p)], tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("vmlab: error: ")
    assert str(p) in lines[0] and key in lines[0] and msg in lines[0]
    assert not (tmp_path / "results").exists()
    assert dt < 15


def test_cli_run_bad_config_relative_path(tmp_path):
    (tmp_path / "rel.yaml").write_text(BAD["bad_move_mode"][0])
    r, _ = run_cli(["run", "rel.yaml"], tmp_path)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [r.stderr.rstrip("\n")]
    assert "rel.yaml: moves[1].mode:" in r.stderr
    assert not (tmp_path / "results").exists()


def test_cli_run_missing_config(tmp_path):
    r, _ = run_cli(["run", str(tmp_path / "missing.yaml")], tmp_path)
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmlab: error: ")
    assert str(tmp_path / "missing.yaml") in lines[0]
    assert not (tmp_path / "results").exists()


def test_cli_run_non_utf8_config(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes(b"version: 1\nname: caf\xe9\n")
    r, _ = run_cli(["run", str(p)], tmp_path)
    assert r.returncode == 2, r.stderr[-500:]
    assert len(r.stderr.splitlines()) == 1, r.stderr[-500:]
    assert not (tmp_path / "results").exists()
