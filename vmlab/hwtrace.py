"""The hardware oracle: vmlab-hwtrace, a TCG plugin in the OUTER QEMU (the lab's).

The outer QEMU translates each nested-guest access through the guest's page tables and
KVM's nested page table, so the plugin sees which lab-host page every guest load and store
really hit. The guest agent maps the buffer at ``GUEST_MAP_VA``; the plugin counts the
accesses from that range that hit the buffer's retired (OLD) and current (NEW) pfns, per
epoch, and the controller turns that into HW_REFAULTED / HW_STALE (``verdict``).

The plugin is built against ``qemu-plugin.h`` of the exact QEMU that runs the lab, taken
from that version's Debian source package through a private apt source index under the
cache directory (the machine's own apt configuration is not touched).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

from . import proc
from .errors import InfraError, UserError, WaitTimeout
from .paths import cache_dir, locked, repo_root, write_atomic

log = logging.getLogger("vmlab.hwtrace")

GUEST_MAP_VA = 0x5a5a00000000   # guest-images/agent/vmlab-guest-agent.c: VMLAB_GUEST_MAP_VA
PLUGIN_SRC = repo_root() / "host-tools" / "vmlab-hwtrace" / "vmlab_hwtrace.c"
PLUGIN_ABI = 2
HEADER = "include/qemu/qemu-plugin.h"
CFLAGS = ("-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-D_GNU_SOURCE")


def _first_line(text: str, prefer: str = "") -> str:
    """One line of a tool's output for a one-line error: the first containing ``prefer``,
    else the first non-empty one."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    hit = [ln for ln in lines if prefer and prefer in ln]
    return ((hit or lines or ["(no output)"])[0])[:240]


class HwTraceUnavailable(UserError):
    """The plugin cannot be had for this QEMU (no source, no compiler): one line, exit 2."""


# --- which QEMU, and its source -------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def qemu_source_version(binary: str = "qemu-system-x86_64") -> tuple[str, str]:
    """(source package, source version) of the Debian package that ships ``binary``
    (asked of dpkg once per process)."""
    path = shutil.which(binary)
    if not path:
        raise HwTraceUnavailable(f"hardware oracle: {binary} is not installed")
    real = os.path.realpath(path)
    for candidate in dict.fromkeys((real, path)):
        rc, out, _ = proc.run_cmd(["dpkg", "-S", candidate], timeout=30, check=False)
        if rc == 0 and ":" in out:
            pkg = out.split(":", 1)[0].strip()
            _, sv, _ = proc.run_cmd(["dpkg-query", "-W", "-f", "${source:Package} ${source:Version}",
                                     pkg], timeout=30)
            name, _, version = sv.strip().partition(" ")
            return name, version
    raise HwTraceUnavailable(f"hardware oracle: {real} belongs to no Debian package, so vmlab "
                             f"cannot fetch the qemu-plugin.h it was built with")


def _codename() -> str:
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        text = ""
    m = re.search(r"^VERSION_CODENAME=\"?([a-z]+)", text, re.M)
    if not m:
        raise HwTraceUnavailable("hardware oracle: /etc/os-release names no Debian codename "
                                 "(needed to find the QEMU source package)")
    return m.group(1)


def _apt_options(root: Path) -> list[str]:
    return ["-o", f"Dir::Etc::SourceList={root / 'sources.list'}",
            "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", f"Dir::State::Lists={root / 'lists'}",
            "-o", f"Dir::Cache={root / 'cache'}",
            "-o", "APT::Sandbox::User=root", "-q"]


def private_apt(root: Path, codename: str, extra_suites: bool = True) -> list[str]:
    """apt options for a deb-src index of ``codename`` kept under ``root`` only."""
    (root / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (root / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    kr = "/usr/share/keyrings/debian-archive-keyring.gpg"
    lines = [f"deb-src [signed-by={kr}] http://deb.debian.org/debian {codename} main",
             f"deb-src [signed-by={kr}] http://deb.debian.org/debian {codename}-updates main",
             f"deb-src [signed-by={kr}] http://deb.debian.org/debian {codename}-backports main",
             f"deb-src [signed-by={kr}] http://deb.debian.org/debian-security {codename}-security main"]
    (root / "sources.list").write_text("\n".join(lines if extra_suites else lines[:1]) + "\n")
    return _apt_options(root)


def _patch_sections(patch: str, target: str) -> str:
    """The file sections of a unified diff whose new path ends with ``target``: a section
    starts at a "--- " line followed by a "+++ " line."""
    lines = patch.splitlines(keepends=True)
    out, keep = [], False
    for i, line in enumerate(lines):
        if line.startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ "):
            new = lines[i + 1][4:].split("\t")[0].strip()
            keep = new == target or new.endswith("/" + target)
        if keep:
            out.append(line)
    return "".join(out)


def fetch_header(version: str, progress=print) -> Path:
    """``qemu-plugin.h`` of Debian's qemu source ``version`` (orig tarball plus the Debian
    patches that touch it), cached per version."""
    dest = cache_dir() / "qemu-src" / version / "qemu-plugin.h"
    if dest.exists():
        return dest
    # the holder may take apt-get update (300 s) and apt-get source (900 s)
    with locked(cache_dir() / "qemu-src" / ".lock", "the QEMU source cache", timeout=1500):
        if dest.exists():
            return dest
        progress(f"hardware oracle: fetching qemu-plugin.h of qemu {version} (Debian source)")
        codename = _codename()
        opts = private_apt(cache_dir() / "apt-src", codename)
        try:
            rc, out, err = proc.run_cmd(["apt-get", *opts, "update"], timeout=300, check=False)
            if rc:  # a suite without -updates/-backports/-security (sid): the base alone
                opts = private_apt(cache_dir() / "apt-src", codename, extra_suites=False)
                rc, out, err = proc.run_cmd(["apt-get", *opts, "update"], timeout=300, check=False)
        except (InfraError, OSError) as e:
            rc, err = 1, str(e)
        if rc:
            raise HwTraceUnavailable(f"hardware oracle: cannot read Debian's source index: "
                                     f"{_first_line(err or out, 'E:')}")
        with tempfile.TemporaryDirectory(prefix="vmlab-qemu-src-") as tmp:
            rc, out, err = proc.run_cmd(["apt-get", *opts, "source", "--download-only",
                                         f"qemu={version}"], timeout=900, cwd=tmp, check=False)
            if rc != 0:
                raise HwTraceUnavailable(f"hardware oracle: the source of qemu {version} (the QEMU "
                                         f"installed here) cannot be had: {_first_line(err or out, 'E:')}")
            tarballs = [p for p in Path(tmp).iterdir() if not p.name.endswith(".asc")]
            orig = next((p for p in tarballs if ".orig.tar." in p.name), None)
            deb = next((p for p in tarballs if ".debian.tar." in p.name), None)
            if orig is None:
                raise HwTraceUnavailable(f"hardware oracle: qemu {version}'s source has no orig tarball")
            with tarfile.open(orig) as t:
                member = next((m for m in t if m.name.endswith("/" + HEADER)), None)
                if member is None:
                    raise HwTraceUnavailable(f"hardware oracle: qemu {version} has no {HEADER}")
                top = member.name[:-len(HEADER)]
                if hasattr(tarfile, "data_filter"):
                    t.extract(member, tmp, filter="data")
                else:  # a Python without extraction filters: the member is a plain file
                    t.extract(member, tmp)
            tree = Path(tmp) / top
            if deb is not None:
                _apply_debian_patches(deb, tree, tmp)
            dest.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(dest, (tree / HEADER).read_text(), mode=0o644)
    return dest


def _apply_debian_patches(deb: Path, tree: Path, tmp: str) -> None:
    with tarfile.open(deb) as t:
        names = {m.name: m for m in t if m.isfile() and m.name.startswith("debian/patches/")}
        series_m = names.get("debian/patches/series")
        if series_m is None:
            return
        series = t.extractfile(series_m).read().decode()
        for line in series.splitlines():
            name = line.split("#", 1)[0].strip().split(" ")[0]
            m = names.get(f"debian/patches/{name}") if name else None
            if m is None:
                continue
            text = t.extractfile(m).read().decode(errors="replace")
            part = _patch_sections(text, HEADER)
            if not part:
                continue
            r = subprocess.run(["patch", "-p1", "--batch", "--silent"], input=part, text=True,
                               cwd=tree, capture_output=True, timeout=60)
            if r.returncode:
                raise HwTraceUnavailable(f"hardware oracle: Debian patch {name} does not apply "
                                         f"to {HEADER}: {_first_line(r.stdout + r.stderr)}")


# --- the plugin ----------------------------------------------------------------------------
def plugin_path(progress=print, binary: str = "qemu-system-x86_64") -> Path:
    """The plugin built for the installed QEMU: cached by source, header and compiler."""
    _pkg, version = qemu_source_version(binary)
    header = fetch_header(version, progress)
    cc = shutil.which("gcc")
    if not cc:
        raise HwTraceUnavailable("hardware oracle: gcc is not installed (host-tools/install-deps)")
    _, ccv, _ = proc.run_cmd([cc, "--version"], timeout=30)
    key = hashlib.sha256(PLUGIN_SRC.read_bytes() + header.read_bytes()
                         + ccv.splitlines()[0].encode() + " ".join(CFLAGS).encode()).hexdigest()[:16]
    out = cache_dir() / "hwtrace" / key / "vmlab_hwtrace.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    argv = [cc, *CFLAGS, "-I", str(header.parent), "-o", str(tmp), str(PLUGIN_SRC), "-lpthread"]
    try:
        rc, o, e = proc.run_cmd(argv, timeout=120, check=False)
        if rc:
            raise HwTraceUnavailable(f"hardware oracle: the plugin does not build against qemu "
                                     f"{version}'s qemu-plugin.h: {_first_line(e or o, 'error:')}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    write_atomic(out.parent / "qemu-version", version + "\n", mode=0o644)
    progress(f"hardware oracle: plugin built for qemu {version}: {out}")
    return out


# --- the control socket ----------------------------------------------------------------------
class HwTrace:
    """Client of the plugin's control socket: one command line out, one reply line back,
    every reply within ``timeout``. After a timeout or a garbled reply the connection is
    dropped (a late answer must never be taken for the next command's)."""

    def __init__(self, path: str, timeout: float = 20):
        self.path, self.timeout = path, timeout
        self.sock: socket.socket | None = None
        self.buf = b""

    def connect(self, within: float = 30) -> dict:
        end = time.monotonic() + within
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(self.timeout)
            try:
                s.connect(self.path)
                self.sock = s
                break
            except OSError as e:
                s.close()
                if time.monotonic() >= end:
                    raise WaitTimeout(f"the hardware oracle's control socket {self.path}", within, str(e))
                time.sleep(0.2)
        hello = self._json("hello")
        if hello.get("abi") != PLUGIN_ABI:
            raise InfraError(f"hardware oracle: plugin ABI {hello.get('abi')}, vmlab wants {PLUGIN_ABI}")
        return hello

    def command(self, line: str) -> str:
        verb = line.split(" ", 1)[0]
        if self.sock is None:
            raise InfraError(f"hardware oracle: not connected (sending {verb!r})")
        try:
            self.sock.sendall(line.encode() + b"\n")
            end = time.monotonic() + self.timeout
            while b"\n" not in self.buf:
                if time.monotonic() >= end:
                    raise WaitTimeout(f"the hardware oracle's answer to {verb!r}", self.timeout)
                try:
                    chunk = self.sock.recv(1 << 16)
                except socket.timeout:
                    continue
                if not chunk:
                    raise InfraError(f"hardware oracle: the plugin closed its control socket "
                                     f"(answering {verb!r}); did the lab's QEMU exit?")
                self.buf += chunk
        except BaseException:
            self.close()
            raise
        reply, _, self.buf = self.buf.partition(b"\n")
        text = reply.decode(errors="replace")
        if text.startswith("error"):
            raise InfraError(f"hardware oracle: {verb}: {text}")
        return text

    def _json(self, line: str) -> dict:
        text = self.command(line)
        try:
            v = json.loads(text)
        except ValueError:
            self.close()
            raise InfraError(f"hardware oracle: {line!r} answered no JSON: {text[:120]!r}")
        if not isinstance(v, dict):
            raise InfraError(f"hardware oracle: {line!r} answered {text[:120]!r}")
        return v

    def setup(self, va_lo: int, va_hi: int, current: list[int]) -> None:
        """Before the first read: the guest mapping's range, the buffer's pages, no retired ones."""
        self.command(f"range {va_lo:x} {va_hi:x}")
        self.command("set old")
        self.command("set new " + " ".join(f"{p:x}" for p in current))

    def epoch(self, n: int) -> None:
        """Start counting afresh (before a move: nothing from the move on is lost)."""
        self.command(f"epoch {n}")

    def retire(self, t_ns: int, current: list[int]) -> None:
        """The buffer moved, completing at ``t_ns`` (time.monotonic_ns(): the plugin's
        CLOCK_MONOTONIC): its pages are now ``current``; the others are retired from t_ns."""
        self.command(f"retire {t_ns} " + " ".join(f"{p:x}" for p in current))

    def sample(self, n: int) -> None:
        self.command(f"sample {n}")

    def dump(self) -> dict:
        return self._json("dump")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.buf = b""


# --- the verdict -------------------------------------------------------------------------------
def verdict(dump: dict, npages: int, moved_at_ns: int | None = None) -> dict:
    """The hardware's verdict on one epoch (a move, or the baseline read).

    HW_STALE: some guest access hit a retired page after it was retired. HW_REFAULTED: none
    did, every page of the buffer was hit at its current pfn, and every access from the
    guest's mapping is accounted for (none hit another page, none was I/O, none lacked a
    physical address). Anything else: no verdict, and the reason."""
    old, new = dump["old"], dump["new"]
    first = dump.get("first_old_hit_ns")
    out = {"guest_hits_old": old["hits"], "guest_hits_new": new["hits"],
           "pages_hit_new": new["pages_hit"], "pages": npages,
           "hits_before_retire": old.get("before_retire", 0),
           # retired by an earlier move and hit before this one: that move's staleness
           "hits_on_retired_before_this_move": old.get("before_move", 0),
           "first_old_hit_ns": (first - moved_at_ns) if first is not None and moved_at_ns else first,
           "accesses_in_range": dump["in_range"], "accesses_elsewhere": dump["other"],
           "io": dump["io"], "no_hwaddr": dump["no_hwaddr"],
           "old_hits": [{"pfn": h["pfn"], "vaddr": hex(h["vaddr"]), "pc": hex(h["pc"]),
                         "ns_after_move": h["ns"] - moved_at_ns if moved_at_ns else None,
                         "store": h["store"]} for h in dump.get("old_hits", [])],
           # every retired-page hit, by the guest instruction that made it
           "old_hits_by_pc": [{"pc": hex(p["pc"]), "hits": p["hits"], "vaddr_min": hex(p["vaddr_min"]),
                               "vaddr_max": hex(p["vaddr_max"])} for p in dump.get("old_hits_by_pc", [])],
           "old_hits_other_pcs": dump.get("old_hits_other_pcs", 0),
           "elsewhere": [{"pfn": h["pfn"], "vaddr": hex(h["vaddr"]), "pc": hex(h["pc"]),
                          "ns_after_move": h["ns"] - moved_at_ns if moved_at_ns else None,
                          "store": h["store"]} for h in dump.get("other_hits", [])]}
    unaccounted = dump["other"] + dump["io"] + dump["no_hwaddr"] + old.get("before_move", 0)
    if old["hits"]:
        when = (f"; the first {out['first_old_hit_ns'] / 1e6:.3f} ms after the move"
                if moved_at_ns and first is not None else "")
        out["verdict"] = "HW_STALE"
        out["detail"] = (f"{old['hits']} guest accesses hit {old['pages_hit']} retired page(s)"
                         f"{when}")
    elif npages > 0 and new["pages"] == npages and new["pages_hit"] == npages and not unaccounted:
        out["verdict"] = "HW_REFAULTED"
        out["detail"] = f"every page hit at its current pfn ({new['hits']} accesses), none at a retired one"
    else:
        out["verdict"] = None
        out["detail"] = (f"the hardware oracle cannot vouch for this read: {new['pages_hit']} of "
                         f"{npages} pages seen at their current pfn; of {dump['in_range']} accesses "
                         f"from the guest's mapping {dump['other']} hit pages that are neither "
                         f"current nor retired, {dump['io']} were I/O, {dump['no_hwaddr']} had no "
                         f"physical address, {old.get('before_move', 0)} hit pages an earlier move "
                         f"retired (before this move)")
    return out


def combine(stamps: str, hw: dict | None) -> tuple[str, str | None, bool]:
    """(the move's verdict, why, contradiction) from the stamps' verdict and the hardware's:
    the worse of the two, a disagreement said in words, and ``contradiction`` when the move
    cannot pass whatever was expected (no hardware verdict, or the hardware clearing what
    the stamps saw wrong: a lab artifact or an oracle bug, never a pass)."""
    if hw is None:
        return stamps, None, False
    h = hw.get("verdict")
    if h is None:
        return stamps, f"hardware oracle gave no verdict: {hw.get('detail')}", True
    if h == "HW_STALE" and stamps == "REFAULTED":
        return "HW_STALE", ("stamps and hardware disagree: every page read back current, but the "
                            f"guest's accesses reached retired pages ({hw['detail']}): a stale "
                            f"mapping whose pages look current"), False
    # stale pages read back, yet no access reached a retired page: one oracle is wrong
    # (TORN, LOST_WRITE and NOT_ZAPPED are about content and counters: no contradiction)
    if h == "HW_REFAULTED" and stamps == "STALE":
        return stamps, (f"stamps and hardware disagree: the stamps say {stamps} but every access "
                        f"hit a current page: a lab artifact or an oracle bug"), True
    return stamps, None, False


if __name__ == "__main__":  # host-tools/install-deps: fetch the header, build the plugin
    import sys
    try:
        print(f"install-deps: hardware-oracle plugin {plugin_path(lambda m: print(m, file=sys.stderr))}",
              file=sys.stderr)
    except Exception as e:  # one line, whatever broke: install-deps decides what it means
        sys.exit(f"install-deps: hardware-oracle plugin not built: {_first_line(str(e))}")
