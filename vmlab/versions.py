"""Kernel versions for version-keyed expectations.

A lab kernel release string (``uname -r``) is compared by the *upstream* version in it:

    "7.2.12+deb14-amd64"   -> 7.2.12   (Debian's current naming: upstream version + ABI suffix)
    "6.12.57+deb13-amd64"  -> 6.12.57
    "6.13-rc3"             -> 6.13-rc3, which sorts before 6.13 (and after every 6.12.y)
    "6.13.0-rc3+"          -> 6.13-rc3 (a tree build; "+" and "-00012-gabcdef" are ignored)
    "6.1.0-40-amd64"       -> 6.1.0

The last one is Debian's *old* ABI naming (bookworm and before, and bullseye's "5.10.0-28"):
the release names the ABI, not the upstream version. The real upstream version (6.1.153,
say) is only in the package version (``linux-image-6.1.0-40-amd64`` 6.1.153-1), so such a
release parses as x.y.0 and sorts below every x.y.z stable. Key on ``<6.2``/``>=6.1`` (whole
series) for those kernels, or add a narrower key and say why in the config.

A *constraint* is one or more comma-separated clauses ``OP VERSION`` with OP one of
``<, <=, >, >=, ==, !=``; every clause must hold (``">=6.1, <6.13"``). ``==6.13`` means
exactly 6.13.0 (not 6.13.5).

Overlap between two constraints is decided on the version line as if it were continuous:
two entries that only touch at adjacent versions (``>6.12.57`` and ``<6.12.58-rc1``) count as
overlapping. Write ranges as ``<X`` / ``>=X`` and that never matters.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

__all__ = ["VersionError", "Version", "Constraint", "parse_release", "parse_version",
           "parse_constraint", "matches", "pick", "overlap", "sample_points"]


class VersionError(ValueError):
    """A release string or a constraint that does not parse."""


_RELEASE = re.compile(r"\s*(\d{1,6})\.(\d{1,6})(?:\.(\d{1,6}))?(?:-rc(\d{1,4}))?(?=$|[^0-9.])",
                      re.IGNORECASE)


@functools.total_ordering
@dataclass(frozen=True)
class Version:
    major: int
    minor: int
    patch: int = 0
    rc: int | None = None  # None: a release; n: the n-th release candidate before it

    @property
    def key(self) -> tuple:
        return (self.major, self.minor, self.patch, 0 if self.rc is not None else 1, self.rc or 0)

    def __lt__(self, other: "Version") -> bool:
        return self.key < other.key

    def __str__(self) -> str:
        s = f"{self.major}.{self.minor}" + (f".{self.patch}" if self.patch else "")
        return s if self.rc is None else f"{s}-rc{self.rc}"


def parse_release(release: str) -> Version:
    """The upstream version in a kernel release string (see the module docstring)."""
    if not isinstance(release, str):
        raise VersionError(f"kernel release must be a string, got {release!r}")
    m = _RELEASE.match(release)
    if not m:
        raise VersionError(f"{release!r} is not a kernel release (expected MAJOR.MINOR[.PATCH][-rcN]...)")
    major, minor, patch, rc = m.groups()
    return Version(int(major), int(minor), int(patch or 0), int(rc) if rc is not None else None)


_VERSION = re.compile(r"(\d{1,6})\.(\d{1,6})(?:\.(\d{1,6}))?(?:-rc(\d{1,4}))?", re.IGNORECASE)


def parse_version(text: str) -> Version:
    """A version as written in a constraint: MAJOR.MINOR[.PATCH][-rcN], nothing else."""
    m = _VERSION.fullmatch(text.strip())
    if not m:
        raise VersionError(f"{text.strip()!r} is not a version (MAJOR.MINOR[.PATCH][-rcN])")
    major, minor, patch, rc = m.groups()
    return Version(int(major), int(minor), int(patch or 0), int(rc) if rc is not None else None)


_OPS = {
    "<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b,
}
_CLAUSE = re.compile(r"\s*(<=|>=|==|!=|<|>)\s*(\S.*?)\s*")


@dataclass(frozen=True)
class Constraint:
    text: str
    clauses: tuple  # ((op, Version), ...)

    def matches_key(self, key: tuple) -> bool:
        """``key``: a Version.key, optionally with a 6th element (-1/0/+1: just below, at,
        just above) as produced by sample_points()."""
        k = tuple(key) + (0,) * (6 - len(key))
        return all(_OPS[op](k, v.key + (0,)) for op, v in self.clauses)

    def matches(self, version: Version | str) -> bool:
        if isinstance(version, str):
            version = parse_release(version)
        return self.matches_key(version.key)

    def bounds(self) -> list[Version]:
        return [v for _, v in self.clauses]

    def __str__(self) -> str:
        return self.text


def parse_constraint(text: str) -> Constraint:
    if not isinstance(text, str) or not text.strip():
        raise VersionError(f"{text!r} is not a version constraint (e.g. '<6.13' or '>=6.1, <6.13')")
    clauses = []
    for part in text.split(","):
        m = _CLAUSE.fullmatch(part)
        if not m:
            raise VersionError(f"{part.strip()!r} is not a clause OP VERSION with OP one of "
                               f"<, <=, >, >=, ==, != (e.g. '>=6.13')")
        clauses.append((m.group(1), parse_version(m.group(2))))
    return Constraint(text.strip(), tuple(clauses))


def matches(constraint: str | Constraint, release: str | Version) -> bool:
    c = constraint if isinstance(constraint, Constraint) else parse_constraint(constraint)
    return c.matches(release if isinstance(release, Version) else parse_release(release))


def pick(mapping: dict, release: str | Version):
    """(key, value) of the one entry of ``mapping`` (constraint text -> value) that matches
    ``release``, or None when none does. Raises VersionError when a key does not parse or
    when more than one entry matches."""
    v = release if isinstance(release, Version) else parse_release(release)
    hits = [(k, val) for k, val in mapping.items() if parse_constraint(k).matches(v)]
    if len(hits) > 1:
        raise VersionError(f"{v} matches {', '.join(repr(k) for k, _ in hits)}")
    return hits[0] if hits else None


_LOW = (-1, 0, 0, 0, 0, 0)
_HIGH = (1 << 30, 0, 0, 0, 0, 0)


def sample_points(constraints) -> list[tuple]:
    """Points that represent every region of the version line the constraints' bounds cut
    it into: each bound, just below and just above it, and both ends. Two constraints share a
    version (in the continuous model of the module docstring) iff they share one of these."""
    pts = {_LOW, _HIGH}
    for c in constraints:
        for b in c.bounds():
            for eps in (-1, 0, 1):
                pts.add(b.key + (eps,))
    return sorted(pts)


def describe_point(key: tuple) -> str:
    """Words for a sample point, for error messages."""
    if key == _LOW:
        return "the oldest lab kernels"
    if key == _HIGH:
        return "the newest lab kernels"
    major, minor, patch, rel, rc, eps = key
    v = Version(major, minor, patch, None if rel else rc)
    return {-1: f"lab kernels just below {v}", 0: f"lab kernel {v}", 1: f"lab kernels just above {v}"}[eps]


def overlap(a: Constraint, b: Constraint) -> str | None:
    """None when no version satisfies both; else words naming such a version."""
    for p in sorted(sample_points([a, b]), key=lambda k: k[5] != 0):
        if a.matches_key(p) and b.matches_key(p):
            return describe_point(p)
    return None


def qemu_upstream_version(text: str | None) -> tuple[int, ...] | None:
    """(11, 1, 3) from "11.1.3 (Debian 1:11.1.3+ds-1~bpo13+1)" (``qemu --version``) or
    "1:11.1.3+ds-1~bpo13+1" (a package version); None when there is no version in it."""
    if not text:
        return None
    m = re.match(r"\s*(?:\d+:)?(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not m:
        return None
    return tuple(int(g) for g in m.groups() if g is not None)
