"""Image cache keys: every input that decides an image's bytes must change its key."""
from __future__ import annotations

import vmlab.images as images


def test_key_is_stable_and_differs_per_suite_and_kind():
    keys = {(kind, k): images.recipe(kind, k).key() for kind in ("lab", "guest")
            for k in images.KERNEL_SUITES}
    assert len(set(keys.values())) == len(keys)
    assert images.recipe("lab").key() == images.recipe("lab").key()


def test_key_covers_input_files_and_apt_pins(tmp_path, monkeypatch):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.sh").write_text("one")
    monkeypatch.setattr(images, "repo_root", lambda: tmp_path)
    r = images.Recipe("lab", "trixie-backports", ("p",), (), ("in",))
    k1 = r.key()
    (tmp_path / "in" / "a.sh").write_text("two")
    k2 = r.key()
    assert k1 != k2
    (tmp_path / "in" / "x.o").write_text("build output is not an input")
    assert r.key() == k2
    (tmp_path / "in" / "README.md").write_text("nor is prose")
    assert r.key() == k2
    monkeypatch.setattr(images, "_apt_pins", lambda rec: ["--setup-hook=other pin"])
    assert r.key() != k2


def test_unknown_suite_is_a_config_error():
    import pytest
    from vmlab.errors import ConfigError
    with pytest.raises(ConfigError) as e:
        images.recipe("lab", "sid")
    assert "kernel" in str(e.value) and "sid" in str(e.value)


def test_a_lab_with_another_suites_qemu_is_its_own_image_and_holds_the_kernel():
    from vmlab import images
    plain = images.recipe("lab", "trixie")
    bpo = images.recipe("lab", "trixie", "trixie-backports")
    assert plain.key() != bpo.key() and "-qemu-trixie-backports-" in images.image_dir(bpo).name
    assert any("trixie-backports" in s for s in images._sources(bpo))
    hook = " ".join(images._apt_pins(bpo))
    assert "n=trixie-backports" in hook and "src:linux" in hook and "1001" in hook
    # the kernel's own suite already brings that QEMU: the same image as without --qemu
    assert images.recipe("lab", "trixie-backports", "trixie-backports") == images.recipe("lab", "trixie-backports")


def test_per_suite_apt_options_and_packages():
    """forky's InRelease is served past its Valid-Until (measured): only forky's apt
    ignores it; bookworm's and bullseye's QEMU have no separate OpenGL module package."""
    forky = images.recipe("lab", "forky")
    assert any("Check-Valid-Until" in a for a in images._apt_args(forky))
    for k in ("trixie", "trixie-backports", "bookworm", "bullseye"):
        assert not any("Check-Valid-Until" in a for a in images._apt_args(images.recipe("lab", k)))
    assert "qemu-system-modules-opengl" not in images.recipe("lab", "bookworm").packages
    assert "qemu-system-modules-opengl" not in images.recipe("lab", "bullseye").packages
    assert "qemu-system-modules-opengl" in images.recipe("lab", "trixie").packages
    # bookworm's kernel with bookworm-backports' QEMU (10.0) gets the module again
    assert "qemu-system-modules-opengl" in images.recipe("lab", "bookworm", "bookworm-backports").packages
