"""Experiment configs: YAML, validated against schemas/experiment.schema.json and then for what
a schema cannot say; every error reported at once on ONE line that names the file and the
key path of the first error (ConfigError, exit 2, before anything boots).

Reading is defensive: files over 64 KiB, duplicate keys at any level, anchors/aliases
(no "billion laughs"), merge keys, nesting deeper than 32 levels and scalars over 4096
characters are refused; "integer" means a YAML integer (``2.0`` is not one) and "number"
excludes NaN and infinities.

Expectations (``moves[i].expect``, ``baseline.expect``) are a verdict, a list of verdicts,
or a mapping from a constraint on the LAB kernel version to either
(``{"<6.13": VMM_FAULT, ">=6.13": REFAULTED}``, see vmlab/versions.py). The entries of a
mapping may not overlap, and no list may accept every outcome (REFAULTED together with
VMM_FAULT or STALE). Resolve them for the lab kernel that booted with
``Experiment.expectations_for(release)`` and ``Experiment.baseline_expect_for(release)``.

Also refused (exporter.size, ...): a buffer larger than the vmlab exporter's default
max_buffer_mb (256 MiB), than the guest's RAM or than half the lab's RAM (rechecked by
``resolve`` with the command line's memory); caching/alloc/fault for udmabuf and dmaheap;
store without guest_write;
gpu_roundtrip without a guest GPU; UNSUPPORTED for a vmlab move (every mode exists);
NOT_ZAPPED outside ZAP_ONLY; LOST_WRITE without guest_write; inject: kill-vmm or refused-map
expecting anything but VMM_FAULT (refused-map also needs vmm_on_move remap), and, after a VMM that must be dead (kill-vmm, or a baseline or move
expecting only VMM_FAULT), any later move expecting anything but VMM_FAULT, checked for every
range of lab kernel versions the keys cut out. An experiment without ``moves`` is a
baseline-only check and must say what its ``baseline.expect`` is (default REFAULTED).

Settings that exist both on the command line and in a config merge ONE way, for every one of
them (``resolve``):

    command line  >  config  >  built-in default (DEFAULTS)

    setting              CLI option              config key          default
    accel                --accel                 lab.accel           auto
    kernel               --kernel                lab.kernel          trixie
    lab_base             --lab-base              lab.base            inferred (deb:, tree: only)
    lab_append           --lab-append            lab.append          none
    qemu                 --qemu                  lab.qemu            default (the lab kernel's suite)
    guest_kernel         --guest-kernel          guest.kernel        trixie (whatever the lab kernel)
    lab_memory_mb        --lab-memory            lab.memory_mb       3072
    lab_boot_timeout     --boot-timeout          lab.boot_timeout    300
    guest_memory_mb      --guest-memory          guest.memory_mb     512
    guest_boot_timeout   --guest-boot-timeout    guest.boot_timeout  240
    guest_gpu            -                       guest.gpu           none
    guest_mapping        -                       guest.mapping       uc
    guest_align          -                       guest.align_mappings 4K

The argparse defaults are all None so that "not given" is visible; commands without a
config (lab up, doctor, bench) call ``resolve(None, args)``; it returns a plain dict
(JSON-able, kept in results.json) with the keys of DEFAULTS plus lab_qemu_args, no_build
and sources (which layer each value came from).
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

from . import kernel_source, oracle, versions
from .errors import ConfigError
from .kernel_source import KERNEL_SUITES

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}

MAX_FILE_BYTES = 64 << 10
MAX_DEPTH = 32
MAX_SCALAR_CHARS = 4096
MAX_MESSAGE_PART = 300

#: The vmlab exporter module's default ``max_buffer_mb`` (host-tools/vmlab-exporter).
EXPORTER_MAX_BYTES = 256 << 20

#: Built-in defaults: the last word in ``resolve``.
DEFAULTS = {
    "accel": "auto",
    "kernel": "trixie",
    "lab_base": None,
    "lab_append": "",
    "lab_kind": "nested",
    "qemu": "default",
    "guest_kernel": "trixie",
    "lab_memory_mb": 3072,
    "lab_boot_timeout": 300.0,
    "guest_memory_mb": 512,
    "guest_boot_timeout": 240.0,
    "guest_gpu": "none",
    "guest_mapping": "uc",
    "guest_align": "4K",
}

# setting -> (argparse dest or None, config key path or None, CLI spelling)
_MERGE = {
    "accel": ("accel", ("lab", "accel"), "--accel"),
    "kernel": ("kernel", ("lab", "kernel"), "--kernel"),
    "lab_base": ("lab_base", ("lab", "base"), "--lab-base"),
    "lab_append": ("lab_append", ("lab", "append"), "--lab-append"),
    "lab_kind": (None, ("lab", "kind"), None),
    "qemu": ("qemu", ("lab", "qemu"), "--qemu"),
    "guest_kernel": ("guest_kernel", ("guest", "kernel"), "--guest-kernel"),
    "lab_memory_mb": ("lab_memory", ("lab", "memory_mb"), "--lab-memory"),
    "lab_boot_timeout": ("boot_timeout", ("lab", "boot_timeout"), "--boot-timeout"),
    "guest_memory_mb": ("guest_memory", ("guest", "memory_mb"), "--guest-memory"),
    "guest_boot_timeout": ("guest_boot_timeout", ("guest", "boot_timeout"), "--guest-boot-timeout"),
    "guest_gpu": (None, ("guest", "gpu"), None),
    "guest_mapping": (None, ("guest", "mapping"), None),
    "guest_align": (None, ("guest", "align_mappings"), None),
}

#: One line for --help texts.
MERGE_RULE = ("Every setting that exists both as an option and in the experiment config is taken "
              "from the command line if given, else from the config, else from the built-in "
              "default (lab memory 3072 MiB, lab boot timeout 300 s, guest kernel trixie, guest "
              "memory 512 MiB, guest boot timeout 240 s, guest gpu none).")

# what the oracle can say, plus UNSUPPORTED (an interface with no such move)
VERDICTS = oracle.VERDICTS + ("UNSUPPORTED",)
DEFAULT_BASELINE_EXPECT = "REFAULTED"
_RELEASE = {suite: base for suite, (base, _) in KERNEL_SUITES.items()}


def qemu_suite_of(qemu: str) -> str | None:
    """"suite:NAME" -> NAME; "default" (the lab kernel's suite), deb: and build: -> None."""
    return qemu[len("suite:"):] if qemu.startswith("suite:") else None
# QEMU 7.2's qemu_plugin_hwaddr_phys_addr() gives a RAM block offset, which is the
# guest-physical address only below the PC machine's PCI hole (below 3.5 GiB of RAM)
MAX_HW_LAB_MEMORY_MB = 3583
# pairs that, listed together, accept every answer to the question a move asks: did the
# guest get the new pages (for ZAP_ONLY: did the zap take). REFAULTED with LOST_WRITE is
# not one: a stale read is STALE before the guest's write is looked at ("not stale,
# whether or not the write survived")
_EVERY_OUTCOME = (("REFAULTED", "VMM_FAULT"), ("REFAULTED", "STALE"), ("REFAULTED", "HW_STALE"),
                  ("REFAULTED", "NOT_ZAPPED"))


# --- argparse types ------------------------------------------------------------------------
def positive_int(text: str) -> int:
    """argparse ``type=``: an integer >= 1."""
    import argparse
    try:
        v = int(str(text).strip(), 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {v}")
    return v


def positive_float(text: str) -> float:
    """argparse ``type=``: a finite number > 0 (seconds)."""
    import argparse
    try:
        v = float(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {text!r}")
    return v


# --- schema --------------------------------------------------------------------------------
def schema() -> dict:
    return json.loads(resources.files("vmlab").joinpath("schemas/experiment.schema.json").read_text())


@functools.lru_cache(maxsize=1)
def _validator():
    import jsonschema
    base = jsonschema.Draft202012Validator
    checker = base.TYPE_CHECKER.redefine_many({
        # YAML's 2.0 is a float, and a float where an integer is meant is a mistake
        "integer": lambda _c, x: isinstance(x, int) and not isinstance(x, bool),
        "number": lambda _c, x: (isinstance(x, (int, float)) and not isinstance(x, bool)
                                 and math.isfinite(x)),
    })
    return jsonschema.validators.extend(base, type_checker=checker)(schema())


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def _path(p) -> str:
    out = ""
    for part in p:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _IDENT.fullmatch(str(part)):
            out += f".{part}" if out else str(part)
        else:
            out += f"[{json.dumps(str(part))}]"
    return out or "<top level>"


def _one_line(s: str) -> str:
    s = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(s))
    return s if len(s) <= MAX_MESSAGE_PART else s[: MAX_MESSAGE_PART - 3] + "..."


_SIZE_RE = re.compile(r"\s*([0-9]{1,13})\s*([KMG]?)\s*", re.IGNORECASE)


def parse_size(v) -> int:
    """4096, "4096", "64K", "1M", "2G" (case and surrounding blanks ignored) -> bytes."""
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise ValueError(f"{v!r} is not a size")
    if isinstance(v, int):
        return v
    m = _SIZE_RE.fullmatch(v)
    if not m:
        raise ValueError(f"{v!r} is not a size")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def _mib(n: int) -> str:
    if n >= 1 << 30 and n % (1 << 30) == 0:
        return f"{n >> 30} GiB"
    return f"{n >> 20} MiB" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n} bytes"


# --- reading YAML --------------------------------------------------------------------------
class _Refused(yaml.YAMLError):
    def __init__(self, path: list, mark, msg: str):
        self.path, self.mark, self.msg = path, mark, msg
        super().__init__(msg)


class _Loader(yaml.SafeLoader):
    """SafeLoader without anchors, aliases and deep nesting; knows the key path it is at."""

    def __init__(self, stream):
        super().__init__(stream)
        self._at: list = []

    def compose_node(self, parent, index):
        ev = self.peek_event()
        if isinstance(ev, yaml.AliasEvent) or getattr(ev, "anchor", None) is not None:
            raise _Refused(self._at + self._step(parent, index), ev.start_mark,
                           f"anchors and aliases are not allowed (&/*{ev.anchor})")
        step = self._step(parent, index)
        self._at.extend(step)
        if len(self._at) > MAX_DEPTH:
            raise _Refused(self._at[:MAX_DEPTH], ev.start_mark, f"nested deeper than {MAX_DEPTH} levels")
        try:
            return super().compose_node(parent, index)
        finally:
            del self._at[len(self._at) - len(step):]

    @staticmethod
    def _step(parent, index) -> list:
        if isinstance(parent, SequenceNode) and isinstance(index, int):
            return [index]
        if isinstance(parent, MappingNode) and isinstance(index, ScalarNode):
            return [index.value]
        if isinstance(parent, MappingNode) and index is not None:
            return ["?"]
        return []


def _check_nodes(loader: _Loader, node, path: list, errs: list) -> None:
    """Duplicate keys (YAML keeps the last one silently), merge keys, over-long scalars."""
    if isinstance(node, MappingNode):
        seen: dict = {}
        for k, v in node.value:
            line = k.start_mark.line + 1
            if k.tag == "tag:yaml.org,2002:merge":
                errs.append((path, f"merge keys (<<) are not allowed (line {line})"))
                continue
            key = k.value if isinstance(k, ScalarNode) else "?"
            if isinstance(k, ScalarNode):
                try:
                    ident = loader.construct_object(k)
                    hash(ident)
                except Exception:
                    ident = (k.tag, k.value)
                if ident in seen:
                    errs.append((path + [key], f"duplicate key {_one_line(key)!r} at line {line} "
                                 f"(first at line {seen[ident]}); YAML would keep only the last"))
                else:
                    seen[ident] = line
            _check_nodes(loader, k, path + [key], errs)
            _check_nodes(loader, v, path + [key], errs)
    elif isinstance(node, SequenceNode):
        for i, item in enumerate(node.value):
            _check_nodes(loader, item, path + [i], errs)
    elif isinstance(node, ScalarNode) and len(node.value) > MAX_SCALAR_CHARS:
        errs.append((path, f"value longer than {MAX_SCALAR_CHARS} characters "
                     f"(line {node.start_mark.line + 1})"))


def _read_yaml(p: str) -> tuple[object, list]:
    """(data, [(path, msg), ...] of non-fatal problems). Fatal ones raise ConfigError."""
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError(p, "", f"cannot read: {e.strerror or e}")
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(p, "", f"larger than {MAX_FILE_BYTES} bytes: not an experiment config")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(p, "", f"not UTF-8 text (byte {e.start})")
    loader = None
    try:
        loader = _Loader(text)
        node = loader.get_single_node()
        errs: list = []
        if node is not None:
            _check_nodes(loader, node, [], errs)
        try:
            raw = loader.construct_document(node) if node is not None else None
        except (ValueError, OverflowError, RecursionError, TypeError):
            if errs:  # e.g. a 5000-digit integer, already named with its key path
                _raise(p, errs)
            raise
    except _Refused as e:
        key = _path(e.path) if e.path else f"line {e.mark.line + 1}"
        raise ConfigError(p, key, f"{e.msg} (line {e.mark.line + 1})")
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else ""
        what = str(getattr(e, "problem", None) or getattr(e, "reason", None) or e).splitlines()[0]
        raise ConfigError(p, where, f"not valid YAML: {_one_line(what)}")
    except (ValueError, OverflowError, RecursionError, TypeError) as e:
        what = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(p, "", f"not a usable YAML value: {_one_line(what)}")
    finally:
        if loader is not None:
            loader.dispose()
    return raw, errs


# --- loading ---------------------------------------------------------------------------------
def _short(e) -> str:
    inst = e.instance
    if e.validator == "additionalProperties":
        return _one_line(e.message.replace("Additional properties are not allowed", "unknown key"))
    if e.validator == "type":
        want = e.validator_value if isinstance(e.validator_value, list) else [e.validator_value]
        if set(want) >= {"string", "array"}:
            return (f"{_one_line(repr(inst))} is not a verdict, a list of verdicts"
                    + (", or a mapping from a lab kernel version constraint to those" if "object" in want else ""))
        if isinstance(inst, float) and not math.isfinite(inst):
            return f"{inst!r} is not a finite number"
        if isinstance(inst, float) and "integer" in want:
            return f"{inst!r} is not an integer (write it without a decimal point)"
    if e.validator == "pattern":
        last = e.absolute_path[-1] if e.absolute_path else None
        if last == "name":
            return f"{_one_line(repr(inst))} does not match the name rule: 1-64 letters, digits, '.', '_' or '-' (no spaces, no newline)"
        if last == "size":
            return f"{_one_line(repr(inst))} is not a size: an integer or digits with K, M or G (64K, 1M)"
    if e.validator == "maxLength" and isinstance(inst, str):
        return f"{len(inst)} characters is too long (at most {e.validator_value})"
    return _one_line(e.message)


def _verdict_lists(spec) -> list[tuple[list, list]]:
    """[(extra key path, [verdicts]), ...] for an expectation of any form (well-formed parts only)."""
    if isinstance(spec, str):
        return [([], [spec])]
    if isinstance(spec, list):
        return [([], [v for v in spec if isinstance(v, str)])]
    if isinstance(spec, dict):
        out = []
        for k, v in spec.items():
            out += [([k] + sub, vs) for sub, vs in _verdict_lists(v) if not isinstance(v, dict)]
        return out
    return []


def _as_list(v) -> list[str]:
    return [v] if isinstance(v, str) else list(v)


def _constraints(spec, path: list, errs: list) -> dict:
    """{key text: Constraint} of a version-keyed expectation; parse and overlap errors to errs."""
    if not isinstance(spec, dict):
        return {}
    parsed = {}
    for k in spec:
        try:
            parsed[k] = versions.parse_constraint(k)
        except versions.VersionError as e:
            errs.append((path + [k], f"not a lab kernel version constraint: {_one_line(e)}"))
    keys = list(parsed)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            where = versions.overlap(parsed[a], parsed[b])
            if where:
                errs.append((path, f"entries {a!r} and {b!r} overlap (both match {where}): "
                             f"two entries may not match the same kernel"))
    return parsed


def _check_expect(spec, path: list, errs: list, *, what: str, mode: str | None = None,
                  kind: str | None = None, guest_write: bool = False, inject=None) -> None:
    for sub, vs in _verdict_lists(spec):
        vs = [v for v in vs if v in VERDICTS]
        p = path + sub
        for a, b in _EVERY_OUTCOME:
            if a in vs and b in vs:
                errs.append((p, f"{'/'.join(vs)} lists both {a} and {b}: an expectation that "
                             f"accepts every outcome can never fail (key it by lab kernel version)"))
        if what == "baseline":
            for v in ("UNSUPPORTED", "NOT_ZAPPED", "LOST_WRITE"):
                if v in vs:
                    errs.append((p, f"{v} cannot be the outcome of the baseline read"))
            continue
        if "UNSUPPORTED" in vs and kind == "vmlab":
            errs.append((p, f"UNSUPPORTED contradicts exporter.kind vmlab, which has every move "
                         f"mode ({mode})"))
        if "NOT_ZAPPED" in vs and mode != "ZAP_ONLY":
            errs.append((p, f"NOT_ZAPPED is a ZAP_ONLY verdict, not a {mode} one"))
        if "LOST_WRITE" in vs and not guest_write:
            errs.append((p, "LOST_WRITE needs guest_write: true (no write, nothing to lose)"))
        if inject in ("kill-vmm", "refused-map") and vs != ["VMM_FAULT"]:
            errs.append((p, f"{'/'.join(vs)} contradicts inject: {inject}, which always ends "
                         f"in VMM_FAULT"))
        if inject == "skip-zap" and mode != "ZAP_ONLY":
            errs.append((p[:-1] + ["inject"], f"skip-zap is the ZAP_ONLY negative control, not a {mode} one"))
        elif inject == "skip-zap" and vs != ["NOT_ZAPPED"]:
            errs.append((p, f"{'/'.join(vs)} contradicts inject: skip-zap (the zap request is never "
                         f"sent, so the oracle must say NOT_ZAPPED)"))


def _resolve_at(spec, parsed: dict, point) -> tuple[str | None, list | None]:
    """(constraint text or None, verdicts) of an expectation at a sample point, or (None, None)."""
    if not isinstance(spec, dict):
        return None, _as_list(spec) if isinstance(spec, (str, list)) else None
    for k, c in parsed.items():
        if point is not None and c.matches_key(point) and isinstance(spec.get(k), (str, list)):
            return k, _as_list(spec[k])
    return None, None


def _expectations(raw: dict) -> list[tuple]:
    """(who: "baseline" or the move's index, expect, inject, {key: Constraint}, whether
    every key parsed) of the baseline and each move: the version-keyed checks' common
    walk (parse errors are said where each expectation is checked)."""
    moves = raw.get("moves") if isinstance(raw.get("moves"), list) else []
    base = raw.get("baseline") if isinstance(raw.get("baseline"), dict) else {}
    specs = [("baseline", base.get("expect", DEFAULT_BASELINE_EXPECT), None)]
    specs += [(i, m.get("expect"), m.get("inject")) for i, m in enumerate(moves) if isinstance(m, dict)]
    out = []
    for who, spec, inject in specs:
        sink: list = []
        parsed = _constraints(spec, [], sink)
        out.append((who, spec, inject, parsed, not sink))
    return out


def _check_vmm_chain(raw: dict, errs: list) -> None:
    """A VMM that must be dead (baseline or a move expecting only VMM_FAULT, or inject:
    kill-vmm) makes every later move VMM_FAULT: anything else expected there is a contradiction.
    Checked for every region of the kernel-version line the config's keys cut out."""
    exps = _expectations(raw)
    specs = [(who, spec, inject) for who, spec, inject, _, _ in exps]
    parsed = [cons for _, _, _, cons, _ in exps]
    allc = [c for d in parsed for c in d.values()]
    # real boundary versions first: they make the better example in a message
    points = sorted(versions.sample_points(allc), key=lambda k: k[5] != 0) if allc else [None]
    reported = set()
    for pt in points:
        dead = None
        for (who, spec, inject), cons in zip(specs, parsed):
            key, vs = _resolve_at(spec, cons, pt)
            if who != "baseline" and dead and vs is not None and vs != ["VMM_FAULT"] \
                    and who not in reported:
                reported.add(who)
                at = f" on {versions.describe_point(pt)}" if allc else ""
                errs.append((["moves", who, "expect"] + ([key] if key else []),
                             f"expects {'/'.join(vs)}{at}, but {dead}: a dead VMM makes every "
                             f"later move VMM_FAULT"))
            if inject == "kill-vmm":
                dead = dead or f"moves[{who}] kills it (inject: kill-vmm)"
            elif inject == "refused-map":
                pass   # a map QEMU refused: a VMM_FAULT verdict, and the VMM lives on
            elif vs == ["VMM_FAULT"]:
                dead = dead or ("the baseline read expects VMM_FAULT" if who == "baseline"
                                else f"moves[{who}] expects VMM_FAULT")


def _check_version_gaps(raw: dict, errs: list) -> None:
    """A version-keyed expectation has an entry for every lab kernel the experiment applies
    to (its needs_lab_kernel, else any): one that matches none was an error only once the
    lab had booted (exit 2 after the fact; a MISMATCH cell in a matrix)."""
    need = raw.get("needs_lab_kernel")
    need_c = None
    if isinstance(need, dict) and isinstance(need.get("version"), str):
        try:
            need_c = versions.parse_constraint(need["version"])
        except versions.VersionError:
            return     # said where needs_lab_kernel is checked
    for who, spec, _, parsed, clean in _expectations(raw):
        if not isinstance(spec, dict) or not clean or not parsed:
            continue
        path = ["baseline", "expect"] if who == "baseline" else ["moves", who, "expect"]
        cons = list(parsed.values()) + ([need_c] if need_c else [])
        for pt in sorted(versions.sample_points(cons), key=lambda k: k[5] != 0):
            if need_c is not None and not need_c.matches_key(pt):
                continue
            if not any(c.matches_key(pt) for c in parsed.values()):
                errs.append((path, f"no entry matches {versions.describe_point(pt)} (keys: "
                             f"{', '.join(spec)}): add one for them, or say which lab kernels the "
                             f"experiment is for (needs_lab_kernel)"))
                break


def _capacity_errors(size: int, kind, lab_mb: int, lab_from: str, guest_mb: int, guest_from: str) -> list[str]:
    over = []
    if kind == "vmlab" and size > EXPORTER_MAX_BYTES:
        over.append(f"the vmlab exporter's default max_buffer_mb ({_mib(EXPORTER_MAX_BYTES)})")
    if size > guest_mb << 20:
        over.append(f"the guest's RAM ({guest_mb} MiB, {guest_from})")
    if size > (lab_mb << 20) // 2:
        over.append(f"half the lab's RAM ({lab_mb // 2} MiB of {lab_mb} MiB, {lab_from})")
    return [f"{_mib(size)} is more than " + ", and more than ".join(over)] if over else []


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _semantic_errors(raw: dict) -> list:
    errs: list = []
    exporter = raw.get("exporter") if isinstance(raw.get("exporter"), dict) else {}
    kind = exporter.get("kind")
    size_v = exporter.get("size")
    try:
        size = parse_size(size_v) if isinstance(size_v, (int, str)) and not isinstance(size_v, bool) else None
    except ValueError:
        size = None
    if size is not None:
        if size < 4096 or size % 4096 or size & (size - 1):
            errs.append((["exporter", "size"], f"{size_v} must be a power of two and a multiple of "
                         f"4096 (the ivshmem BAR is the buffer)"))
        else:
            lab_mb = _get(raw, "lab", "memory_mb")
            guest_mb = _get(raw, "guest", "memory_mb")
            lab_ok = isinstance(lab_mb, int) and not isinstance(lab_mb, bool)
            guest_ok = isinstance(guest_mb, int) and not isinstance(guest_mb, bool)
            for m in _capacity_errors(size, kind,
                                      lab_mb if lab_ok else DEFAULTS["lab_memory_mb"],
                                      "lab.memory_mb" if lab_ok else "default",
                                      guest_mb if guest_ok else DEFAULTS["guest_memory_mb"],
                                      "guest.memory_mb" if guest_ok else "default"):
                errs.append((["exporter", "size"], m))
    backing = exporter.get("backing")
    if backing is not None and kind != "udmabuf":
        errs.append((["exporter", "backing"], f"only exporter.kind udmabuf takes backing, not {kind}"))
    elif backing in ("hugetlb", "thp") and isinstance(size, int) and size % (2 << 20):
        errs.append((["exporter", "size"], f"a {backing} memfd comes in 2 MiB pages: "
                     f"{_mib(size)} is not a multiple of 2 MiB"))
    alloc = exporter.get("alloc", "ORDER0")
    if alloc == "HUGE_PMD" and isinstance(size, int) and size < (2 << 20):
        errs.append((["exporter", "size"], f"alloc HUGE_PMD maps 2 MiB blocks: {_mib(size)} is "
                     f"less than 2 MiB"))
    if kind in ("udmabuf", "dmaheap", "vgem"):
        for k in ("caching", "alloc", "fault"):
            if k in exporter:
                errs.append((["exporter", k], f"only exporter.kind vmlab takes {k}; {kind} "
                             f"chooses its own pages and caching"))
    if raw.get("gpu_roundtrip") is True:
        gpu = _get(raw, "guest", "gpu") or DEFAULTS["guest_gpu"]
        if gpu == "none":
            errs.append((["gpu_roundtrip"], "needs guest.gpu blob or host-blob (the guest has "
                         "gpu: none" + ("" if _get(raw, "guest", "gpu") else ", the default") + ")"))
    if "moves" not in raw and "baseline" not in raw:
        errs.append(([], "an experiment without moves checks only the baseline read: say what "
                     "it expects (baseline: {expect: ...})"))
    need = raw.get("needs_lab_kernel")
    if isinstance(need, dict) and isinstance(need.get("version"), str):
        try:
            versions.parse_constraint(need["version"])
        except versions.VersionError as e:
            errs.append((["needs_lab_kernel", "version"],
                         f"not a lab kernel version constraint: {_one_line(e)}"))
    base = raw.get("baseline")
    if isinstance(base, dict) and "expect" in base:
        _constraints(base["expect"], ["baseline", "expect"], errs)
        _check_expect(base["expect"], ["baseline", "expect"], errs, what="baseline")
    moves = raw.get("moves") if isinstance(raw.get("moves"), list) else []
    for i, m in enumerate(moves):
        if not isinstance(m, dict):
            continue
        mode = m.get("mode")
        if kind in ("udmabuf", "dmaheap", "vgem") and mode in ("MIGRATE_NO_ZAP", "ZAP_ONLY"):
            errs.append((["moves", i, "mode"], f"{mode} needs exporter.kind vmlab"))
        if m.get("caching", "KEEP") != "KEEP" and (kind != "vmlab" or mode in ("ZAP_ONLY", "NONE")):
            errs.append((["moves", i, "caching"], "a caching change needs a vmlab MIGRATE move"))
        if "store" in m and m.get("guest_write") is not True:
            errs.append((["moves", i, "store"], "how the guest stores needs guest_write: true"))
        pages = m.get("pages")
        if isinstance(pages, dict):
            errs += [(["moves", i, "pages"], e) for e in _page_range_errors(
                pages, mode, kind, alloc, m.get("caching", "KEEP"), size)]
            if m.get("concurrent") is True:
                # the watcher reads the first and last page: it may never see the range move
                errs.append((["moves", i, "concurrent"], "a page-range move cannot be watched "
                             "(the guest watcher reads the first and the last page)"))
        if "expect" in m:
            p = ["moves", i, "expect"]
            _constraints(m["expect"], p, errs)
            _check_expect(m["expect"], p, errs, what="move", mode=mode, kind=kind,
                          guest_write=m.get("guest_write") is True, inject=m.get("inject"))
    for i, m in enumerate(moves):
        if isinstance(m, dict) and m.get("inject") == "refused-map" and raw.get("vmm_on_move") != "remap":
            errs.append((["moves", i, "inject"], "refused-map is the VMM's map after a move: it "
                         "needs vmm_on_move: remap"))
    if raw.get("vmm_on_move") == "remap" and raw.get("transport", "ivshmem") != "virtio-shm":
        errs.append((["vmm_on_move"], "remap is the VMM unmapping and mapping a VIRTIO shared "
                     "memory region: it needs transport: virtio-shm"))
    _check_hw_oracle(raw, moves, errs)
    _check_vmm_chain(raw, errs)
    _check_version_gaps(raw, errs)
    lab = raw.get("lab") if isinstance(raw.get("lab"), dict) else {}
    if lab.get("kind") == "ssh":
        errs += [(["lab", k], "lab.kind ssh needs it") for k in ("host", "key") if k not in lab]
    else:
        errs += [(["lab", k], "only lab.kind ssh takes it") for k in ("host", "key", "known_hosts")
                 if k in lab]
    q, k = _get(raw, "lab", "qemu"), _get(raw, "lab", "kernel") or DEFAULTS["kernel"]
    why = qemu_suite_problem(q, k) if isinstance(q, str) and isinstance(k, str) else None
    if why:
        errs.append((["lab", "qemu"], why))
    return errs


def _page_range_errors(pages: dict, mode, kind, alloc, caching, size) -> list[str]:
    """What stops a page-range move (the exporter refuses the same with EINVAL)."""
    errs = []
    if mode not in ("MIGRATE", "MIGRATE_NO_ZAP"):
        errs.append(f"a page range moves with MIGRATE or MIGRATE_NO_ZAP, not {mode}")
    if kind != "vmlab" or alloc not in ("ORDER0", "HUGE_PMD"):
        errs.append("a page range needs exporter.kind vmlab with alloc ORDER0 or HUGE_PMD "
                    "(pages that can be freed one by one)")
    if caching != "KEEP":
        errs.append("a page range keeps the buffer's caching (caching: KEEP)")
    first, count = pages.get("first"), pages.get("count")
    if isinstance(size, int) and isinstance(first, int) and isinstance(count, int) and \
            first + count > size // 4096:
        errs.append(f"pages {first}..{first + count - 1} are not all inside the "
                    f"{size // 4096}-page buffer")
    return errs


#: what a test box brings itself: its running kernel and its QEMU
_BOX_OWN = ("kernel", "lab_base", "lab_append", "qemu", "accel", "lab_memory_mb")


def _resolve_box(out: dict, src: dict, exp) -> dict | None:
    """``lab: {kind: ssh, host, key, known_hosts}``: the box (JSON-able), checked before
    anything starts; ``{"local": True}`` for kind local (this machine); None for a nested lab. A box runs its own kernel and QEMU: a setting
    that would choose them is a contradiction, said in one line."""
    if out["lab_kind"] == "nested":
        return None
    from .box_lab import BoxSpec
    chosen = [n for n in _BOX_OWN if src[n] != "default"]
    if chosen:
        _dest, cfg_path, flag = _MERGE[chosen[0]]
        where = ("<command line>", flag) if src[chosen[0]] == "cli" else (exp.path, ".".join(cfg_path))
        raise ConfigError(*where, f"lab.kind {out['lab_kind']}: the box runs its own kernel and "
                                  f"QEMU, booted as it is; drop this setting")
    if out["lab_kind"] == "local":
        return {"local": True}
    b = BoxSpec.parse(exp.raw.get("lab") or {}, exp.path)
    return {"host": b.host, "port": b.port, "user": b.user, "key": str(b.key),
            "known_hosts": str(b.known_hosts)}


#: what a box file (``vmlab matrix --lab FILE``) may say: where the box is, nothing it runs
_BOX_FILE_KEYS = ("kind", "host", "key", "known_hosts")


def load_box_file(path: str) -> dict:
    """A file whose ``lab:`` mapping names a test box (kind ssh: host, key, known_hosts;
    or kind local), for running a whole catalog there. Checked before anything starts:
    ConfigError (exit 2) naming this file and the key. Returns the lab mapping with the
    paths made absolute (relative ones are relative to this file), ready to replace each
    entry's ``lab``."""
    raw, errs = _read_yaml(path)
    if errs:
        _raise(path, errs)
    if not isinstance(raw, dict) or "lab" not in raw:
        raise ConfigError(path, "lab", "a box file is a mapping with one key, lab (kind ssh or local)")
    extra = sorted(str(k) for k in raw if k != "lab")
    if extra:
        raise ConfigError(path, extra[0], "a box file says only where the box is (lab)")
    lab = raw["lab"]
    if not isinstance(lab, dict):
        raise ConfigError(path, "lab", "must be a mapping (kind, host, key, known_hosts)")
    for k in lab:
        if k not in _BOX_FILE_KEYS:
            raise ConfigError(path, f"lab.{k}", "a box runs its own kernel and QEMU, booted as it "
                                                f"is; a box file says only {', '.join(_BOX_FILE_KEYS)}")
    # the experiment schema's lab section checks the values (an experiment's other keys
    # are not a box file's)
    errs = [(list(e.absolute_path), _short(e)) for e in
            _validator().iter_errors({"version": 1, "name": "box", "lab": lab})
            if len(e.absolute_path) > 1]
    if errs:
        _raise(path, errs)
    if lab.get("kind") not in ("ssh", "local"):
        raise ConfigError(path, "lab.kind", f"ssh or local, not {lab.get('kind')!r} "
                                            f"(the nested lab is the matrix's default)")
    if lab["kind"] == "local":
        if len(lab) > 1:
            raise ConfigError(path, f"lab.{next(k for k in lab if k != 'kind')}",
                              "kind local is this machine: it takes no host, key or known_hosts")
        return {"kind": "local"}
    from .box_lab import BoxSpec
    b = BoxSpec.parse(lab, path)
    return {"kind": "ssh", "host": f"{b.user}@[{b.host}]:{b.port}" if ":" in b.host
            else f"{b.user}@{b.host}:{b.port}", "key": str(b.key), "known_hosts": str(b.known_hosts)}


def box_label(box: dict) -> str:
    """How a matrix names the box's one kernel column (and its results directory):
    ``local``, or ``box-HOST-PORT`` (no ':' in a directory name that scp or PATH reads)."""
    if box["kind"] == "local":
        return "local"
    host, _, port = box["host"].split("@", 1)[-1].rpartition(":")
    return f"box-{host.strip('[]').replace(':', '.')}-{port}"


def _resolve_kernels(out: dict, src: dict, exp) -> str:
    """Check the lab and guest kernels (a suite, deb:PATH, tree:DIR) and the lab's QEMU
    (default, suite:NAME, deb:PATH, build:DIR) before anything starts, make their paths
    absolute (a config's relative to the config file) and return the lab's base suite. A wrong path is the user's (exit 2); a tree whose .config lacks
    what the lab needs is the kernel's (exit 125)."""
    lab_suite = out["kernel"]
    for name, kind in (("kernel", "lab"), ("guest_kernel", "guest")):
        spec = out[name]
        _dest, cfg_path, flag = _MERGE[name]
        if src[name] == "config":
            where = (exp.path, ".".join(cfg_path))
            form, _, rest = spec.partition(":")
            if form in ("deb", "tree") and rest and not os.path.isabs(rest):
                spec = f"{form}:{os.path.join(os.path.dirname(os.path.abspath(exp.path)), rest)}"
        else:
            where = ("<command line>", flag)
        base = out["lab_base"] if kind == "lab" else None
        if base is not None and src["lab_base"] != "cli" and kind == "lab":
            where_base = (exp.path, "lab.base")
        else:
            where_base = ("<command line>", "--lab-base")
        if base is not None and not spec.startswith(("deb:", "tree:")):
            raise ConfigError(*where_base, f"a base suite applies to deb: and tree: kernels; "
                                           f"{spec} brings its own")
        ks = kernel_source.parse(spec, where, base=base, kind=kind)
        out[name] = ks.spec
        if kind == "lab":
            lab_suite = ks.suite
    spec = out["qemu"]
    if src["qemu"] == "config":
        where = (exp.path, "lab.qemu")
        form, _, rest = spec.partition(":")
        if form in ("deb", "build") and rest and not os.path.isabs(rest):
            spec = f"{form}:{os.path.join(os.path.dirname(os.path.abspath(exp.path)), rest)}"
    else:
        where = ("<command line>", "--qemu")
    out["qemu"] = kernel_source.parse_qemu(spec, where).spec
    return lab_suite


def qemu_suite_problem(qemu: str, kernel: str) -> str | None:
    """Why ``qemu`` (default | suite:NAME) cannot go with lab kernel suite ``kernel``, or
    None. The lab's QEMU may come from the kernel's own suite (the default) or, for a
    kernel of a Debian release's base suite, from that release's backports: the newer
    QEMU on the same libraries. The other way round (a backports kernel, an older QEMU)
    would hold back what the newer kernel depends on."""
    if qemu == "default" or qemu.startswith(("deb:", "build:")) or kernel not in _RELEASE:
        return None   # an unknown kernel suite is reported on its own; the user's QEMU
                      # goes into any lab (what it lacks there, apt or the loader says)
    suite = qemu_suite_of(qemu)
    if suite not in _RELEASE:
        return f"{qemu!r}: default or suite:NAME (NAME one of {', '.join(_RELEASE)})"
    base = _RELEASE[kernel]
    if suite == kernel:
        return None
    if _RELEASE[suite] != base or kernel != base:
        return (f"{qemu} with a {kernel} lab kernel: the QEMU may come only from the backports "
                f"of a base-suite kernel's release (e.g. --kernel trixie --qemu suite:trixie-backports)")
    return None


def _check_hw_oracle(raw: dict, moves: list, errs: list) -> None:
    """What needs the hardware oracle, and what the hardware oracle needs."""
    oracles = raw.get("oracle") if isinstance(raw.get("oracle"), list) else []
    hw = "hw" in oracles
    if oracles and "stamps" not in oracles:
        errs.append((["oracle"], "the stamps are always an oracle (the hardware one adds to them): "
                     "write [stamps, hw]"))
    for i, m in enumerate(moves):
        if not isinstance(m, dict):
            continue
        if m.get("mode") == "MIGRATE_SILENT" and not hw:
            errs.append((["moves", i, "mode"], "MIGRATE_SILENT leaves a stale mapping whose pages "
                         "look current: only the hardware oracle can see it (oracle: [stamps, hw])"))
        if m.get("mode") == "MIGRATE_SILENT" and "STALE" in _spec_verdicts(m.get("expect")):
            errs.append((["moves", i, "expect"], "MIGRATE_SILENT restamps the old pages as current: "
                         "the stamps cannot say STALE (the hardware oracle says HW_STALE)"))
        if not hw and "HW_STALE" in _spec_verdicts(m.get("expect")):
            errs.append((["moves", i, "expect"], "HW_STALE is the hardware oracle's verdict: "
                         "add oracle: [stamps, hw]"))
    base = raw.get("baseline") if isinstance(raw.get("baseline"), dict) else {}
    if "HW_STALE" in _spec_verdicts(base.get("expect")):
        errs.append((["baseline", "expect"], "HW_STALE cannot be the outcome of the baseline read"))
    if not hw:
        return
    kind = _get(raw, "exporter", "kind")
    if kind not in (None, "vmlab"):
        errs.append((["oracle"], f"hw needs exporter.kind vmlab (it reports its pages' pfns); "
                     f"{kind} does not"))
    if _get(raw, "lab", "accel") == "kvm":
        errs.append((["lab", "accel"], "oracle hw runs in the lab's QEMU as a TCG plugin: "
                     "lab.accel kvm contradicts it (leave it auto or say tcg)"))
    mb = _get(raw, "lab", "memory_mb")
    if isinstance(mb, int) and mb > MAX_HW_LAB_MEMORY_MB:
        errs.append((["lab", "memory_mb"], f"{mb} with oracle hw: at most {MAX_HW_LAB_MEMORY_MB} "
                     f"(QEMU 7.2's plugin API reports RAM above the PCI hole by its offset, "
                     f"not its address)"))


def _spec_verdicts(spec) -> set:
    """Every verdict an expectation names, in any of its version-keyed entries."""
    if isinstance(spec, dict):
        return set().union(*(_spec_verdicts(v) for v in spec.values())) if spec else set()
    if isinstance(spec, str):
        return {spec}
    if isinstance(spec, list):
        return {v for v in spec if isinstance(v, str)}
    return set()


def _under(path: list, prefixes: list) -> bool:
    return any(path[:len(q)] == q for q in prefixes)


def problems(raw) -> list[tuple[list, str]]:
    """Every problem of a parsed config as (key path, message), schema errors first."""
    if not isinstance(raw, dict):
        return [([], "must be a mapping with version, name, exporter and moves or baseline")]
    errs = [(list(e.absolute_path), _short(e)) for e in
            sorted(_validator().iter_errors(raw), key=lambda e: [str(x) for x in e.absolute_path])]
    bad = [q for q, _ in errs]
    return errs + [(q, m) for q, m in _semantic_errors(raw) if not _under(q, bad)]


def _raise(p: str, errs: list) -> None:
    seen, parts = set(), []
    for q, m in errs:
        part = (_path(q), _one_line(m))
        if part not in seen:
            seen.add(part)
            parts.append(part)
    first_key, first_msg = parts[0]
    raise ConfigError(p, first_key, "; ".join([first_msg] + [f"{k}: {m}" for k, m in parts[1:]]))


def load(path: str | Path) -> "Experiment":
    """Read and check an experiment config; ConfigError (exit 2) naming every problem."""
    p = str(path)
    raw, yaml_errs = _read_yaml(p)
    errs = yaml_errs + problems(raw)
    if errs:
        _raise(p, errs)
    return Experiment(p, raw)


# --- the experiment ---------------------------------------------------------------------
@dataclass
class Experiment:
    path: str
    raw: dict

    @property
    def name(self) -> str:
        return self.raw["name"]

    def section(self, key: str) -> dict:
        return self.raw.get(key) or {}

    @property
    def kind(self) -> str:
        return self.raw["exporter"]["kind"]

    @property
    def size(self) -> int:
        return parse_size(self.raw["exporter"]["size"])

    @property
    def has_moves(self) -> bool:
        return bool(self.raw.get("moves"))

    @property
    def version_keyed(self) -> bool:
        """True when some expectation depends on the lab kernel version."""
        specs = [m["expect"] for m in self.raw.get("moves") or []]
        specs.append(self.section("baseline").get("expect"))
        return any(isinstance(s, dict) for s in specs)

    def _pick(self, spec, key: str, release: str | None) -> tuple[list[str], str | None]:
        if not isinstance(spec, dict):
            return _as_list(spec), None
        if release is None:
            raise ValueError(f"{self.path}: {key} is keyed by lab kernel version: "
                             f"use expectations_for(release) / baseline_expect_for(release)")
        try:
            hit = versions.pick(spec, release)
        except versions.VersionError as e:
            raise ConfigError(self.path, key, f"cannot match lab kernel {release!r}: {e}")
        if hit is None:
            raise ConfigError(self.path, key, f"no entry matches lab kernel {release} "
                              f"(keys: {', '.join(spec)}): add one for it")
        return _as_list(hit[1]), hit[0]

    def not_applicable_on(self, release: str) -> str | None:
        """Why this experiment does not apply to lab kernel ``release`` (needs_lab_kernel),
        or None when it does."""
        need = self.raw.get("needs_lab_kernel")
        if need and not versions.matches(need["version"], release):
            return f"needs a lab kernel {need['version']}, this is {release}: {need['why']}"
        return None

    def baseline_expect_for(self, release: str | None) -> list[str]:
        """Verdicts the baseline read may give on a lab kernel with this ``uname -r``
        (default REFAULTED). ConfigError (exit 2) when a version key matches nothing."""
        spec = self.section("baseline").get("expect", DEFAULT_BASELINE_EXPECT)
        return self._pick(spec, "baseline.expect", release)[0]

    def expectations_for(self, release: str | None) -> list[dict]:
        """expanded_moves() with every ``expect`` resolved for this lab kernel release."""
        return self.expanded_moves(release)

    def expanded_moves(self, release: str | None = None) -> list[dict]:
        """One entry per move actually performed (``count`` expanded), numbered from 1:
        {n, spec (index in moves), mode, caching, guest_write, concurrent, interval_ms,
        inject, expect: [verdicts], expect_key: the version constraint used or None}.
        Version-keyed expectations need ``release`` (the lab kernel's uname -r)."""
        out = []
        for spec_i, m in enumerate(self.raw.get("moves") or []):
            expect, key = self._pick(m["expect"], f"moves[{spec_i}].expect", release)
            for _ in range(m.get("count", 1)):
                out.append({"n": len(out) + 1, "spec": spec_i, "mode": m["mode"],
                            "caching": m.get("caching", "KEEP"),
                            "guest_write": m.get("guest_write", False),
                            "concurrent": m.get("concurrent", False),
                            "interval_ms": m.get("interval_ms", 0), "inject": m.get("inject"),
                            "store": m.get("store", "plain"),
                            "pages": dict(m["pages"]) if "pages" in m else None,
                            "expect": list(expect), "expect_key": key})
        return out


# --- merging the command line, the config and the defaults ------------------------------
def kernel_image_folded(path: str) -> str:
    """Why --kernel-image is refused: a bare bzImage booted with the image's own modules
    (another build's: vermagic and symbol versions differ) gave verdicts about a kernel
    nobody built. A tree brings its modules, its .config (checked) and its headers (the
    exporter is built against them)."""
    p = Path(os.path.abspath(path))
    tree = p.parents[3] if len(p.parents) > 3 and p.parts[-4:] == ("arch", "x86", "boot", "bzImage") else None
    use = f"--kernel tree:{tree}" if tree else "--kernel tree:DIR (the build tree it came from)"
    return f"is folded into tree: (a bzImage boots with its own tree's modules): use {use}"


def resolve(exp: Experiment | None, args=None) -> dict:
    """The merged settings of one command: command line (``args``, an argparse namespace;
    None or a missing attribute means "not given") > config (``exp``, may be None) > DEFAULTS.

    Returns a JSON-able dict with every key of DEFAULTS (accel, kernel, qemu,
    guest_kernel, lab_memory_mb, lab_boot_timeout, guest_memory_mb, guest_boot_timeout,
    guest_gpu, guest_mapping), plus the command-line-only ``lab_qemu_args`` (list) and
    ``no_build`` (bool), ``oracle`` (list), and ``sources``: setting -> "cli" | "config" |
    "default" | "oracle hw" (accel forced to tcg by the hardware oracle).
    Re-checks the exporter size against the merged lab and guest memory (ConfigError, exit 2:
    call it before anything boots)."""
    out, src = {}, {}
    for name, (dest, cfg_path, _flag) in _MERGE.items():
        cli = getattr(args, dest, None) if (args is not None and dest) else None
        cfg = _get(exp.raw, *cfg_path) if (exp is not None and cfg_path) else None
        if cli is not None:
            out[name], src[name] = cli, "cli"
        elif cfg is not None:
            out[name], src[name] = cfg, "config"
        else:
            out[name], src[name] = DEFAULTS[name], "default"
    for k in ("lab_boot_timeout", "guest_boot_timeout"):
        out[k] = float(out[k])
    out["lab_qemu_args"] = list(getattr(args, "lab_qemu_arg", None) or ()) if args is not None else []
    out["no_build"] = bool(getattr(args, "no_build", False)) if args is not None else False
    out["sources"] = src
    if getattr(args, "kernel_image", None) is not None:
        raise ConfigError("<command line>", "--kernel-image", kernel_image_folded(args.kernel_image))
    out["box"] = _resolve_box(out, src, exp)
    lab_suite = _resolve_kernels(out, src, exp)
    why = qemu_suite_problem(out["qemu"], lab_suite)
    if why:
        # name where the QEMU came from, and where the kernel did when that is elsewhere
        where = ("<command line>", "--qemu") if src["qemu"] == "cli" else (exp.path, "lab.qemu")
        if src["kernel"] != src["qemu"] and src["kernel"] != "default":
            why += f" (the kernel is from {'--kernel' if src['kernel'] == 'cli' else 'lab.kernel'})"
        raise ConfigError(*where, why)
    out["oracle"] = list(exp.raw.get("oracle") or ["stamps"]) if exp is not None else ["stamps"]
    if "hw" in out["oracle"] and out["box"] is not None:
        raise ConfigError(exp.path, "oracle", f"hw is a TCG plugin in the nested lab's QEMU: "
                                              f"a box (lab.kind {out['lab_kind']}) runs none")
    if "hw" in out["oracle"]:
        # a TCG plugin in the lab's QEMU: the lab must be TCG whatever else would pick
        if out["accel"] == "kvm":
            where = {"cli": "--accel", "config": "lab.accel"}.get(src["accel"], "accel")
            raise ConfigError(exp.path if src["accel"] == "config" else "<command line>", where,
                              "kvm contradicts oracle hw (a TCG plugin in the lab's QEMU)")
        if out["accel"] != "tcg":
            out["accel"], src["accel"] = "tcg", "oracle hw"
        if out["lab_memory_mb"] > MAX_HW_LAB_MEMORY_MB:
            raise ConfigError("<command line>" if src["lab_memory_mb"] == "cli" else exp.path,
                              "--lab-memory" if src["lab_memory_mb"] == "cli" else "lab.memory_mb",
                              f"{out['lab_memory_mb']} with oracle hw: at most {MAX_HW_LAB_MEMORY_MB} "
                              f"(QEMU 7.2's plugin API reports RAM above the PCI hole by its offset)")
    if exp is not None:
        def said(name):
            _dest, cfg_path, flag = _MERGE[name]
            return {"cli": flag, "config": ".".join(cfg_path or ()), "default": "default"}[src[name]]
        msgs = _capacity_errors(exp.size, exp.kind, out["lab_memory_mb"], said("lab_memory_mb"),
                                out["guest_memory_mb"], said("guest_memory_mb"))
        if msgs:
            raise ConfigError(exp.path, "exporter.size", msgs[0])
    return out
