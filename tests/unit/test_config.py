"""vmlab/config.py: every experiment config loads; every bad one is ONE line naming file and key.
The CLI path (`vmlab run BAD.yaml`) exits 2 before anything starts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmlab import config
from vmlab.errors import ConfigError, UserError

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = sorted((ROOT / "configs" / "experiments").glob("*.yaml")) + \
    sorted((ROOT / "configs" / "catalog").glob("*.yaml"))
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


RELEASES = ["6.12.57+deb13-amd64", "6.13-rc3", "6.13.0-rc3+", "7.2.12+deb14-amd64",
            "7.3.4+deb14-amd64", "6.1.0-40-amd64"]


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_shipped_experiments_load(path):
    exp = config.load(path)
    assert isinstance(exp.name, str) and exp.name
    assert exp.size >= 4096 and exp.size & (exp.size - 1) == 0
    assert exp.has_moves or "baseline" in exp.raw
    cited = path.read_text().startswith("#") or (exp.raw.get("why") and exp.raw.get("links"))
    assert cited, "every experiment says what it is and cites its source"
    for rel in RELEASES:
        base = exp.baseline_expect_for(rel)
        assert base and set(base) <= set(config.VERDICTS)
        for m in exp.expectations_for(rel):
            assert m["expect"] and set(m["expect"]) <= set(config.VERDICTS)
            assert not {"REFAULTED", "VMM_FAULT"} <= set(m["expect"])
            assert not {"REFAULTED", "STALE"} <= set(m["expect"])
    # the settings merge works for it with no command line at all
    o = config.resolve(exp, None)
    assert o["guest_gpu"] == exp.section("guest").get("gpu", "none")


@pytest.mark.parametrize("name", ["pfnmap-noncompound.yaml", "pfnmap-compound.yaml"])
def test_high_order_expectations_by_version(name):
    exp = config.load(ROOT / "configs" / "catalog" / name)
    assert exp.version_keyed
    for rel, want in [("6.12.57+deb13-amd64", "VMM_FAULT"), ("6.13-rc3", "VMM_FAULT"),
                      ("6.13.0-rc3+", "VMM_FAULT"), ("6.13.0", "REFAULTED"),
                      ("7.3.4+deb14-amd64", "REFAULTED")]:
        assert exp.baseline_expect_for(rel) == [want], rel
        mv = exp.expectations_for(rel)
        assert [m["expect"] for m in mv] == [[want], [want]], rel
        assert all(m["expect_key"] in ("<6.13", ">=6.13") for m in mv)


@pytest.mark.parametrize("name,small,big", [("dmaheap-order0.yaml", "REFAULTED", "REFAULTED"),
                                            ("dmaheap-order4.yaml", "VMM_FAULT", "REFAULTED"),
                                            ("dmaheap-order8.yaml", "VMM_FAULT", "REFAULTED")])
def test_dmaheap_baseline_only(name, small, big):
    exp = config.load(ROOT / "configs" / "catalog" / name)
    assert not exp.has_moves and exp.expectations_for("6.12.57+deb13-amd64") == []
    assert exp.baseline_expect_for("6.12.57+deb13-amd64") == [small]
    assert exp.baseline_expect_for("7.3.4+deb14-amd64") == [big]


def test_keyed_expectation_needs_a_release():
    exp = config.load(ROOT / "configs" / "catalog" / "pfnmap-noncompound.yaml")
    with pytest.raises(ValueError):
        exp.expanded_moves()
    # unkeyed configs need none
    assert config.load(ROOT / "configs" / "experiments" / "default.yaml").expanded_moves()


def test_no_entry_for_release_is_config_error_at_load(tmp_path):
    """A kernel no entry matches is refused when the config is read (it was refused only
    for that kernel, after the lab booted); a release that is no version, at the run."""
    p = tmp_path / "gap.yaml"
    p.write_text("version: 1\nname: gap\nexporter: {kind: vmlab, size: 1M}\n"
                 "moves:\n  - {mode: MIGRATE, expect: REFAULTED}\n"
                 "  - {mode: MIGRATE, expect: {'>=6.13': REFAULTED}}\n")
    with pytest.raises(ConfigError) as ei:
        config.load(p)
    s = str(ei.value)
    assert ei.value.exit_code == 2 and "\n" not in s
    assert s.startswith(str(p) + ": moves[1].expect: no entry matches the oldest lab kernels")
    p.write_text("version: 1\nname: gap\nexporter: {kind: vmlab, size: 1M}\n"
                 "moves:\n  - {mode: MIGRATE, expect: REFAULTED}\n"
                 "  - {mode: MIGRATE, expect: {'<6.13': STALE, '>=6.13': REFAULTED}}\n")
    exp = config.load(p)
    assert [m["expect"] for m in exp.expectations_for("7.3.4+deb14-amd64")] == [["REFAULTED"]] * 2
    assert [m["expect"] for m in exp.expectations_for("6.12.57+deb13-amd64")] == [["REFAULTED"], ["STALE"]]
    with pytest.raises(ConfigError) as ei:
        exp.expectations_for("not-a-release")
    assert "moves[1].expect" in str(ei.value) and "not-a-release" in str(ei.value)
    assert exp.baseline_expect_for("6.12.57+deb13-amd64") == ["REFAULTED"]  # the default


def test_baseline_keyed_gap(tmp_path):
    p = tmp_path / "bgap.yaml"
    p.write_text("version: 1\nname: b\nexporter: {kind: dmaheap, size: 1M}\n"
                 "baseline: {expect: {'<6.13': VMM_FAULT}}\n")
    with pytest.raises(ConfigError) as ei:
        config.load(p)
    assert str(ei.value).startswith(str(p) + ": baseline.expect: no entry matches lab kernel 6.13 ")


def test_shipped_experiments_exist():
    assert any(p.name == "default.yaml" for p in EXPERIMENTS)


def test_default_meaning_unchanged():
    exp = config.load(ROOT / "configs" / "experiments" / "default.yaml")
    for rel in RELEASES:
        assert exp.baseline_expect_for(rel) == ["REFAULTED"]
        assert [m["expect"] for m in exp.expectations_for(rel)] == [["REFAULTED"]] * 3 + [["STALE"]]


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


# --- the corpus of malformed configs ---------------------------------------------------------
BAD_DIR = ROOT / "tests" / "unit" / "bad-configs"
BAD_FILES = sorted(BAD_DIR.glob("*.yaml"))


def _expected_key(path: Path) -> str:
    """First line: '# KEY PATH: what is wrong' (<file>: a whole-file error, no key path)."""
    first = path.open("rb").readline().decode("utf-8")
    assert first.startswith("# ") and ": " in first, f"{path.name}: first line must be '# KEY: what'"
    return first[2:].split(": ", 1)[0]


def test_bad_corpus_size():
    assert len(BAD_FILES) >= 40


@pytest.mark.parametrize("path", BAD_FILES, ids=lambda p: p.stem)
def test_bad_corpus(path):
    key = _expected_key(path)
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as ei:
        config.load(path)
    assert time.monotonic() - t0 < 5, "a bad config must be refused quickly"
    e = ei.value
    s = str(e)
    assert isinstance(e, UserError) and e.exit_code == 2
    assert "\n" not in s and "\r" not in s, f"not one line: {s!r}"
    assert len(s) < 2000, s
    assert s.startswith(str(path) + ": "), s
    if key == "<file>":
        assert not e.key, s
    else:
        assert key in s, s


def test_bad_corpus_first_key_in_front():
    """All problems at once, the first key path in the key position."""
    with pytest.raises(ConfigError) as ei:
        config.load(BAD_DIR / "several-errors.yaml")
    e = ei.value
    assert e.key == "<top level>" and "zz" in e.msg and "moves[0].count: 3.0" in e.msg


def test_duplicate_key_errors_come_with_schema_errors(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text(DEFAULT.replace("  size: 1M", "  size: 1M\n  size: 2M").replace("count: 3", "count: 3.0"))
    with pytest.raises(ConfigError) as ei:
        config.load(p)
    s = str(ei.value)
    assert "exporter.size: duplicate key 'size'" in s and "moves[0].count" in s


def test_expectation_every_outcome_rule():
    for vs in (["REFAULTED", "VMM_FAULT"], ["STALE", "REFAULTED"]):
        errs = []
        config._check_expect(vs, ["moves", 0, "expect"], errs, what="move", mode="MIGRATE", kind="udmabuf")
        assert errs and "accepts every outcome" in errs[0][1]
    # the zap's own question (ZAP_ONLY) answered both ways
    errs = []
    config._check_expect(["REFAULTED", "NOT_ZAPPED"], ["x"], errs, what="move", mode="ZAP_ONLY", kind="vmlab")
    assert [m for _, m in errs] == ["REFAULTED/NOT_ZAPPED lists both REFAULTED and NOT_ZAPPED: an "
                                    "expectation that accepts every outcome can never fail (key it "
                                    "by lab kernel version)"]
    errs = []   # "not stale": STALE still fails it
    config._check_expect(["LOST_WRITE", "REFAULTED"], ["x"], errs, what="move", mode="MIGRATE",
                         kind="vmlab", guest_write=True)
    assert errs == []
    errs = []
    config._check_expect(["VMM_FAULT", "GUEST_FAULT"], ["x"], errs, what="move", mode="MIGRATE", kind="vmlab")
    assert errs == []
    errs = []
    config._check_expect(["STALE", "NOT_ZAPPED"], ["x"], errs, what="move", mode="ZAP_ONLY", kind="vmlab")
    assert errs == []


@pytest.mark.parametrize("name", ["size-float.yaml", "dup-top-key.yaml", "nesting-bomb-lists.yaml",
                                  "billion-laughs.yaml", "kill-vmm-refaulted.yaml", "file-too-large.yaml"])
def test_cli_run_bad_corpus(tmp_path, name):
    r, dt = run_cli(["run", str(BAD_DIR / name)], tmp_path)
    assert r.returncode == 2, r.stderr[-500:]
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmlab: error: "), r.stderr[-500:]
    assert not (tmp_path / "results").exists()


# --- the CLI's own numbers ----------------------------------------------------------------------
@pytest.mark.parametrize("args,flag,bound", [
    (["run", "--lab-memory", "0"], "--lab-memory", ">= 1"),
    (["run", "--lab-memory", "-512"], "--lab-memory", ">= 1"),
    (["run", "--guest-memory", "0"], "--guest-memory", ">= 1"),
    (["run", "--boot-timeout", "0"], "--boot-timeout", "> 0"),
    (["run", "--boot-timeout", "-5"], "--boot-timeout", "> 0"),
    (["run", "--boot-timeout", "nan"], "--boot-timeout", "> 0"),
    (["doctor", "--guest-boot-timeout", "inf"], "--guest-boot-timeout", "> 0"),
    (["lab", "exec", "--timeout", "0", "true"], "--timeout", "> 0"),
    (["guest", "exec", "--timeout", "-1", "true"], "--timeout", "> 0"),
    (["bench", "--repeat", "0"], "--repeat", ">= 1"),
])
def test_cli_rejects_non_positive(args, flag, bound, capsys):
    from vmlab import cli
    with pytest.raises(SystemExit) as ei:
        cli.parser().parse_args(args)
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and bound in err, err


def test_cli_defaults_are_none():
    from vmlab import cli
    a = cli.parser().parse_args(["run"])
    for dest in ("accel", "kernel", "guest_kernel", "lab_memory", "boot_timeout",
                 "guest_memory", "guest_boot_timeout"):
        assert getattr(a, dest) is None, dest


def test_help_documents_merge_rule(capsys):
    from vmlab import cli
    with pytest.raises(SystemExit):
        cli.parser().parse_args(["run", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "taken from the command line if given, else from the config, else from the built-in default" in out


# --- merging: command line > config > default ----------------------------------------------------
def _exp(tmp_path, text):
    p = tmp_path / "e.yaml"
    p.write_text(text)
    return config.load(p)


def test_resolve_defaults_without_config():
    from vmlab import cli
    o = config.resolve(None, cli.parser().parse_args(["doctor"]))
    assert {k: o[k] for k in config.DEFAULTS} == config.DEFAULTS
    assert o["guest_gpu"] == "none" and o["guest_kernel"] == "trixie"
    assert o["lab_memory_mb"] == 3072 and o["lab_boot_timeout"] == 300
    assert o["guest_memory_mb"] == 512 and o["guest_boot_timeout"] == 240
    assert o["no_build"] is False and o["lab_qemu_args"] == []
    assert set(o["sources"].values()) == {"default"}
    json.dumps(o)  # kept in results.json
    assert config.resolve(None, None)["lab_memory_mb"] == 3072


def test_resolve_config_over_default(tmp_path):
    from vmlab import cli
    exp = _exp(tmp_path, "version: 1\nname: m\nlab: {kernel: trixie-backports, accel: tcg, memory_mb: 4096, "
               "boot_timeout: 100}\nguest: {kernel: bookworm-backports, memory_mb: 1024, boot_timeout: 60, "
               "gpu: blob, mapping: wc}\nexporter: {kind: vmlab, size: 1M}\n"
               "moves:\n  - {mode: MIGRATE, expect: REFAULTED}\n")
    o = config.resolve(exp, cli.parser().parse_args(["run"]))
    assert (o["kernel"], o["accel"], o["lab_memory_mb"], o["lab_boot_timeout"]) == ("trixie-backports", "tcg", 4096, 100.0)
    assert (o["guest_kernel"], o["guest_memory_mb"], o["guest_boot_timeout"], o["guest_gpu"], o["guest_mapping"]) == \
        ("bookworm-backports", 1024, 60.0, "blob", "wc")
    assert o["sources"]["lab_memory_mb"] == "config" and o["sources"]["kernel"] == "config"


def test_resolve_cli_over_config(tmp_path):
    """The same rule for every option: memory and boot timeout too (argparse defaults once won)."""
    from vmlab import cli
    exp = _exp(tmp_path, "version: 1\nname: m\nlab: {kernel: trixie-backports, accel: tcg, memory_mb: 4096, "
               "boot_timeout: 100}\nguest: {kernel: bookworm-backports, memory_mb: 1024, boot_timeout: 60}\n"
               "exporter: {kind: vmlab, size: 1M}\nmoves:\n  - {mode: MIGRATE, expect: REFAULTED}\n")
    a = cli.parser().parse_args(["run", "--kernel", "trixie", "--accel", "kvm", "--lab-memory", "2048",
                                 "--boot-timeout", "50", "--guest-kernel", "trixie", "--guest-memory", "768",
                                 "--guest-boot-timeout", "30", "--lab-qemu-arg=-S",
                                 "--no-build"])
    o = config.resolve(exp, a)
    assert (o["kernel"], o["accel"], o["lab_memory_mb"], o["lab_boot_timeout"]) == ("trixie", "kvm", 2048, 50.0)
    assert (o["guest_kernel"], o["guest_memory_mb"], o["guest_boot_timeout"]) == ("trixie", 768, 30.0)
    assert o["lab_qemu_args"] == ["-S"] and o["no_build"] is True
    assert all(o["sources"][k] == "cli" for k in ("kernel", "accel", "lab_memory_mb", "lab_boot_timeout",
                                                  "guest_kernel", "guest_memory_mb", "guest_boot_timeout"))


def test_resolve_rechecks_size_against_cli_memory(tmp_path):
    from vmlab import cli
    exp = _exp(tmp_path, "version: 1\nname: m\nguest: {memory_mb: 2048}\n"
               "exporter: {kind: vmlab, size: 256M}\nmoves:\n  - {mode: MIGRATE, expect: REFAULTED}\n")
    config.resolve(exp, cli.parser().parse_args(["run"]))
    for argv, words in ((["run", "--lab-memory", "400"], "--lab-memory"),
                        (["run", "--guest-memory", "128"], "--guest-memory")):
        with pytest.raises(ConfigError) as ei:
            config.resolve(exp, cli.parser().parse_args(argv))
        s = str(ei.value)
        assert "exporter.size" in s and words in s and "\n" not in s and ei.value.exit_code == 2


def test_kernel_image_is_folded_into_tree(tmp_path):
    """A bare bzImage booted with another build's modules: refused in one line (exit 2)
    that names the tree to give instead, when the path is a tree's bzImage."""
    from vmlab import cli
    for path, use in ((tmp_path / "linux/arch/x86/boot/bzImage", f"--kernel tree:{tmp_path / 'linux'}"),
                      (tmp_path / "bzImage", "--kernel tree:DIR")):
        a = cli.parser().parse_args(["run", "--kernel-image", str(path)])
        with pytest.raises(ConfigError) as ei:
            config.resolve(None, a)
        s = str(ei.value)
        assert s.startswith("<command line>: --kernel-image: ") and use in s and "\n" not in s
        assert ei.value.exit_code == 2


@pytest.mark.parametrize("exporter,key,words", [
    ("{kind: vmlab, size: 2M, backing: hugetlb}", "exporter.backing", "only exporter.kind udmabuf"),
    ("{kind: udmabuf, size: 1M, backing: thp}", "exporter.size", "not a multiple of 2 MiB"),
    ("{kind: udmabuf, size: 2M, backing: pmem}", "exporter.backing", "pmem"),
])
def test_udmabuf_backing_is_checked(tmp_path, exporter, key, words):
    p = tmp_path / "b.yaml"
    p.write_text(f"version: 1\nname: b\nexporter: {exporter}\nbaseline: {{expect: REFAULTED}}\n")
    with pytest.raises(ConfigError) as ei:
        config.load(p)
    assert f": {key}: " in str(ei.value) and words in str(ei.value), str(ei.value)


def test_store_needs_a_write_and_vgem_cannot_zap(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("version: 1\nname: s\nexporter: {kind: vmlab, size: 64K}\n"
                 "moves:\n  - {mode: NONE, store: avx, expect: REFAULTED}\n")
    with pytest.raises(ConfigError) as ei:
        config.load(p)
    assert "moves[0].store" in str(ei.value) and "guest_write" in str(ei.value)
    p.write_text("version: 1\nname: s\nexporter: {kind: vgem, size: 64K, fault: read-write}\n"
                 "moves:\n  - {mode: ZAP_ONLY, expect: REFAULTED}\n")
    with pytest.raises(ConfigError) as ei:
        config.load(p)
    assert "exporter.fault" in str(ei.value) and "ZAP_ONLY needs exporter.kind vmlab" in str(ei.value)


def test_a_refused_map_leaves_the_vmm_alive_for_later_moves():
    """Unlike kill-vmm, a map QEMU refused is a VMM_FAULT after which the VMM lives on:
    later moves may expect REFAULTED."""
    raw = {"version": 1, "name": "ok", "transport": "virtio-shm", "vmm_on_move": "remap",
           "exporter": {"kind": "vmlab", "size": "1M"},
           "moves": [{"mode": "MIGRATE", "inject": "refused-map", "expect": "VMM_FAULT"},
                     {"mode": "MIGRATE", "expect": "REFAULTED"}]}
    assert config.problems(raw) == []
    raw["moves"][0]["inject"] = "kill-vmm"
    assert any("dead VMM" in m for _, m in config.problems(raw))


GAPPED = """\
version: 1
name: gapped
exporter: {kind: vmlab, size: 64K}
moves:
  - {mode: MIGRATE, expect: {"<6.13": REFAULTED, ">=6.14": STALE}}
"""


def test_version_keyed_expectation_with_a_gap_is_refused_at_load(tmp_path):
    """6.13.5 matches neither entry: said when the config is read, not after the lab booted."""
    p = tmp_path / "gapped.yaml"
    p.write_text(GAPPED)
    with pytest.raises(ConfigError) as ei:
        config.load(p)
    e = ei.value
    assert e.key == "moves[0].expect" and str(p) in str(e) and "\n" not in str(e)
    assert "no entry matches lab kernel 6.13" in e.msg and "needs_lab_kernel" in e.msg


def test_a_gap_outside_needs_lab_kernel_is_no_gap(tmp_path):
    p = tmp_path / "ok.yaml"
    p.write_text(GAPPED.replace('{"<6.13": REFAULTED, ">=6.14": STALE}', '{">=6.14": STALE}')
                 + 'needs_lab_kernel: {version: ">=6.14", why: "the fix is in 6.14"}\n')
    assert config.load(p).expectations_for("6.14.2")[0]["expect"] == ["STALE"]
    p.write_text(GAPPED.replace('{"<6.13": REFAULTED, ">=6.14": STALE}', '{">=6.14": STALE}'))
    with pytest.raises(ConfigError) as ei:
        config.load(p)
    assert "no entry matches the oldest lab kernels" in ei.value.msg
