"""Fetch a Debian suite's current kernel as .debs, for ``--kernel deb:DIR``.

A private apt (its own lists and cache under ``<cache>/vmlab/apt/<suite>``; the machine's
apt is not touched) reads the suite's index; the kernel is what linux-image-amd64 and
linux-headers-amd64 pull in that carries the kernel's ABI in its name (image, base, binary,
modules, headers, -common, kbuild). Each .deb is kept under ``<cache>/vmlab/debs/`` by
name, and reused while its SHA256 matches the index: a second fetch downloads nothing.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from .errors import CommandFailed, ConfigError
from .kernel_source import KERNEL_SUITES, TESTING_SUITES
from .paths import cache_dir, locked, sha256_file

MIRROR = "http://deb.debian.org/debian"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
APT_TIMEOUT = 600


def _apt_env(suite: str) -> dict:
    d = cache_dir() / "apt" / suite
    for sub in ("lists/partial", "cache/archives/partial"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    (d / "sources.list").write_text(f"deb [signed-by={KEYRING}] {MIRROR} {suite} main\n")
    # a stable suite's stale index is refused (kernel_source.TESTING_SUITES)
    valid_until = "false" if suite in TESTING_SUITES else "true"
    (d / "apt.conf").write_text(
        f'Dir::State "{d}";\nDir::State::Lists "{d}/lists";\nDir::State::status "/dev/null";\n'
        f'Dir::Cache "{d}/cache";\nDir::Etc::SourceList "{d}/sources.list";\n'
        f'Dir::Etc::SourceParts "/nonexistent";\nDir::Etc::Preferences "/dev/null";\n'
        f'Dir::Etc::PreferencesParts "/nonexistent";\nAcquire::Check-Valid-Until "{valid_until}";\n'
        f'APT::Architecture "amd64";\nAPT::Architectures {{ "amd64"; }};\n')
    return dict(os.environ, APT_CONFIG=str(d / "apt.conf"), LC_ALL="C")


def _apt(argv: list[str], env: dict, cwd: Path | None = None) -> str:
    try:
        p = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True,
                           timeout=APT_TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise CommandFailed(argv, -9, "", f"timed out after {APT_TIMEOUT}s") from None
    if p.returncode != 0:
        raise CommandFailed(argv, p.returncode, p.stdout, p.stderr)
    return p.stdout


def _record(env: dict, pkg: str) -> dict:
    """The candidate's index record: Package, Version, Filename, SHA256, Depends..."""
    text = _apt(["apt-cache", "show", "--no-all-versions", pkg], env)
    rec, key = {}, None
    for line in text.splitlines():
        if line.startswith(" ") and key:
            rec[key] += "\n" + line
        elif ": " in line:
            key, val = line.split(": ", 1)
            rec.setdefault(key, val)
    if "Package" not in rec:
        raise ConfigError("<command line>", "packages", f"{pkg}: not in the index of "
                          f"{env['APT_CONFIG'].split('/')[-2]}")
    return rec


def kernel_packages(env: dict) -> list[dict]:
    """The records of the suite's kernel: the ABI-named packages the amd64 metapackages
    depend on, followed through their dependencies."""
    meta = [_record(env, "linux-image-amd64"), _record(env, "linux-headers-amd64")]
    abi = re.search(r"linux-image-(\S+?)-amd64", meta[0].get("Depends", ""))
    if not abi:
        raise CommandFailed(["apt-cache", "show", "linux-image-amd64"], 1, "",
                            "cannot tell the kernel's ABI from its Depends")
    abi = re.escape(abi.group(1))
    todo = [d for m in meta for d in _deps(m)]
    seen, out = set(), []
    while todo:
        name = todo.pop(0)
        if name in seen or not re.search(abi, name):
            continue
        seen.add(name)
        rec = _record(env, name)
        out.append(rec)
        todo.extend(_deps(rec))
    return sorted(out, key=lambda r: r["Package"])


def _deps(rec: dict) -> list[str]:
    text = ", ".join(rec.get(k, "") for k in ("Pre-Depends", "Depends"))
    # the first alternative of each; "-unsigned" images are the alternative, not the choice
    return [alt.split("|")[0].split("(")[0].strip() for alt in text.split(",") if alt.strip()]


def _deb_name(rec: dict) -> str:
    return f"{rec['Package']}_{rec['Version'].replace(':', '%3a')}_{rec['Architecture']}.deb"


def _fetch(apt_suite: str, what: str, records, progress) -> Path:
    """Download the .debs of ``records(env)`` (index records) into one directory named by
    ``what`` and the first record's version; reuse what the store already holds."""
    store = cache_dir() / "debs"
    store.mkdir(parents=True, exist_ok=True)
    with locked(store / f".{apt_suite}.lock", f"the {apt_suite} fetch", timeout=1800):
        env = _apt_env(apt_suite)
        progress(f"reading the {apt_suite} index (private apt in {cache_dir() / 'apt' / apt_suite})")
        _apt(["apt-get", "update", "-q"], env)
        recs = records(env)
        version = recs[0]["Version"].replace(":", "%3a")
        out = store / f"{apt_suite}-{what}-{version}"
        out.mkdir(exist_ok=True)
        for rec in recs:
            name = _deb_name(rec)
            kept = store / name
            if not (kept.exists() and sha256_file(kept) == rec["SHA256"]):
                progress(f"  downloading {name} ({int(rec.get('Size', 0)) >> 20} MiB)")
                tmp = store / f".dl-{os.getpid()}"
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
                try:
                    _apt(["apt-get", "download", "-q", f"{rec['Package']}={rec['Version']}"], env, cwd=tmp)
                    got = next(tmp.glob("*.deb"))
                    if sha256_file(got) != rec["SHA256"]:
                        raise CommandFailed(["apt-get", "download", name], 1, "",
                                            "SHA256 differs from the index")
                    os.replace(got, kept)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
            if not (out / name).exists():
                os.link(kept, out / name)
        wanted = {_deb_name(r) for r in recs}
        for old in out.glob("*.deb"):
            if old.name not in wanted:
                old.unlink()
        progress(f"{apt_suite} {what} {recs[0]['Version']}: {len(recs)} .debs in {out}")
        return out


def _suite(suite: str) -> str:
    if suite not in KERNEL_SUITES:
        raise ConfigError("<command line>", "suite", f"{suite!r}: one of {', '.join(KERNEL_SUITES)}")
    return KERNEL_SUITES[suite][1]


def fetch_kernel(suite: str, progress=print) -> Path:
    """The directory of ``suite``'s kernel .debs (usable as deb:DIR), downloaded once."""
    return _fetch(_suite(suite), "kernel", kernel_packages, progress)


def fetch_packages(suite: str, names: list[str], progress=print) -> Path:
    """The directory of ``suite``'s current .debs of ``names`` (no dependencies followed)."""
    return _fetch(_suite(suite), names[0], lambda env: [_record(env, n) for n in names], progress)
