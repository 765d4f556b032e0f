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
PLUGIN_ABI = 1
HEADER = "include/qemu/qemu-plugin.h"


class HwTraceUnavailable(UserError):
    """The plugin cannot be had for this QEMU (no source, no compiler): one line, exit 2."""


# --- which QEMU, and its source -------------------------------------------------------------
def qemu_source_version(binary: str = "qemu-system-x86_64") -> tuple[str, str]:
    """(source package, source version) of the Debian package that ships ``binary``."""
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


def private_apt(root: Path, codename: str) -> list[str]:
    """apt options for a deb-src index of ``codename`` kept under ``root`` only."""
    (root / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (root / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    kr = "/usr/share/keyrings/debian-archive-keyring.gpg"
    lines = [f"deb-src [signed-by={kr}] http://deb.debian.org/debian {codename} main",
             f"deb-src [signed-by={kr}] http://deb.debian.org/debian {codename}-updates main",
             f"deb-src [signed-by={kr}] http://deb.debian.org/debian {codename}-backports main",
             f"deb-src [signed-by={kr}] http://deb.debian.org/debian-security {codename}-security main"]
    (root / "sources.list").write_text("\n".join(lines) + "\n")
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
    with locked(cache_dir() / "qemu-src" / ".lock", "the QEMU source cache", timeout=600):
        if dest.exists():
            return dest
        progress(f"hardware oracle: fetching qemu-plugin.h of qemu {version} (Debian source)")
        opts = private_apt(cache_dir() / "apt-src", _codename())
        try:
            proc.run_cmd(["apt-get", *opts, "update"], timeout=300)
        except (InfraError, OSError) as e:
            raise HwTraceUnavailable(f"hardware oracle: cannot read Debian's source index: "
                                     f"{str(e).splitlines()[0][:200]}")
        with tempfile.TemporaryDirectory(prefix="vmlab-qemu-src-") as tmp:
            rc, out, err = proc.run_cmd(["apt-get", *opts, "source", "--download-only",
                                         f"qemu={version}"], timeout=900, cwd=tmp, check=False)
            if rc != 0:
                last = (err or out).strip().splitlines()[-1:] or ["?"]
                raise HwTraceUnavailable(f"hardware oracle: the source of qemu {version} (the QEMU "
                                         f"installed here) cannot be had: {last[0][:200]}")
            orig = next(Path(tmp).glob("qemu_*.orig.tar.*"), None)
            deb = next(Path(tmp).glob("qemu_*.debian.tar.*"), None)
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
                                         f"to {HEADER}: {r.stdout.strip()[:200]}")


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
                         + ccv.splitlines()[0].encode()).hexdigest()[:16]
    out = cache_dir() / "hwtrace" / key / "vmlab_hwtrace.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    argv = [cc, "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-D_GNU_SOURCE",
            "-I", str(header.parent), "-o", str(tmp), str(PLUGIN_SRC), "-lpthread"]
    rc, o, e = proc.run_cmd(argv, timeout=120, check=False)
    if rc:
        raise HwTraceUnavailable(f"hardware oracle: the plugin does not build against qemu "
                                 f"{version}'s qemu-plugin.h: {(e or o).strip().splitlines()[:1]}")
    os.replace(tmp, out)
    (out.parent / "qemu-version").write_text(version + "\n")
    progress(f"hardware oracle: plugin built for qemu {version}: {out}")
    return out


# --- the control socket ----------------------------------------------------------------------
class HwTrace:
    """Client of the plugin's control socket: one command line out, one reply line back,
    every reply within ``timeout``."""

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
        hello = json.loads(self.command("hello"))
        if hello.get("abi") != PLUGIN_ABI:
            raise InfraError(f"hardware oracle: plugin ABI {hello.get('abi')}, vmlab wants {PLUGIN_ABI}")
        return hello

    def command(self, line: str) -> str:
        assert self.sock is not None
        self.sock.sendall(line.encode() + b"\n")
        end = time.monotonic() + self.timeout
        while b"\n" not in self.buf:
            if time.monotonic() >= end:
                raise WaitTimeout(f"the hardware oracle's answer to {line.split(' ', 1)[0]!r}", self.timeout)
            try:
                chunk = self.sock.recv(1 << 16)
            except socket.timeout:
                continue
            if not chunk:
                raise InfraError(f"hardware oracle: the plugin closed its control socket "
                                 f"(answering {line.split(' ', 1)[0]!r}); did the lab's QEMU exit?")
            self.buf += chunk
        reply, _, self.buf = self.buf.partition(b"\n")
        text = reply.decode()
        if text.startswith("error"):
            raise InfraError(f"hardware oracle: {line.split(' ', 1)[0]}: {text}")
        return text

    def watch(self, old: set[int], new: set[int], epoch: int, va_lo: int, va_hi: int) -> None:
        """Start ``epoch``: accesses from [va_lo, va_hi) counted against ``old``/``new``."""
        self.command(f"range {va_lo:x} {va_hi:x}")
        self.command("set old " + " ".join(f"{p:x}" for p in sorted(old)))
        self.command("set new " + " ".join(f"{p:x}" for p in sorted(new)))
        self.command(f"epoch {epoch}")

    def sample(self, n: int) -> None:
        self.command(f"sample {n}")

    def dump(self) -> dict:
        return json.loads(self.command("dump"))

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


# --- the verdict -------------------------------------------------------------------------------
def verdict(dump: dict, npages: int) -> dict:
    """The hardware's verdict on one epoch (a move, or the baseline read).

    HW_STALE: some guest access hit a retired page. HW_REFAULTED: none did, and every page
    of the buffer was hit at its current pfn. Anything else (pages never seen at their
    current pfn, accesses from the guest's mapping that hit neither set) means the oracle
    could not see the whole read: no verdict, and the reason."""
    old, new = dump["old"], dump["new"]
    out = {"guest_hits_old": old["hits"], "guest_hits_new": new["hits"],
           "pages_hit_new": new["pages_hit"], "pages": npages,
           "first_old_hit_ns": dump.get("first_old_hit_ns"),
           "accesses_in_range": dump["in_range"], "accesses_elsewhere": dump["other"],
           "io": dump["io"], "no_hwaddr": dump["no_hwaddr"],
           "old_hits": [{"pfn": h["pfn"], "vaddr": hex(h["vaddr"]), "pc": hex(h["pc"]),
                         "ns": h["ns"], "store": h["store"]} for h in dump.get("old_hits", [])],
           # every retired-page hit, by the guest instruction that made it
           "old_hits_by_pc": [{"pc": hex(p["pc"]), "hits": p["hits"], "vaddr_min": hex(p["vaddr_min"]),
                               "vaddr_max": hex(p["vaddr_max"])} for p in dump.get("old_hits_by_pc", [])],
           "old_hits_other_pcs": dump.get("old_hits_other_pcs", 0)}
    if old["hits"]:
        out["verdict"] = "HW_STALE"
        out["detail"] = (f"{old['hits']} guest accesses hit {old['pages_hit']} retired page(s) after "
                         f"the move; the first {dump['first_old_hit_ns'] / 1e6:.3f} ms into the epoch")
    elif new["pages_hit"] == npages and new["pages"] == npages:
        out["verdict"] = "HW_REFAULTED"
        out["detail"] = f"every page hit at its current pfn ({new['hits']} accesses), none at a retired one"
    else:
        out["verdict"] = None
        out["detail"] = (f"the hardware oracle saw {new['pages_hit']} of {npages} pages at their current "
                         f"pfn; {dump['other']} of {dump['in_range']} accesses from the guest's mapping "
                         f"hit pages that are neither current nor retired, {dump['io']} were I/O")
    return out


def combine(stamps: str, hw: dict | None) -> tuple[str, str | None]:
    """(the move's verdict, why) from the stamps' verdict and the hardware's: the worse of the
    two, and when they disagree, that disagreement said in words."""
    if hw is None:
        return stamps, None
    h = hw.get("verdict")
    if h is None:
        return stamps, f"hardware oracle gave no verdict: {hw.get('detail')}"
    if h == "HW_STALE" and stamps == "REFAULTED":
        return "HW_STALE", ("stamps and hardware disagree: every page read back current, but the "
                            f"guest's accesses reached retired pages ({hw['detail']}): a stale "
                            f"mapping whose pages look current")
    if h == "HW_REFAULTED" and stamps in ("STALE", "TORN", "LOST_WRITE"):
        return stamps, (f"stamps and hardware disagree: the stamps say {stamps} but every access "
                        f"hit a current page: a lab artifact or an oracle bug")
    return stamps, None


if __name__ == "__main__":  # host-tools/install-deps: fetch the header, build the plugin
    import sys
    try:
        print(f"install-deps: hardware-oracle plugin {plugin_path(lambda m: print(m, file=sys.stderr))}",
              file=sys.stderr)
    except UserError as e:
        sys.exit(f"install-deps: {e}")
