"""The catalog and `vmlab matrix` without a lab: loading, planning, cells, exit status,
junit and the HTML report. The lab test (tests/lab/test_catalog.py) runs it for real."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vmlab import catalog, config, matrix, report
from vmlab.cli import parser
from vmlab.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
TRIXIE, BACKPORTS = "6.12.57+deb13-amd64", "7.3.4+deb14-amd64"


def test_catalog_entries_cite_and_resolve_on_both_ci_kernels():
    entries = catalog.load()
    ids = [e.name for e in entries]
    assert len(ids) == len(set(ids)) >= 8
    for e in entries:
        assert e.raw["title"] and e.raw["why"] and e.raw["links"], e.name
        for rel in (TRIXIE, BACKPORTS):
            assert e.baseline_expect_for(rel)
            e.expectations_for(rel)        # raises if a version key leaves a gap
    # the refcount rule moves with 6.13: version-keyed entries really differ on the two
    nc = {e.name: e for e in entries}["pfnmap-noncompound"]
    assert nc.baseline_expect_for(TRIXIE) == ["VMM_FAULT"]
    assert nc.baseline_expect_for(BACKPORTS) == ["REFAULTED"]


def test_catalog_only_keeps_order_and_refuses_unknown_ids():
    assert [e.name for e in catalog.load(only=["udmabuf-shmem", "calibration"])] == \
        ["udmabuf-shmem", "calibration"]
    with pytest.raises(ConfigError) as ei:
        catalog.load(only=["calibration", "no-such-entry"])
    assert "--only" in str(ei.value) and "no-such-entry" in str(ei.value)


def test_catalog_entry_without_why_is_refused(tmp_path):
    p = tmp_path / "e.yaml"
    p.write_text("version: 1\nname: e\ntitle: t\nlinks: [abc1234]\nexporter: {kind: vmlab, size: 1M}\n"
                 "moves:\n  - {mode: MIGRATE, expect: REFAULTED}\n")
    with pytest.raises(ConfigError) as ei:
        catalog.load(tmp_path)
    assert str(ei.value).startswith(f"{p}: why: ") and "\n" not in str(ei.value)


def test_duplicate_ids_are_refused(tmp_path):
    body = ("version: 1\nname: same\ntitle: t\nlinks: [abc1234]\nwhy: w\n"
            "exporter: {kind: vmlab, size: 1M}\nmoves:\n  - {mode: MIGRATE, expect: REFAULTED}\n")
    (tmp_path / "a.yaml").write_text(body)
    (tmp_path / "b.yaml").write_text(body)
    with pytest.raises(ConfigError) as ei:
        catalog.load(tmp_path)
    assert "b.yaml: name:" in str(ei.value)


def test_kernels_are_checked():
    assert matrix.parse_kernels(None) == ["trixie", "trixie-backports"]
    assert matrix.parse_kernels("trixie-backports") == ["trixie-backports"]
    assert matrix.parse_kernels("") == ["trixie", "trixie-backports"]     # not given
    for bad in ("trixie,nope", "trixie,trixie", "trixie,"):
        with pytest.raises(ConfigError) as ei:
            matrix.parse_kernels(bad)
        assert "--kernels" in str(ei.value)


def test_plan_resolves_every_cell_with_its_kernel():
    args = parser().parse_args(["matrix", "--kernels", "trixie,trixie-backports"])
    entries = catalog.load(only=["calibration", "dmaheap-order4"])
    p = matrix.plan(entries, ["trixie", "trixie-backports"], args)
    assert [o["kernel"] for _, o in p["trixie-backports"]] == ["trixie-backports"] * 2
    # one lab per kernel for entries that agree on how the lab runs
    assert len({matrix._lab_key(o) for _, o in p["trixie"]}) == 1


def _res(**kw):
    base = {"status": "finished", "passed": True, "lab": {"kernel": TRIXIE, "kernel_package": "6.12.57-1",
                                                          "cmdline": "console=ttyS0", "module_params": {}},
            "baseline": {"verdict": "REFAULTED", "expected": ["REFAULTED"], "passed": True},
            "moves": [{"verdict": "STALE", "expected": ["STALE"], "passed": True}]}
    base.update(kw)
    return base


def test_cell_record_match_mismatch_not_applicable_and_error(tmp_path):
    e = catalog.load(only=["udmabuf-shmem"])[0]
    c = matrix.cell_record(e, "trixie", _res(), tmp_path, 12.3)
    assert c["match"] is True and c["verdicts"] == ["REFAULTED", "STALE"]
    assert c["kernel_package"] == "6.12.57-1" and c["kernel_cmdline"] == "console=ttyS0"
    bad = _res(passed=False, moves=[{"verdict": "REFAULTED", "expected": ["STALE"], "passed": False}])
    c = matrix.cell_record(e, "trixie", bad, tmp_path, 1)
    assert c["match"] is False and "REFAULTED (expected STALE)" in c["reason"]
    na = _res(status="not_applicable", passed=False, not_applicable="lab kernel 6.1 has no /dev/udmabuf",
              moves=[])
    c = matrix.cell_record(e, "bookworm", na, tmp_path, 1)
    assert c["match"] is None and "udmabuf" in c["reason"]
    err = _res(status="error", passed=False, error="RemoteError: boom")
    c = matrix.cell_record(e, "trixie", err, tmp_path, 1)
    assert c["match"] is False and "boom" in c["reason"]


@pytest.mark.parametrize("cells,rc", [
    ([(True, "finished"), (None, "not_applicable")], 0),
    ([(True, "finished"), (False, "finished")], 1),
    ([(False, "finished"), (False, "could_not_test")], 1),
    ([(True, "finished"), (False, "could_not_test")], 125),
    ([(None, "not_applicable")], 125),
    ([], 125),
])
def test_exit_status(cells, rc):
    assert matrix.exit_status([{"match": m, "status": s} for m, s in cells]) == rc


def test_junit_and_report(tmp_path):
    cells = [{"entry": "a<b", "kernel_suite": "trixie", "match": True, "verdicts": ["REFAULTED"],
              "expected": [["REFAULTED"]], "title": "<script>alert(1)</script>", "links":
              ["f8be156be163", "20241010182427.1434605-1-seanjc@google.com", "https://x.invalid/i?a=1&b=2"],
              "results": str(tmp_path / "trixie" / "a"), "seconds": 3.5, "kernel_release": TRIXIE},
             {"entry": "a<b", "kernel_suite": "trixie-backports", "match": False, "verdicts": ["STALE"],
              "expected": [["REFAULTED"]], "reason": "0: STALE", "results": "r", "seconds": 1},
             {"entry": "c", "kernel_suite": "trixie", "match": None, "verdicts": [], "expected": [],
              "reason": "no udmabuf", "results": "r", "seconds": 0}]
    matrix.write_junit(tmp_path / "junit.xml", cells)
    suite = ET.parse(tmp_path / "junit.xml").getroot()
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("3", "1", "1")
    assert [t.get("name") for t in suite] == ["a<b[trixie]", "a<b[trixie-backports]", "c[trixie]"]
    res = {"kernels": ["trixie", "trixie-backports"], "entries": ["a<b", "c"], "cells": cells,
           "summary": {"cells": 3}, "status": "finished", "started": "now"}
    page = report.matrix_html(res, base=tmp_path)
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert 'href="https://git.kernel.org/linus/f8be156be163"' in page
    assert 'href="https://lore.kernel.org/r/20241010182427.1434605-1-seanjc@google.com"' in page
    assert "a=1&amp;b=2" in page
    assert 'href="trixie/a/results.json"' in page
    assert page.count('class="match"') == 1 and page.count('class="mismatch"') == 1
    assert 'class="na"' in page and "not run" in page      # c was not run on backports
    assert "MISMATCH" in matrix.table(res)


def test_bad_kernels_exit_2_before_anything_is_created(tmp_path):
    env = dict(os.environ, VMLAB_STATE_DIR=str(tmp_path / "state"))
    r = subprocess.run([sys.executable, "-m", "vmlab.cli", "matrix", "--kernels", "trixie,sid"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("vmlab: error: <command line>: --kernels:")
    assert not (tmp_path / "results").exists()
    r = subprocess.run([sys.executable, "-m", "vmlab.cli", "matrix", "--only", "nope"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--only" in r.stderr and not (tmp_path / "results").exists()


def test_matrix_json_is_json(tmp_path):
    m = matrix.Matrix({"trixie": [(catalog.load(only=["calibration"])[0], {})]}, tmp_path, print)
    m.finish()
    doc = json.loads((tmp_path / "matrix.json").read_text())
    assert doc["entries"] == ["calibration"] and doc["cells"] == [] and doc["summary"]["cells"] == 0
    assert (tmp_path / "report.html").exists() and (tmp_path / "junit.xml").exists()


@pytest.mark.parametrize("name", ["lab", "lab-2", "calibration.attempt1"])
def test_entry_names_that_collide_with_matrix_directories(tmp_path, name):
    (tmp_path / "e.yaml").write_text(
        f"version: 1\nname: {name}\ntitle: t\nlinks: [abc1234]\nwhy: w\n"
        "exporter: {kind: vmlab, size: 1M}\nmoves:\n  - {mode: MIGRATE, expect: REFAULTED}\n")
    with pytest.raises(ConfigError) as ei:
        catalog.load(tmp_path)
    assert "name" in str(ei.value) and "directory" in str(ei.value)


def test_a_blank_link_is_no_crash():
    assert report._link(" ") == {"text": "", "href": None}


def test_matrix_reproducer_keeps_the_command_line(tmp_path):
    from vmlab.run_dir import cli_passthrough
    args = parser().parse_args(["matrix", "--accel", "tcg", "--qemu", "default", "--guest-memory", "768",
                                "--lab-qemu-arg=-smp", "--lab-qemu-arg=1"])
    argv = cli_passthrough(args, kernel="forky")
    assert argv == ["--accel=tcg", "--kernel=forky", "--qemu=default", "--guest-memory=768",
                    "--lab-qemu-arg=-smp", "--lab-qemu-arg=1"]


def _planned(kernels, names):
    from vmlab import config as cfgmod
    return {k: [(cfgmod.Experiment(f"{n}.yaml", {"name": n}), {"kernel": k}) for n in names]
            for k in kernels}


def test_shards_are_disjoint_cover_the_matrix_and_group_by_kernel():
    planned = _planned(["bullseye", "trixie", "forky"], ["a", "b", "c", "d", "e"])
    every = [(k, e.name) for k, lst in planned.items() for e, _ in lst]
    for n in (1, 2, 3, 4, 7, 15, 16):
        got = []
        for k in range(1, n + 1):
            part = matrix.shard(planned, k, n)
            got += [(kern, e.name) for kern, lst in part.items() for e, _ in lst]
            # contiguous in kernel order: a shard of 15 cells cut in 2 spans at most 2 kernels
            if n in (2, 3):
                assert len(part) <= 2, (n, k, list(part))
        assert got == every, n          # disjoint, covering, in order
    assert matrix.shard(planned, 3, 3) == matrix.shard(planned, 3, 3)   # deterministic


def test_shard_argument():
    assert matrix.parse_shard(None) is None and matrix.parse_shard("2/4") == (2, 4)
    for bad in ("0/2", "3/2", "x", "1/0", "1/2/3", "1/1001"):
        with pytest.raises(ConfigError, match="--shard"):
            matrix.parse_shard(bad)


# --- the catalog on a test box (vmlab matrix --lab FILE) ------------------------------------------
def _box_file(tmp_path, text: str) -> str:
    (tmp_path / "keys").mkdir(exist_ok=True)
    (tmp_path / "keys/id").write_text("k")
    (tmp_path / "keys/known").write_text("")
    p = tmp_path / "box.yaml"
    p.write_text(text)
    return str(p)


def test_a_box_file_names_where_the_box_is_and_nothing_it_runs(tmp_path):
    f = _box_file(tmp_path, "lab: {kind: ssh, host: 'me@10.0.0.7:2222', key: keys/id, known_hosts: keys/known}\n")
    box = config.load_box_file(f)
    # paths relative to the file, made absolute: the cell configs live elsewhere
    assert box == {"kind": "ssh", "host": "me@10.0.0.7:2222", "key": str(tmp_path / "keys/id"),
                   "known_hosts": str(tmp_path / "keys/known")}
    assert config.box_label(box) == "box-10.0.0.7-2222"
    assert config.box_label({"kind": "ssh", "host": "root@[fe80::1]:22"}) == "box-fe80..1-22"
    assert config.load_box_file(_box_file(tmp_path, "lab: {kind: local}\n")) == {"kind": "local"}
    for text, key in (("lab: {kind: ssh, host: h, key: keys/id, kernel: trixie}\n", "lab.kernel"),
                      ("lab: {kind: local}\nexporter: {}\n", "exporter"),
                      ("lab: {kind: nested}\n", "lab.kind"),
                      ("lab: {kind: local, host: h}\n", "lab.host"),
                      ("lab: {kind: ssh, host: h, key: keys/nope}\n", "lab.key"),
                      ("lab: {kind: ssh, host: 7}\n", "lab.host"),
                      ("kind: ssh\n", "lab"),
                      ("lab: [ssh]\n", "lab")):
        with pytest.raises(ConfigError) as ei:
            config.load_box_file(_box_file(tmp_path, text))
        assert (ei.value.path, ei.value.key) == (f, key), (text, str(ei.value))
        assert ei.value.exit_code == 2 and "\n" not in str(ei.value)


def test_plan_on_a_box_is_one_column_of_the_boxs_kernel(tmp_path):
    f = _box_file(tmp_path, "lab: {kind: ssh, host: 'root@127.0.0.1:2200', key: keys/id, known_hosts: keys/known}\n")
    args = parser().parse_args(["matrix", "--lab", f])
    entries = catalog.load(only=["calibration", "dmaheap-order4"])
    p = matrix.plan(entries, [], args, config.load_box_file(f))
    assert list(p) == ["box-127.0.0.1-2200"]
    cells = p["box-127.0.0.1-2200"]
    assert [e.name for e, _ in cells] == ["calibration", "dmaheap-order4"]
    for e, o in cells:
        assert o["lab_kind"] == "ssh" and o["box"]["host"] == "127.0.0.1" and o["box"]["port"] == 2200
        assert e.raw["lab"]["kind"] == "ssh" and "lab" not in catalog.load(only=[e.name])[0].raw
    assert len({matrix._lab_key(o) for _, o in cells}) == 1     # one box session for both


def test_a_box_matrix_takes_no_kernels_and_a_bad_box_file_is_exit_2(tmp_path):
    env = dict(os.environ, VMLAB_STATE_DIR=str(tmp_path / "state"))
    f = _box_file(tmp_path, "lab: {kind: local}\n")
    r = subprocess.run([sys.executable, "-m", "vmlab.cli", "matrix", "--lab", f, "--kernels", "trixie"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("vmlab: error: <command line>: --kernels:"), r.stderr
    bad = _box_file(tmp_path, "lab: {kind: local, accel: tcg}\n")
    r = subprocess.run([sys.executable, "-m", "vmlab.cli", "matrix", "--lab", bad],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"{bad}: lab.accel:" in r.stderr and not (tmp_path / "results").exists()


def test_between_cells_a_box_loses_only_this_runs_processes(tmp_path, monkeypatch):
    """The script as it runs on a box, run here against real processes: this run's guest
    and host agent go; a VM of the box's owner named guest and another run's agent stay."""
    from vmlab import box_lab
    run_dir, share = f"/tmp/vmlab-test-{os.getpid()}", f"/tmp/vmlab-run.t{os.getpid()}"
    monkeypatch.setattr(box_lab, "RUN_DIR", run_dir)

    class Box:
        kind, share_dir = "ssh", share

    class Nested:
        kind = "nested"
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    procs = {name: subprocess.Popen(sleeper + argv) for name, argv in (
        ("our guest", ["-name", "guest", "-qmp", f"unix:{run_dir}/guest/qmp.sock"]),
        ("our agent", [f"{share}/hostagent.py", "serve"]),
        ("the owner's VM", ["-name", "guest", "-qmp", "unix:/srv/vm/qmp.sock"]),
        ("another run's agent", [f"{share}x/hostagent.py", "serve"]))}
    try:
        r = subprocess.run(["sh", "-c", matrix.clean_lab_script(Box())], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        # the script returns once pgrep finds none: they are zombies of ours by now
        time.sleep(0.2)
        gone = {name for name, p in procs.items() if p.poll() is not None}
        assert gone == {"our guest", "our agent"}, (gone, r.stdout)
    finally:
        for p in procs.values():
            p.kill()
            p.wait()
    nested = matrix.clean_lab_script(Nested())
    assert "[h]ostagent.py serve" in nested and "-name [g]uest " in nested


def test_clean_lab_kills_forked_agents_by_name_not_their_server(tmp_path):
    """A nested lab's agents forked by its fork server (exporter.warm_command) are a cell's
    leftovers like started ones, found by their name (hostagent.FORKED_AGENT_NAME) also
    when their server is gone; the server holds nothing of a cell's and stays. Run here
    against real processes, the patterns narrowed to this test's own."""
    from vmlab import hostagent

    class Nested:
        kind = "nested"
    tag = f"t{os.getpid()}"
    name = f"vmlab-agent{os.getpid() % 10000}"      # a comm is 15 characters at most
    script = (matrix.clean_lab_script(Nested())
              .replace(f"pgrep -x {hostagent.FORKED_AGENT_NAME.decode()}", f"pgrep -x {name}")
              .replace("[h]ostagent.py serve", f"[h]ostagent.py serve {tag}")
              .replace("-name [g]uest ", f"-name [g]uest-{tag} "))
    assert f"pgrep -x {name}" in script
    (tmp_path / name).symlink_to("/bin/sleep")
    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                               "hostagent.py", "zygote", tag])
    agent = subprocess.Popen([str(tmp_path / name), "60"])
    # reaped at once, as the lab's init or server reaps an agent: no zombie for pgrep
    reaper = threading.Thread(target=agent.wait, daemon=True)
    reaper.start()
    try:
        r = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f"left: {agent.pid}"
        reaper.join(timeout=10)
        assert agent.returncode == -9
        assert server.poll() is None
    finally:
        for p in (server, agent):
            p.kill()
            p.wait()
