"""Strategy matrices (``configs/strategies/``): one experiment per combination of axes.

A strategy file has a ``base`` experiment (without name) and ``axes``: each axis maps a
value's name to a patch merged into the base (mappings merge key by key, anything else,
lists included, replaces). Cell ``caching-WB-uc-flip`` is the base with the patches of
WB, uc and flip. In a move's ``caching``, ``FLIP`` stands for the other of WB and WC than
the cell's exporter caching (UC flips to WB): a placement change whatever the start.
Every cell is checked as an experiment before anything runs (exit 2, one line naming the
strategy file and the cell); ``vmlab matrix --strategies FILE`` runs the cells like
catalog entries and its report tabulates the layers' memtypes per cell.
"""
from __future__ import annotations

import copy
import itertools
from pathlib import Path

import yaml

from . import config as cfgmod
from .errors import ConfigError

KEYS = {"version", "name", "title", "description", "links", "why", "base", "axes"}
FLIP = {"WB": "WC", "WC": "WB", "UC": "WB"}


def _merge(base, patch):
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = _merge(base.get(k), v) if k in base else copy.deepcopy(v)
        return out
    return copy.deepcopy(patch)


def _flip(raw: dict) -> dict:
    start = (raw.get("exporter") or {}).get("caching", "WB")
    for m in raw.get("moves") or []:
        if isinstance(m, dict) and m.get("caching") == "FLIP":
            m["caching"] = FLIP.get(start, "WB")
    return raw


def load(path: str | Path) -> tuple[dict, list[cfgmod.Experiment]]:
    """(the strategy file, one Experiment per cell); ConfigError for anything wrong."""
    p = str(path)
    try:
        doc = yaml.safe_load(Path(p).read_text())
    except OSError as e:
        raise ConfigError("<command line>", "--strategies", f"{p}: {e.strerror}")
    except yaml.YAMLError as e:
        raise ConfigError(p, "<file>", f"not YAML: {str(e).splitlines()[0]}")
    if not isinstance(doc, dict):
        raise ConfigError(p, "<file>", "must be a mapping with name, base and axes")
    extra = sorted(set(doc) - KEYS)
    if extra:
        raise ConfigError(p, extra[0], f"unknown key (a strategy file has {', '.join(sorted(KEYS))})")
    for key in ("name", "title", "why", "base", "axes"):
        if not doc.get(key):
            raise ConfigError(p, key, "missing (name, title, why, base and axes say what the cells are)")
    if not isinstance(doc["base"], dict) or "name" in doc["base"]:
        raise ConfigError(p, "base", "an experiment config without name (each cell gets its own)")
    axes = doc["axes"]
    if not isinstance(axes, dict) or not all(isinstance(v, dict) and v for v in axes.values()):
        raise ConfigError(p, "axes", "each axis maps value names to a patch of the base config")
    cells = []
    for combo in itertools.product(*[list(v.items()) for v in axes.values()]):
        name = "-".join([str(doc["name"])] + [str(value) for value, _ in combo])
        raw = copy.deepcopy(doc["base"])
        for _, patch in combo:
            if not isinstance(patch, dict):
                raise ConfigError(p, "axes", f"{name}: a patch must be a mapping, not {patch!r}")
            raw = _merge(raw, patch)
        raw = _flip(raw)
        raw.update(version=raw.get("version", 1), name=name, title=doc["title"], why=doc["why"],
                   links=doc.get("links") or ["vmlab strategy matrix"],
                   description=f"{doc['title']}: " + ", ".join(f"{a}={v}" for a, (v, _) in zip(axes, combo)))
        errs = cfgmod.problems(raw)
        if errs:
            q, m = errs[0]
            raise ConfigError(p, f"axes (cell {name}) {'.'.join(map(str, q)) or '<top level>'}",
                              cfgmod._one_line(m))
        cells.append((raw, dict(zip(axes, (v for v, _ in combo)))))
    doc["cells"] = {raw["name"]: axis for raw, axis in cells}
    return doc, [cfgmod.Experiment(p, raw) for raw, _ in cells]


def write_cells(entries: list[cfgmod.Experiment], d: Path) -> None:
    """Each cell's config as a file of its own (a reproducer's input), the entry's path."""
    d.mkdir(parents=True, exist_ok=True)
    for e in entries:
        f = d / f"{e.name}.yaml"
        f.write_text(yaml.safe_dump(e.raw, sort_keys=False))
        e.path = str(f)
