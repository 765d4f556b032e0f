"""The user's kernel: deb:PATH and tree:DIR parsing, the .config check, the base suite,
the image key, the one-line reasons an image of the user's kernel fails."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from vmlab import cli, config, images, kernel_source
from vmlab.errors import ConfigError, CouldNotTest

WHERE = ("<command line>", "--kernel")


def make_deb(d: Path, package: str, version: str = "7.2.12-1", arch: str = "amd64",
             payload: bytes = b"x") -> Path:
    root = d / f"build-{package}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN/control").write_text(
        f"Package: {package}\nVersion: {version}\nArchitecture: {arch}\n"
        f"Maintainer: t <t@example.org>\nDescription: test\n")
    (root / "usr/share/doc").mkdir(parents=True)
    (root / "usr/share/doc/payload").write_bytes(payload)
    out = d / f"{package}_{version}_{arch}.deb"
    subprocess.run(["dpkg-deb", "--build", "-Zgzip", str(root), str(out)], check=True,
                   capture_output=True)
    return out


@pytest.fixture
def forky_debs(tmp_path):
    d = tmp_path / "debs"
    d.mkdir()
    for p in ("linux-image-7.2.12+deb14-amd64", "linux-headers-7.2.12+deb14-amd64",
              "linux-modules-7.2.12+deb14-amd64"):
        make_deb(d, p)
    make_deb(d, "linux-headers-7.2.12+deb14-common", arch="all")
    return d


def parse(spec, **kw):
    kernel_source.parse.cache_clear()
    return kernel_source.parse(spec, WHERE, **kw)


def test_a_suite_is_its_own_base_and_takes_no_other():
    ks = parse("trixie")
    assert (ks.form, ks.suite, ks.user) == ("suite", "trixie", False)
    with pytest.raises(ConfigError, match="applies to deb: and tree:"):
        parse("trixie", base="forky")
    with pytest.raises(ConfigError, match="unknown kernel 'sid'"):
        parse("sid")


def test_debian_debs_name_their_suite(forky_debs, tmp_path):
    ks = parse(f"deb:{forky_debs}")
    assert (ks.form, ks.suite, ks.release) == ("deb", "forky", "7.2.12+deb14-amd64")
    assert "inferred from linux-image-7.2.12+deb14-amd64" in ks.base_why
    assert len(ks.debs) == 4 and ks.spec == f"deb:{forky_debs}"
    assert parse(f"deb:{forky_debs}", base="trixie").suite == "trixie"
    bpo = tmp_path / "bpo"
    bpo.mkdir()
    make_deb(bpo, "linux-image-7.3.4+deb13-amd64", "7.3.4-1~bpo13+1")
    make_deb(bpo, "linux-headers-7.3.4+deb13-amd64", "7.3.4-1~bpo13+1")
    assert parse(f"deb:{bpo}").suite == "trixie-backports"
    own = tmp_path / "own"
    own.mkdir()
    make_deb(own, "linux-image-7.3.0-rc1-dirty", "7.3.0-rc1-1")
    make_deb(own, "linux-headers-7.3.0-rc1-dirty", "7.3.0-rc1-1")
    # what `make bindeb-pkg` also leaves there is not installed (nor a second kernel)
    make_deb(own, "linux-image-7.3.0-rc1-dirty-dbg", "7.3.0-rc1-1")
    make_deb(own, "linux-libc-dev", "7.3.0-rc1-1")
    ks = parse(f"deb:{own}")
    assert ks.suite == "trixie" and "names no Debian release" in ks.base_why
    assert sorted(d.name.split("_")[0] for d in ks.debs) == \
        ["linux-headers-7.3.0-rc1-dirty", "linux-image-7.3.0-rc1-dirty"]


def test_the_digest_is_the_content(forky_debs):
    a = parse(f"deb:{forky_debs}").digest
    make_deb(forky_debs, "linux-kbuild-7.2.12+deb14")
    b = parse(f"deb:{forky_debs}").digest
    assert a != b
    r1 = images.recipe("lab", f"deb:{forky_debs}")
    kernel_source.parse.cache_clear()
    r2 = images.recipe("lab", f"deb:{forky_debs}")
    assert r1.key() == r2.key() and r1.user_kernel == f"deb:{b}"
    assert "linux-image-amd64" not in r1.packages and "linux-headers-amd64" not in r1.packages
    assert r1.kernel == "forky" and images.image_dir(r1).name.startswith(f"lab-deb-{b}-on-forky-")


@pytest.mark.parametrize("files, why", [
    ((), "no such .deb file or directory"),
    (("linux-headers-7.2.12+deb14-amd64",), "no linux-image-<version> .deb"),
    (("linux-image-7.2.12+deb14-amd64",), "no linux-headers-7.2.12+deb14-amd64 .deb"),
    (("linux-image-7.2.12+deb14-amd64", "linux-image-7.2.11+deb14-amd64"), "more than one kernel image"),
])
def test_bad_debs_are_the_users_input(tmp_path, files, why):
    d = tmp_path / "d"
    if files:
        d.mkdir()
        for f in files:
            make_deb(d, f)
    with pytest.raises(ConfigError, match=re.escape(why)) as e:
        parse(f"deb:{d}")
    assert e.value.exit_code == 2 and str(e.value).startswith("<command line>: --kernel: ")


def test_a_guest_needs_no_headers(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    make_deb(d, "linux-image-7.2.12+deb14-amd64")
    assert parse(f"deb:{d}", kind="guest").release == "7.2.12+deb14-amd64"


def test_a_foreign_architecture_is_refused(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    make_deb(d, "linux-image-7.2.12+deb14-arm64", arch="arm64")
    with pytest.raises(ConfigError, match="not amd64"):
        parse(f"deb:{d}")


GOOD_LAB = {o: "y" for o in kernel_source.LAB_REQUIRED} | {o: "m" for o in kernel_source.LAB_OPTIONAL}


def test_config_check_names_every_missing_option_and_exits_125():
    assert kernel_source.check_config(GOOD_LAB, "lab", "t/.config") == ()
    opts = dict(GOOD_LAB)
    del opts["CONFIG_KVM"], opts["CONFIG_KVM_AMD"]
    with pytest.raises(CouldNotTest) as e:
        kernel_source.check_config(opts, "lab", "t/.config")
    assert e.value.exit_code == 125
    assert str(e.value) == "t/.config: the lab kernel lacks CONFIG_KVM, CONFIG_KVM_AMD"
    with pytest.raises(CouldNotTest, match="MODULE_SIG_FORCE=y"):
        kernel_source.check_config(GOOD_LAB | {"CONFIG_MODULE_SIG_FORCE": "y"}, "lab", "t")
    opts = dict(GOOD_LAB)
    del opts["CONFIG_UDMABUF"]
    assert kernel_source.check_config(opts, "lab", "t") == ("CONFIG_UDMABUF (exporter kind udmabuf)",)


def make_tree(t: Path, opts: dict, built: bool = True) -> Path:
    (t / "arch/x86/boot").mkdir(parents=True)
    (t / "include/config").mkdir(parents=True)
    (t / "drivers/x").mkdir(parents=True)
    (t / "Makefile").write_text("VERSION = 7\nPATCHLEVEL = 3\n")
    (t / "scripts").mkdir()
    (t / "scripts/Makefile.build").write_text("")
    (t / ".config").write_text("".join(f"{k}={v}\n" for k, v in opts.items())
                               + "# CONFIG_NOT_SET is not set\n")
    if built:
        (t / "arch/x86/boot/bzImage").write_bytes(b"\0" * 0x202 + b"HdrS" + b"\0" * 58)
        (t / "Module.symvers").write_text("")
        (t / "include/config/kernel.release").write_text("7.3.0-rc1\n")
        (t / "modules.order").write_text("drivers/x/a.o\ndrivers/x/b.o\n")
        (t / "drivers/x/a.ko").write_bytes(b"a")
        (t / "drivers/x/b.ko").write_bytes(b"b")
        (t / "modules.builtin").write_text("kernel/drivers/y.ko\n")
    return t


def test_a_tree_is_checked_hashed_and_its_modules_installed(tmp_path):
    t = make_tree(tmp_path / "linux", {o: v for o, v in GOOD_LAB.items() if o != "CONFIG_DRM_VGEM"})
    ks = parse(f"tree:{t}")
    assert (ks.form, ks.suite, ks.release) == ("tree", "trixie", "7.3.0-rc1")
    # what some experiments need and this .config lacks is named, with what needs it
    assert ks.config_missing_optional == ("CONFIG_DRM_VGEM (exporter kind vgem)",)
    d1 = ks.digest
    (t / "drivers/x/b.ko").write_bytes(b"rebuilt")
    assert parse(f"tree:{t}").digest != d1
    mods = tmp_path / "root/lib/modules"
    assert kernel_source.install_tree_modules(t, mods, ks.release) == 2
    assert (mods / "7.3.0-rc1/kernel/drivers/x/b.ko").read_bytes() == b"rebuilt"
    assert (mods / "7.3.0-rc1/modules.order").read_text() == \
        "kernel/drivers/x/a.ko\nkernel/drivers/x/b.ko\n"
    assert (mods / "7.3.0-rc1/modules.builtin.modinfo").read_bytes() == b""


def test_a_tree_without_kvm_is_refused_before_anything_with_125(tmp_path):
    opts = dict(GOOD_LAB)
    del opts["CONFIG_KVM"]
    t = make_tree(tmp_path / "linux", opts)
    with pytest.raises(CouldNotTest, match=r"lacks CONFIG_KVM$"):
        parse(f"tree:{t}")
    args = cli.parser().parse_args(["run", "--kernel", f"tree:{t}"])
    with pytest.raises(CouldNotTest):
        config.resolve(None, args)


def test_an_unbuilt_tree_is_125_and_a_missing_one_2(tmp_path):
    t = make_tree(tmp_path / "linux", GOOD_LAB, built=False)
    with pytest.raises(CouldNotTest, match="not built: no arch/x86/boot/bzImage"):
        parse(f"tree:{t}")
    with pytest.raises(ConfigError, match="no such directory"):
        parse(f"tree:{tmp_path}/nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a kernel tree"):
        parse(f"tree:{tmp_path}/empty")


def test_a_tree_built_with_make_o_is_its_build_dir_and_its_source(tmp_path):
    src = make_tree(tmp_path / "src", GOOD_LAB, built=False)
    (src / ".config").unlink()
    b = make_tree(tmp_path / "build", GOOD_LAB)
    for p in ("scripts/Makefile.build", "scripts"):
        (b / p).unlink() if (b / p).is_file() else (b / p).rmdir()
    (b / "Makefile").write_text(f"include {src}/Makefile\n")
    (b / "source").symlink_to(src)
    ks = parse(f"tree:{b}")
    assert (ks.path, ks.source_dir, ks.release) == (b, src, "7.3.0-rc1")
    assert parse(f"tree:{src.parent / 'build'}").source_dir == src
    # an in-tree build has no source of its own
    assert parse(f"tree:{make_tree(tmp_path / 'linux', GOOD_LAB)}").source_dir is None
    (src / "scripts/Makefile.build").unlink()
    with pytest.raises(ConfigError, match=f"its source link points to {src}, which has no Makefile"):
        parse(f"tree:{b}")


def test_a_bzimage_that_is_no_kernel_is_125_before_an_image_is_built(tmp_path):
    t = make_tree(tmp_path / "linux", GOOD_LAB)
    (t / "arch/x86/boot/bzImage").write_bytes(b"\0" * 65536)
    with pytest.raises(CouldNotTest, match=r"bzImage: not an x86 boot image \(no 'HdrS'"):
        parse(f"tree:{t}")


def test_a_module_listed_but_not_built_is_125(tmp_path):
    t = make_tree(tmp_path / "linux", GOOD_LAB)
    (t / "drivers/x/b.ko").unlink()
    with pytest.raises(CouldNotTest, match="lists drivers/x/b.o but"):
        parse(f"tree:{t}")


def test_config_paths_are_relative_to_the_config_file(tmp_path, forky_debs):
    exp_dir = tmp_path / "exps"
    exp_dir.mkdir()
    y = exp_dir / "e.yaml"
    y.write_text("version: 1\nname: e\nlab:\n  kernel: deb:../debs\n  base: trixie\n  append: panic=1\n"
                 "exporter:\n  kind: vmlab\n  size: 1M\nbaseline:\n  expect: REFAULTED\n")
    exp = config.load(y)
    o = config.resolve(exp, cli.parser().parse_args(["run"]))
    assert o["kernel"] == f"deb:{forky_debs}" and o["lab_base"] == "trixie"
    assert o["lab_append"] == "panic=1"
    args = cli.parser().parse_args(["run", "--lab-base", "forky"])
    with pytest.raises(ConfigError, match="--lab-base: a base suite applies"):
        config.resolve(None, args)


def test_unmet_dependencies_and_a_failed_module_build_are_the_kernels(tmp_path, forky_debs):
    r = images.recipe("lab", f"deb:{forky_debs}", None, "trixie")
    log = tmp_path / "build.log"
    log.write_text("E: Unable to correct problems\nThe following packages have unmet dependencies:\n"
                   " linux-headers-7.2.12+deb14-amd64 : Depends: gcc-16-for-host but it is not installable\n"
                   "                                    Depends: linux-base (>= 4.17~) but 4.12.1 is to be installed\n"
                   "E: Unable to correct problems, you have held broken packages.\n")
    why = images._user_kernel_failure(r, log)
    assert why.startswith("its dependencies cannot be met on trixie: "
                          "linux-headers-7.2.12+deb14-amd64 Depends: gcc-16-for-host but it is not "
                          "installable; linux-headers-7.2.12+deb14-amd64 Depends: linux-base (>= 4.17~)")
    log.write_text("vmlab: building vmlab-exporter\nerror: foo\nvmlab: exporter build failed\n")
    assert "does not build against this kernel" in images._user_kernel_failure(r, log)
    log.write_text("E: Failed to fetch http://deb.debian.org/... 503\n")
    assert images._user_kernel_failure(r, log) is None   # the mirror's, not the kernel's


def test_qemu_sources(tmp_path):
    kernel_source.parse_qemu.cache_clear()
    pq = lambda s: kernel_source.parse_qemu(s, ("<command line>", "--qemu"))
    assert pq("default").form == "default" and pq("suite:trixie-backports").suite == "trixie-backports"
    d = tmp_path / "qd"
    d.mkdir()
    make_deb(d, "qemu-utils", "1:11.1.2")
    with pytest.raises(ConfigError, match="no qemu-system-x86 .deb among qemu-utils"):
        pq(f"deb:{d}")
    make_deb(d, "qemu-system-x86", "1:11.1.2")
    q = pq(f"deb:{d}")
    assert q.form == "deb" and len(q.debs) == 2 and q.user
    r = images.recipe("lab", "trixie", f"deb:{d}")
    assert "qemu-system-x86" not in r.packages and r.user_qemu == f"deb:{q.digest}"
    assert images.image_dir(r).name.startswith(f"lab-trixie-qemu-deb-{q.digest}-")
    b = tmp_path / "build"
    with pytest.raises(ConfigError, match="no such directory"):
        pq(f"build:{b}")
    (b / "pc-bios").mkdir(parents=True)
    with pytest.raises(CouldNotTest, match="no executable qemu-system-x86_64"):
        pq(f"build:{b}")
    (b / "qemu-system-x86_64").write_bytes(b"\x7fELF")
    (b / "qemu-system-x86_64").chmod(0o755)
    (b / "pc-bios/bios-256k.bin").write_bytes(b"bios")
    first = pq(f"build:{b}").digest
    kernel_source.parse_qemu.cache_clear()
    (b / "pc-bios/bios-256k.bin").write_bytes(b"new bios")
    assert pq(f"build:{b}").digest != first
    with pytest.raises(ConfigError, match="default, suite:NAME, deb:PATH or build:DIR"):
        pq("git:x")


def test_missing_libraries_are_listed_all_at_once(tmp_path):
    """A build: QEMU's DT_NEEDED resolved against the lab image root: every missing one."""
    from vmlab import initramfs
    root = tmp_path / "root"
    (root / "usr/lib/x86_64-linux-gnu").mkdir(parents=True)
    (root / "bin").mkdir()
    import shutil as sh
    sh.copyfile("/bin/ls", root / "bin/ls")
    libs = initramfs.missing_libs(root, "bin/ls")
    assert "libc.so.6" in libs and len(libs) >= 2
    sh.copyfile("/lib/x86_64-linux-gnu/libc.so.6", root / "usr/lib/x86_64-linux-gnu/libc.so.6")
    assert "libc.so.6" not in initramfs.missing_libs(root, "bin/ls")
