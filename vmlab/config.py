"""Experiment configs: YAML, validated against schemas/experiment.schema.json, every error
reported at once on one line that names the file and the key path (exit 2, nothing started)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import jsonschema
import yaml

from .errors import ConfigError

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def schema() -> dict:
    return json.loads(resources.files("vmlab").joinpath("schemas/experiment.schema.json").read_text())


def _path(p) -> str:
    out = ""
    for part in p:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top level>"


def parse_size(v) -> int:
    s = str(v).strip().upper()
    unit = s[-1] if s[-1:] in _UNITS and not s[-1].isdigit() else ""
    return int(s[: len(s) - len(unit)]) * _UNITS[unit]


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
    def size(self) -> int:
        return parse_size(self.raw["exporter"]["size"])

    def expanded_moves(self) -> list[dict]:
        """One entry per move actually performed (``count`` expanded), numbered from 1."""
        out = []
        for spec_i, m in enumerate(self.raw["moves"]):
            for _ in range(m.get("count", 1)):
                exp = m["expect"]
                out.append({"n": len(out) + 1, "spec": spec_i, "mode": m["mode"],
                            "caching": m.get("caching", "KEEP"),
                            "guest_write": m.get("guest_write", False),
                            "concurrent": m.get("concurrent", False),
                            "interval_ms": m.get("interval_ms", 0), "inject": m.get("inject"),
                            "expect": exp if isinstance(exp, list) else [exp]})
        return out


def load(path: str | Path) -> Experiment:
    p = str(path)
    try:
        text = Path(p).read_text()
    except OSError as e:
        raise ConfigError(p, "", f"cannot read: {e.strerror}")
    except UnicodeDecodeError as e:
        raise ConfigError(p, "", f"not UTF-8 text (byte {e.start})")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else ""
        what = str(getattr(e, "problem", None) or getattr(e, "reason", None) or e).splitlines()[0]
        raise ConfigError(p, where, f"not valid YAML: {what}")
    if not isinstance(raw, dict):
        raise ConfigError(p, "", "must be a mapping with version, name, exporter, moves")
    errors = sorted(jsonschema.Draft202012Validator(schema()).iter_errors(raw),
                    key=lambda e: list(map(str, e.absolute_path)))
    msgs = [f"{_path(e.absolute_path)}: {_short(e)}" for e in errors]
    if not errors:
        size = parse_size(raw["exporter"]["size"])
        if size < 4096 or size % 4096 or size & (size - 1):
            msgs.append(f"exporter.size: {raw['exporter']['size']} must be a power of two "
                        f"and a multiple of 4096 (the ivshmem BAR is the buffer)")
        kind = raw["exporter"]["kind"]
        for i, m in enumerate(raw["moves"]):
            if kind != "vmlab" and m["mode"] != "MIGRATE":
                msgs.append(f"moves[{i}].mode: {m['mode']} needs exporter.kind vmlab")
            if m.get("caching", "KEEP") != "KEEP" and (kind != "vmlab" or m["mode"] == "ZAP_ONLY"):
                msgs.append(f"moves[{i}].caching: a caching change needs a vmlab MIGRATE move")
    if msgs:
        raise ConfigError(p, msgs[0].split(":")[0], "; ".join(
            [msgs[0].split(": ", 1)[1]] + msgs[1:]))
    return Experiment(p, raw)


def _short(e: jsonschema.ValidationError) -> str:
    if e.validator == "additionalProperties":
        return e.message.replace("Additional properties are not allowed", "unknown key")
    if e.validator == "oneOf":
        return f"{e.instance!r} is not a verdict or a list of verdicts"
    return e.message
