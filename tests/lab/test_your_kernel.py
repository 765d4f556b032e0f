"""Issue: your kernel. Real runs on a lab whose kernel the user brought: Debian's own .debs
fetched with `vmlab images fetch-kernel` and given as deb:, a build-tree layout given as
tree:, and the exit codes `git bisect run` reads (125 for what belongs to the kernel under
test: a .config without KVM, a kernel that panics at boot)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from . import kernel_tree, qemu_build
from .conftest import ROOT, RESULTS, qemu_pids, results_dir, vmlab_cmd

BISECT = ROOT / "configs" / "bisect" / "noncompound-refaults.yaml"


def fetch(suite: str, *packages: str) -> Path:
    """A suite's kernel .debs (fetch-kernel), or the named packages' (fetch)."""
    args = ("fetch", suite, *packages) if packages else ("fetch-kernel", suite)
    r = vmlab_cmd("images", *args, timeout=1800)
    assert r.returncode == 0, r.stderr
    d = Path(r.stdout.strip().splitlines()[-1])
    assert sorted(d.glob("*.deb")), d
    return d


def run(name: str, *args, expect_rc: int = 0) -> dict:
    out = results_dir(f"yours-{name}")
    r = vmlab_cmd("run", *args, "--out", str(out), timeout=2400)
    assert r.returncode == expect_rc, f"{r.stdout}\n{r.stderr}"
    assert qemu_pids(str(out)) == []
    res = json.loads((out / "results.json").read_text())
    res["_stderr"] = r.stderr
    return res


def verdicts(res):
    return [m["verdict"] for m in res["moves"]]


@pytest.mark.nightly
def test_forky_debs_into_the_default_experiment():
    """Issue point (1): forky's 7.2 .debs as deb: (the base inferred from them: forky)."""
    debs = fetch("forky")
    res = run("deb-forky", "--kernel", f"deb:{debs}")
    assert res["lab"]["kernel"].startswith("7.2."), res["lab"]["kernel"]
    assert res["lab"]["kernel_source"]["form"] == "deb"
    assert res["lab"]["kernel_source"]["base"] == "forky"
    assert verdicts(res) == ["REFAULTED"] * 3 + ["STALE"] and res["passed"] is True


@pytest.mark.nightly
def test_forky_debs_on_trixie_name_the_missing_dependency():
    debs = fetch("forky")
    r = vmlab_cmd("images", "build", "lab", "--kernel", f"deb:{debs}", "--lab-base", "trixie",
                  timeout=1800)
    assert r.returncode == 125, r.stderr
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith("vmlab: could not test: lab image for deb:") and \
        "cannot be met on trixie" in err and "gcc-16" in err, err


@pytest.mark.nightly
def test_a_build_tree_boots_and_passes(tmp_path):
    """Issue point (2): a tree: lab (a build-tree layout from trixie's 6.12 .debs)."""
    tree = kernel_tree.assemble(fetch("trixie"), tmp_path / "linux")
    res = run("tree", "--kernel", f"tree:{tree}")
    assert res["lab"]["kernel"] == (tree / "include/config/kernel.release").read_text().strip()
    assert res["lab"]["kernel_source"]["form"] == "tree"
    assert verdicts(res) == ["REFAULTED"] * 3 + ["STALE"] and res["passed"] is True


@pytest.mark.nightly
def test_a_tree_built_with_make_o_boots_and_passes(tmp_path):
    """A tree built with make O=DIR (the build dir's Makefile includes the source's by its
    absolute path): the exporter is built in the build dir against the source, bound at
    that path. Its .config lacks VGEM so that its image is its own (the cache key is by
    content: the same outputs in-tree would reuse the in-tree test's image)."""
    tree = kernel_tree.assemble(fetch("trixie"), tmp_path / "build", source=tmp_path / "src",
                                drop_options=("CONFIG_DRM_VGEM",))
    assert not (tree / "scripts/Makefile.build").resolve().is_relative_to(tree.resolve())
    res = run("tree-o", "--kernel", f"tree:{tree}")
    assert "CONFIG_DRM_VGEM (exporter kind vgem)" in res["_stderr"]
    assert res["lab"]["kernel_source"]["form"] == "tree"
    assert verdicts(res) == ["REFAULTED"] * 3 + ["STALE"] and res["passed"] is True


@pytest.mark.nightly
def test_bisect_noncompound_bad_on_612_good_on_73():
    """The bisect contract on the two Debian kernels that bracket "KVM: Stop grabbing
    references to PFNMAP'd pages" (6.13): exit 1 (bad) on 6.12, 0 (good) on 7.3, both as
    deb: on one base, so the kernel is the only thing that differs."""
    bad = run("bisect-612", str(BISECT), "--kernel", f"deb:{fetch('trixie')}",
              "--lab-base", "trixie-backports", expect_rc=1)
    good = run("bisect-73", str(BISECT), "--kernel", f"deb:{fetch('trixie-backports')}",
               "--lab-base", "trixie-backports", expect_rc=0)
    assert bad["lab"]["kernel"].startswith("6.12.") and good["lab"]["kernel"].startswith("7.3.")
    assert bad["lab"]["qemu"] == good["lab"]["qemu"]
    assert bad["baseline"]["verdict"] == "VMM_FAULT" and good["baseline"]["verdict"] == "REFAULTED"


@pytest.mark.nightly
def test_a_qemu_build_directory_is_the_labs_vmm(tmp_path):
    """--qemu build:DIR in a trixie lab: a build-directory layout of trixie-backports'
    QEMU 11.1 (its binary and firmware), resolved against the lab image's libraries."""
    build = qemu_build.assemble([fetch("trixie-backports", "qemu-system-x86", "qemu-system-data",
                                       "seabios")], tmp_path / "qemu-build")
    res = run("qemu-build", "--qemu", f"build:{build}")
    assert res["lab"]["qemu"].startswith("11.1."), res["lab"]["qemu"]
    assert res["lab"]["qemu_source"] == f"build:{build}"
    assert res["lab"]["kernel"].startswith("6.12.")
    assert verdicts(res) == ["REFAULTED"] * 3 + ["STALE"] and res["passed"] is True


def _tree_layout(t: Path, drop: str = "", bzimage: bytes = b"") -> Path:
    """A tree laid out like a built one (no modules): a .config without the options
    starting with ``drop``, the given bzImage."""
    for d in ("arch/x86/boot", "include/config", "scripts"):
        (t / d).mkdir(parents=True)
    (t / "Makefile").write_text("VERSION = 7\n")
    (t / "scripts/Makefile.build").write_text("")
    from vmlab.kernel_source import LAB_REQUIRED
    have = [o for o in LAB_REQUIRED if not (drop and o.startswith(drop))]
    (t / ".config").write_text("".join(f"{o}=y\n" for o in have)
                               + (f"# {drop} is not set\n" if drop else ""))
    if bzimage:
        (t / "arch/x86/boot/bzImage").write_bytes(bzimage)
        for f in ("Module.symvers", "modules.order"):
            (t / f).write_text("")
        (t / "include/config/kernel.release").write_text("7.3.0-vmlab\n")
    return t


def test_a_tree_whose_bzimage_is_no_kernel_is_125(tmp_path):
    """A build that made something QEMU cannot load is the commit under test's (exit 125,
    git bisect skips it), found before an image is built around it."""
    t = _tree_layout(tmp_path / "linux", bzimage=b"\0" * 65536)
    out = results_dir("yours-junk-bzimage")
    r = vmlab_cmd("run", "--kernel", f"tree:{t}", "--out", str(out), timeout=120)
    assert r.returncode == 125, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"vmlab: could not test: {t}/arch/x86/boot/bzImage: not an x86 boot image"), lines
    assert qemu_pids(str(out)) == [] and not any(out.iterdir())


def test_a_tree_without_kvm_is_refused_with_125(tmp_path):
    """Issue point (4): refused before anything is built or booted, one line naming
    CONFIG_KVM, exit 125. The tree is laid out like a built one; only .config differs."""
    t = _tree_layout(tmp_path / "linux", drop="CONFIG_KVM")
    out = results_dir("yours-no-kvm")
    r = vmlab_cmd("run", "--kernel", f"tree:{t}", "--out", str(out), timeout=120)
    assert r.returncode == 125, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0] == \
        f"vmlab: could not test: {t}/.config: the lab kernel lacks CONFIG_KVM, CONFIG_KVM_AMD", lines
    assert qemu_pids(str(out)) == [] and not any(out.iterdir())


def test_a_lab_kernel_that_panics_at_boot_is_125(images_ready):
    """Issue point (4): the kernel panics before the experiment (no init to run): could
    not test, whatever the retry, and the console that shows the panic is kept."""
    out = results_dir("yours-panic")
    r = vmlab_cmd("run", "--lab-append", "panic=1 rdinit=/nonexistent init=/nonexistent",
                  "--out", str(out), timeout=900)
    assert r.returncode == 125, f"{r.stdout}\n{r.stderr}"
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("vmlab: could not test: lab failed to boot: ") and "panic" in last, last
    console = (out / "lab-console.log").read_text(errors="replace")
    assert "Kernel panic" in console and "/nonexistent" in console
    assert qemu_pids(str(out)) == []
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "could_not_test" and res["passed"] is not True
    # a panic may be TCG's flake: booted once more, and the first console kept
    assert [f["attempt"] for f in res["lab"]["boot_failures_retried"]] == [1]
    assert (out / "lab-console.attempt1.log").exists() and "kernel" not in res["lab"]
