"""vmlab/versions.py: kernel release strings compare by their upstream version; constraints."""
from __future__ import annotations

import pytest

from vmlab import versions
from vmlab.versions import Version, parse_constraint, parse_release


@pytest.mark.parametrize("release,want", [
    ("7.2.12+deb14-amd64", Version(7, 2, 12)),
    ("6.12.57+deb13-amd64", Version(6, 12, 57)),
    ("6.1.0-40-amd64", Version(6, 1, 0)),       # Debian's old ABI naming: upstream is in the package
    ("5.10.0-28-amd64", Version(5, 10, 0)),
    ("6.13-rc3", Version(6, 13, 0, 3)),
    ("6.13.0-rc3+", Version(6, 13, 0, 3)),
    ("6.13.0-rc3-00012-gabcdef", Version(6, 13, 0, 3)),
    ("6.13.0-00012-gabcdef", Version(6, 13, 0)),
    ("6.13", Version(6, 13, 0)),
    ("7.3.4+deb14-cloud-amd64", Version(7, 3, 4)),
])
def test_parse_release(release, want):
    assert parse_release(release) == want


@pytest.mark.parametrize("bad", ["", "amd64", "6", "6.x", "v6.13", "6.12.57.1", None, 613])
def test_parse_release_bad(bad):
    with pytest.raises(versions.VersionError):
        parse_release(bad)


def test_ordering():
    order = ["6.1.0-40-amd64", "6.12", "6.12.57+deb13-amd64", "6.13-rc1", "6.13.0-rc3+", "6.13",
             "6.13.1", "7.2.12+deb14-amd64", "7.3.4"]
    vs = [parse_release(r) for r in order]
    assert vs == sorted(vs)
    assert all(a < b for a, b in zip(vs, vs[1:]))
    assert parse_release("6.13-rc3") < parse_release("6.13") < Version(6, 13, 1)


@pytest.mark.parametrize("constraint,release,hit", [
    ("<6.13", "6.12.57+deb13-amd64", True),
    ("<6.13", "6.13-rc3", True),
    ("<6.13", "6.13.0-rc3+", True),
    ("<6.13", "6.13.0", False),
    (">=6.13", "6.13", True),
    (">=6.13", "7.2.12+deb14-amd64", True),
    (">=6.13", "6.13-rc7", False),
    (">=6.1, <6.13", "6.1.0-40-amd64", True),
    (">=6.1, <6.13", "6.13.2", False),
    (" >= 6.1 ,< 6.13 ", "6.12.57", True),
    ("==6.13", "6.13.0", True),
    ("==6.13", "6.13.5", False),
    ("!=6.12.57", "6.12.57+deb13-amd64", False),
    ("!=6.12.57", "6.12.58", True),
    (">6.12", "6.12.1", True),
    ("<=6.12", "6.12.0-1-amd64", True),
    (">=6.13-rc1", "6.13-rc3", True),
])
def test_matches(constraint, release, hit):
    assert versions.matches(constraint, release) is hit


@pytest.mark.parametrize("bad", ["", " ", "6.13", "~6.13", "=>6.13", "<6", "<six", "<6.13,", ">=6.1;<6.13",
                                 "<6.13.0.1", "<=", None])
def test_bad_constraints(bad):
    with pytest.raises(versions.VersionError):
        parse_constraint(bad)


@pytest.mark.parametrize("a,b,overlap", [
    ("<6.13", ">=6.13", False),
    ("<=6.12", ">6.12", False),
    ("<6.14", ">=6.13", True),
    (">=6.1, <6.13", "<=6.12", True),
    (">=6.1, <6.13", ">=6.13", False),
    ("==6.13", ">=6.13", True),
    ("==6.13", "!=6.13", False),
    ("<6.13", "<6.1", True),
    (">=6.13, <6.1", "<7.0", False),   # an empty constraint overlaps nothing
    (">6.12", "<6.13", True),          # 6.12.1 .. 6.13-rcN
])
def test_overlap(a, b, overlap):
    got = versions.overlap(parse_constraint(a), parse_constraint(b))
    assert (got is not None) is overlap, got
    assert (versions.overlap(parse_constraint(b), parse_constraint(a)) is not None) is overlap


def test_pick():
    m = {"<6.13": "VMM_FAULT", ">=6.13": "REFAULTED"}
    assert versions.pick(m, "6.12.57+deb13-amd64") == ("<6.13", "VMM_FAULT")
    assert versions.pick(m, "6.13.0-rc3+") == ("<6.13", "VMM_FAULT")
    assert versions.pick(m, "7.3.4") == (">=6.13", "REFAULTED")
    assert versions.pick({">=6.13": "X"}, "6.12") is None
    with pytest.raises(versions.VersionError):
        versions.pick({"<6.14": 1, ">=6.13": 2}, "6.13.1")


def test_str():
    assert str(Version(6, 13)) == "6.13"
    assert str(Version(6, 12, 57)) == "6.12.57"
    assert str(Version(6, 13, 0, 3)) == "6.13-rc3"


@pytest.mark.parametrize("text,want", [
    ("11.1.3 (Debian 1:11.1.3+ds-1~bpo13+1)", (11, 1, 3)),
    ("1:11.1.3+ds-1~bpo13+1", (11, 1, 3)),
    ("1:10.0.13+ds-0+deb13u1", (10, 0, 13)),
    ("7.2.19", (7, 2, 19)),
    ("9.2", (9, 2)),
    ("", None),
    (None, None),
    ("unknown", None),
])
def test_qemu_upstream_version(text, want):
    assert versions.qemu_upstream_version(text) == want
