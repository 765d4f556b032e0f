"""Issue: your machine. ``lab: {kind: ssh}`` against a running lab treated as the user's
test box: its host key pinned from its console (as a user pins a known_hosts entry), the
exporter built there with dkms and loaded, the default experiment run there, and
everything vmlab did on the box undone afterwards, by the box itself when vmlab is
killed; and ``lab: {kind: local}``, vmlab run inside that lab."""
from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT, VmlabProcess, qemu_pids, results_dir, vmlab_cmd


def _lab_up(env) -> dict:
    # the lab as a box that does not carry vmlab's exporter: the run must bring its own
    r = vmlab_cmd("lab", "up", "--lab-append", "vmlab.exporter=off", env=env, timeout=900)
    assert r.returncode == 0, r.stderr
    r = vmlab_cmd("lab", "status", "--json", env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _box_config(tmp_path, port: int, key, known_hosts) -> str:
    raw = yaml.safe_load((ROOT / "configs/experiments/default.yaml").read_text())
    raw["name"] = "default-on-box"
    raw["lab"] = {"kind": "ssh", "host": f"root@127.0.0.1:{port}", "key": str(key),
                  "known_hosts": str(known_hosts)}
    p = tmp_path / "box.yaml"
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(p)


def _box_state(env) -> str:
    # one word: 'lab exec' runs its words as one shell command line
    r = vmlab_cmd("lab", "exec", "--",
                  "grep -c '^vmlab_exporter ' /proc/modules; ls /usr/src; dkms status; "
                  "ls -d /var/tmp/vmlab-run.* /run/vmlab 2>/dev/null; "
                  "echo hugepages=$(cat /proc/sys/vm/nr_hugepages); "
                  "echo shmem=$(cat /sys/kernel/mm/transparent_hugepage/shmem_enabled); "
                  # [q]: the pattern must not match this shell's own command line
                  "echo processes=$(pgrep -c -f "
                  "'[q]emu-system|[h]ostagent.py|[d]kms build|[/]var/lib/dkms/vmlab-exporter/'); "
                  "echo tracefs=$(ls /sys/kernel/tracing/instances | grep -c vmlab); true",
                  env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def box(images_ready, tmp_path_factory):
    """A running lab as the user's box: (env, lab status, key, known_hosts, its state)."""
    tmp = tmp_path_factory.mktemp("box")
    env = {"VMLAB_STATE_DIR": str(tmp / "state")}
    st = _lab_up(env)
    try:
        console = open(st["console"], errors="replace").read()
        m = re.search(r"VMLAB-HOSTKEY (ssh-ed25519 \S+)", console)
        assert m, "the lab shows its host key on the console"
        known = tmp / "known_hosts"
        known.write_text(f"[127.0.0.1]:{st['ssh_port']} {m.group(1)}\n")
        key = tmp / "state" / "lab" / "id_ed25519"
        before = _box_state(env)
        # the image's own build copy (/usr/src/vmlab-exporter) is the box's; nothing of a run
        assert before.splitlines()[0] == "0" and "vmlab-exporter-vmlab-" not in before
        assert "vmlab-exporter/" not in before and "/var/tmp/vmlab-run" not in before
        assert "processes=0" in before
        yield env, st, key, known, before
    finally:
        r = vmlab_cmd("lab", "down", env=env, timeout=300)
        assert r.returncode == 0, r.stderr


@pytest.mark.nightly   # core tier under 30 min on 2 cores, cold cache (DESIGN.md CI tiers)
def test_default_experiment_on_a_box_over_ssh(tmp_path, box):
    env, st, key, known, before = box
    out = results_dir("box-ssh")
    r = vmlab_cmd("run", _box_config(tmp_path, st["ssh_port"], key, known), "--out", str(out),
                  env=env, timeout=1800)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    res = json.loads((out / "results.json").read_text())
    assert [m["verdict"] for m in res["moves"]] == ["REFAULTED"] * 3 + ["STALE"]
    assert res["passed"] is True and res["lab"]["kind"] == "ssh"
    assert res["lab"]["kernel"] == st["kernel"] and res["lab"]["kernel_source"]["form"] == "box"
    assert "building the exporter on the box with dkms" in r.stderr
    assert qemu_pids(str(out)) == []
    # undone: the module unloaded, the dkms entry and its source gone, no directory left
    assert _box_state(env) == before

    # a box whose host key is not the pinned one is refused at once, in one line
    other = tmp_path / "other_known_hosts"
    other.write_text(f"[127.0.0.1]:{st['ssh_port']} ssh-ed25519 "
                     "AAAAC3NzaC1lZDI1NTE5AAAAIOxd5C2mKDtx3EWoygQ2LZl2wHqgqpuHEUwDFBO8dUuv\n")
    out2 = results_dir("box-ssh-bad-key")
    r = vmlab_cmd("run", _box_config(tmp_path, st["ssh_port"], key, other), "--out", str(out2),
                  env=env, timeout=300)
    assert r.returncode == 2, r.stderr
    err = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("vmlab: ")]
    assert len(err) == 1 and err[0].startswith("vmlab: error: box: 127.0.0.1:"), r.stderr
    assert "does not match" in err[0], err
    # nor is one that is not in known_hosts at all: never accepted on first use
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    r = vmlab_cmd("run", _box_config(tmp_path, st["ssh_port"], key, empty), "--out",
                  str(results_dir("box-ssh-unknown")), env=env, timeout=300)
    err = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("vmlab: ")]
    assert r.returncode == 2 and len(err) == 1 and f"is not in {empty}" in err[0], r.stderr
    assert _box_state(env) == before


@pytest.mark.nightly   # the CI budget (30 min on 2 cores): `pytest -m nightly tests/lab`
def test_a_run_killed_on_a_box_is_undone_there_and_the_next_run_waits_for_it(tmp_path, box):
    """kill -9 of vmlab while dkms builds the exporter on the box (the riskiest window:
    a build and its compilers running, the dkms entry half made): vmlab undoes nothing
    itself, so the box's lock holder must. A second run started meanwhile waits for the
    lock, then passes; the box is left as it was."""
    env, st, key, known, before = box
    cfg = _box_config(tmp_path, st["ssh_port"], key, known)
    # short state paths: the runs' QMP relay sockets live under them (AF_UNIX: 108 bytes)
    short = Path(tempfile.mkdtemp(prefix="vbox-"))
    first = VmlabProcess(short / "1", "run", cfg, "--out", str(results_dir("box-ssh-killed")))
    second = None
    try:
        first.wait_for("building the exporter on the box with dkms", 900)
        end = time.monotonic() + 60
        while "processes=0" in _box_state(env) and time.monotonic() < end:
            time.sleep(1)
        assert "processes=0" not in _box_state(env)      # the build runs there
        second = VmlabProcess(short / "2", "run", cfg, "--out", str(results_dir("box-ssh-after")))
        second.wait_for("busy with another vmlab run: waiting", 120)
        first.p.send_signal(signal.SIGKILL)
        first.p.wait(timeout=30)
        second.p.wait(timeout=1200)
        assert second.p.returncode == 0, second.stderr()
        second.drained()
        assert "REFAULTED" in second.stdout()
    finally:
        for v in (first, second):
            if v is not None and v.p.poll() is None:
                v.p.kill()
                v.p.wait()
        shutil.rmtree(short, ignore_errors=True)
    end = time.monotonic() + 120          # the second run's own undo, on the box
    while _box_state(env) != before and time.monotonic() < end:
        time.sleep(5)
    assert _box_state(env) == before


@pytest.mark.nightly   # the CI budget (30 min on 2 cores): `pytest -m nightly tests/lab`
def test_the_default_experiment_with_this_machine_as_the_lab(tmp_path, box, images_ready):
    """``lab: {kind: local}``: vmlab itself runs inside the lab (its Python dependencies
    from the lab image's Debian packages), with that machine as the lab host: the same
    steps as a box without SSH, the same verdicts, the machine left as it was."""
    env, st, key, known, before = box
    _, guest = images_ready
    share = Path(env["VMLAB_STATE_DIR"]) / "lab" / "share"     # the lab's /mnt/vmlab
    assert share.is_dir()
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        if (ROOT / rel).is_file():
            (share / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, share / "src" / rel)
    shutil.copytree(guest.path, share / "cache" / "images" / guest.path.name)
    raw = yaml.safe_load((ROOT / "configs/experiments/default.yaml").read_text())
    raw["name"] = "default-local"
    raw["lab"] = {"kind": "local"}
    (share / "src" / "local.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    r = vmlab_cmd("lab", "exec", "--",
                  "rm -rf /root/vl /root/vlcache /root/out && cp -r /mnt/vmlab/src /root/vl && "
                  "cp -r /mnt/vmlab/cache /root/vlcache && cd /root/vl && "
                  "VMLAB_CACHE_DIR=/root/vlcache timeout 1500 python3 -m vmlab.cli run local.yaml "
                  "--out /root/out; echo rc=$?; cat /root/out/results.json",
                  env=env, timeout=1800)
    assert r.returncode == 0, r.stderr
    assert "\nrc=0\n" in r.stdout, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    res = json.loads(r.stdout.split("\nrc=0\n", 1)[1])
    assert [m["verdict"] for m in res["moves"]] == ["REFAULTED"] * 3 + ["STALE"]
    assert res["passed"] is True and res["lab"]["kind"] == "local"
    assert res["lab"]["kernel"] == st["kernel"] and res["lab"]["kernel_source"]["form"] == "box"
    assert _box_state(env) == before


@pytest.mark.nightly   # the CI budget (30 min on 2 cores): `pytest -m nightly tests/lab`
def test_the_catalog_on_a_box_and_only_what_the_run_raised_is_taken_back(tmp_path, box):
    """``vmlab matrix --lab FILE``: catalog entries on the box's own kernel, one column.
    Meanwhile someone else on the box raises vm.nr_hugepages too (after the host agent
    raised it for the hugetlb entry): the undo takes back only what the run raised."""
    env, st, key, known, before = box
    box_file = tmp_path / "box.yaml"
    box_file.write_text(yaml.safe_dump({"lab": {"kind": "ssh", "host": f"root@127.0.0.1:{st['ssh_port']}",
                                                "key": str(key), "known_hosts": str(known)}}))
    out = results_dir("box-matrix")
    short = Path(tempfile.mkdtemp(prefix="vbox-"))
    m = VmlabProcess(short / "m", "matrix", "--lab", str(box_file), "--out", str(out),
                     "--only", "udmabuf-hugetlb,udmabuf-thp,pfnmap-noncompound")
    try:
        end, raised = time.monotonic() + 900, ""
        while not raised and m.p.poll() is None and time.monotonic() < end:
            time.sleep(2)
            raised = vmlab_cmd("lab", "exec", "--", "cat /var/tmp/vmlab-run.*/hugepages.raised "
                               "2>/dev/null; true", env=env, timeout=60).stdout.strip()
        assert raised, f"the host agent wrote down no raise:\n{m.stderr()}"
        r = vmlab_cmd("lab", "exec", "--", "echo $(( $(cat /proc/sys/vm/nr_hugepages) + 2 )) "
                      "> /proc/sys/vm/nr_hugepages", env=env, timeout=60)
        assert r.returncode == 0, r.stderr
        m.p.wait(timeout=1800)
        m.drained()
        assert m.p.returncode == 0, m.stderr()
    finally:
        if m.p.poll() is None:
            m.p.kill()
            m.p.wait()
        shutil.rmtree(short, ignore_errors=True)
    res = json.loads((out / "matrix.json").read_text())
    column = f"box-127.0.0.1-{st['ssh_port']}"
    assert res["kernels"] == [column]
    assert [c["entry"] for c in res["cells"]] == ["udmabuf-hugetlb", "udmabuf-thp", "pfnmap-noncompound"]
    for c in res["cells"]:
        assert c["match"] is True and c["kernel_suite"] == column and c["kernel_release"] == st["kernel"], c
    cfg = yaml.safe_load((out / column / "udmabuf-hugetlb" / "config.yaml").read_text())
    assert cfg["lab"]["kind"] == "ssh"     # reproduce.sh runs the cell on the box again
    after = _box_state(env)
    n = int(re.search(r"hugepages=(\d+)", before).group(1))
    assert after == before.replace(f"hugepages={n}\n", f"hugepages={n + 2}\n"), (before, after)
    r = vmlab_cmd("lab", "exec", "--", f"echo {n} > /proc/sys/vm/nr_hugepages", env=env, timeout=60)
    assert r.returncode == 0 and _box_state(env) == before
