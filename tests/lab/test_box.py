"""Issue: your machine. ``lab: {kind: ssh}`` against a running lab treated as the user's
test box: its host key pinned from its console (as a user pins a known_hosts entry), the
exporter built there with dkms and loaded, the default experiment run there, and
everything vmlab did on the box undone afterwards."""
from __future__ import annotations

import json
import re

import yaml

from .conftest import ROOT, qemu_pids, results_dir, vmlab_cmd


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
                  "ls -d /var/tmp/vmlab-run.* /run/vmlab 2>/dev/null; true", env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_default_experiment_on_a_box_over_ssh(tmp_path, images_ready):
    env = {"VMLAB_STATE_DIR": str(tmp_path / "state")}
    st = _lab_up(env)
    try:
        console = open(st["console"], errors="replace").read()
        m = re.search(r"VMLAB-HOSTKEY (ssh-ed25519 \S+)", console)
        assert m, "the lab shows its host key on the console"
        known = tmp_path / "known_hosts"
        known.write_text(f"[127.0.0.1]:{st['ssh_port']} {m.group(1)}\n")
        key = tmp_path / "state" / "lab" / "id_ed25519"
        before = _box_state(env)
        # the image's own build copy (/usr/src/vmlab-exporter) is the box's; nothing of a run
        assert before.splitlines()[0] == "0" and "vmlab-exporter-vmlab-" not in before
        assert "vmlab-exporter/" not in before and "/var/tmp/vmlab-run" not in before

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
    finally:
        r = vmlab_cmd("lab", "down", env=env, timeout=300)
        assert r.returncode == 0, r.stderr
