"""vmlab/run_dir.py result writers: junit.xml, the table, the reproducer (no VM)."""
from __future__ import annotations

import os
import shlex
import stat
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vmlab import config, run_dir
from vmlab.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def fake_result() -> dict:
    return {"experiment": "demo", "status": "finished", "passed": False, "moves": [
        {"n": 1, "mode": "MIGRATE", "expected": ["REFAULTED"], "verdict": "REFAULTED",
         "pages": {"REFAULTED": 256}, "passed": True},
        {"n": 2, "mode": "MIGRATE_NO_ZAP", "expected": ["STALE", "TORN"], "verdict": "REFAULTED",
         "pages": {"REFAULTED": 256}, "passed": False, "detail": "<&\"'> odd chars"},
    ]}


def test_write_junit(tmp_path):
    p = tmp_path / "junit.xml"
    run_dir.write_junit(p, fake_result())
    root = ET.parse(p).getroot()
    assert root.tag == "testsuite"
    assert root.get("name") == "vmlab.demo"
    assert root.get("tests") == "3"
    assert root.get("failures") == "2"    # the move, and so the run
    cases = root.findall("testcase")
    assert [c.get("name") for c in cases] == ["move001-MIGRATE", "move002-MIGRATE_NO_ZAP", "run"]
    assert cases[2].find("failure").get("message") == "the run did not pass (status finished)"
    assert all(c.get("classname") == "vmlab.demo" for c in cases)
    assert cases[0].find("failure") is None
    f = cases[1].find("failure")
    assert f is not None
    msg = f.get("message")
    assert "REFAULTED" in msg and "STALE/TORN" in msg
    assert msg == "verdict REFAULTED expected STALE/TORN"
    assert "<&\\\"'> odd chars" in f.text  # escaped in XML, intact after parsing


def test_write_junit_all_pass_and_missing_verdict(tmp_path):
    res = fake_result()
    res["moves"][1]["passed"] = True
    res["passed"] = True
    run_dir.write_junit(tmp_path / "a.xml", res)
    root = ET.parse(tmp_path / "a.xml").getroot()
    assert (root.get("tests"), root.get("failures")) == ("3", "0")
    assert root.find("testcase/failure") is None
    res = {"experiment": "x", "moves": [{"n": 1, "mode": "ZAP_ONLY", "expected": ["STALE"]}]}
    run_dir.write_junit(tmp_path / "b.xml", res)
    root = ET.parse(tmp_path / "b.xml").getroot()
    assert (root.get("tests"), root.get("failures")) == ("2", "2")
    assert root.find("testcase/failure").get("message") == "verdict None expected STALE"


def test_write_junit_no_moves(tmp_path):
    """A lab that never booted: no move, no baseline, and junit must not read green."""
    run_dir.write_junit(tmp_path / "j.xml", {"experiment": "e", "moves": [], "passed": False,
                                             "status": "could_not_test",
                                             "error": "CouldNotTest: the lab did not boot"})
    root = ET.parse(tmp_path / "j.xml").getroot()
    assert (root.get("tests"), root.get("failures")) == ("1", "1")
    msg = root.find("testcase[@name='run']/failure").get("message")
    assert msg == "the run did not pass (status could_not_test): CouldNotTest: the lab did not boot"


def test_write_junit_cut_short_after_passing_moves(tmp_path):
    """Baseline and one move passed, then the lab went away: the run fails in junit too."""
    res = {"experiment": "e", "status": "error", "passed": False, "error": "RemoteError: gone",
           "baseline": {"passed": True, "verdict": "REFAULTED"},
           "moves": [{"n": 1, "mode": "MIGRATE", "expected": ["REFAULTED"], "verdict": "REFAULTED",
                      "passed": True}]}
    run_dir.write_junit(tmp_path / "j.xml", res)
    root = ET.parse(tmp_path / "j.xml").getroot()
    assert (root.get("tests"), root.get("failures")) == ("3", "1")
    assert root.find("testcase[@name='run']/failure") is not None


def test_write_junit_not_applicable_has_no_run_case(tmp_path):
    run_dir.write_junit(tmp_path / "j.xml", {"experiment": "e", "moves": [], "passed": False,
                                             "status": "not_applicable", "not_applicable": "no udmabuf"})
    root = ET.parse(tmp_path / "j.xml").getroot()
    assert (root.get("tests"), root.get("failures")) == ("1", "0")
    assert root.find("testcase[@name='applicable']/skipped") is not None


def test_table_marks_mismatch():
    lines = run_dir.table(fake_result()).splitlines()
    assert len(lines) == 3
    assert lines[0].split() == ["move", "mode", "verdict", "expected", "pages"]
    assert "MISMATCH" not in lines[1]
    assert lines[1].split()[:4] == ["1", "MIGRATE", "REFAULTED", "REFAULTED"]
    assert lines[2].rstrip().endswith("<-- MISMATCH")
    assert lines[2].split()[:4] == ["2", "MIGRATE_NO_ZAP", "REFAULTED", "STALE/TORN"]
    assert '{"REFAULTED": 256}' in lines[2]


def test_write_reproducer(tmp_path):
    src = tmp_path / "my exp.yaml"
    src.write_text((ROOT / "configs/experiments/default.yaml").read_text())
    exp = config.load(src)
    out = tmp_path / "out"
    out.mkdir()
    run_dir.write_reproducer(out, exp, ["--accel=tcg"])
    assert (out / "config.yaml").read_text() == src.read_text()
    sh = out / "reproduce.sh"
    mode = stat.S_IMODE(sh.stat().st_mode)
    assert mode & stat.S_IXUSR and mode == 0o755
    text = sh.read_text()
    assert text.startswith("#!/bin/sh\n")
    assert f"cd {shlex.quote(str(ROOT))} || exit 1" in text
    last = text.strip().splitlines()[-1]
    assert last.startswith("exec \"$VMLAB\" run \"$here/config.yaml\"")
    assert "config.yaml" in last and "--accel=tcg" in last and last.endswith('"$@"')
    assert os.access(sh, os.X_OK)


def test_results_dir(tmp_path, monkeypatch):
    exp = config.load(ROOT / "configs/experiments/default.yaml")
    d = run_dir.results_dir(exp.name, str(tmp_path / "given"))
    assert d == tmp_path / "given" and d.is_dir()
    monkeypatch.chdir(tmp_path)
    d = run_dir.results_dir(exp.name, None)
    assert d.parent == tmp_path / "results"
    assert d.name.endswith("-default") and d.name[:8].isdigit()
    # two runs started in the same second get two directories
    d2 = run_dir.results_dir(exp.name, None)
    assert d2 != d and d2.parent == d.parent and d2.name.startswith(d.name)


def test_out_refuses_a_directory_holding_files(tmp_path):
    """--out ~/.ssh once destroyed the user's key: a non-empty --out is refused, untouched."""
    exp = config.load(ROOT / "configs/experiments/default.yaml")
    home = tmp_path / "dot-ssh"
    home.mkdir(mode=0o755)
    key = home / "id_ed25519"
    key.write_text("users-private-key")
    with pytest.raises(UserError) as e:
        run_dir.results_dir(exp.name, str(home))
    assert e.value.exit_code == 2 and "not empty" in str(e.value)
    assert key.read_text() == "users-private-key"
    assert stat.S_IMODE(home.stat().st_mode) == 0o755
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(UserError):
        run_dir.results_dir(exp.name, str(f))
    assert f.read_text() == "x"


def test_out_accepts_an_empty_directory(tmp_path):
    exp = config.load(ROOT / "configs/experiments/default.yaml")
    (tmp_path / "empty").mkdir()
    assert run_dir.results_dir(exp.name, str(tmp_path / "empty")) == tmp_path / "empty"
