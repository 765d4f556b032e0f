"""The regression catalog: ``configs/catalog/*.yaml``, one experiment per known upstream
behaviour of KVM with dma-buf memory, each with ``title``, ``links`` (lore message ids,
commit ids, public issue URLs) and ``why`` (which kernel change decides the outcome),
its expectations keyed by lab kernel version where that change moves them.

An entry's id is its ``name``; ids are unique across the catalog.
"""
from __future__ import annotations

import re
from pathlib import Path

from . import config as cfgmod
from .errors import ConfigError
from .paths import repo_root

CATALOG_DIR = repo_root() / "configs" / "catalog"
REQUIRED = ("title", "links", "why")


def load(directory: str | Path | None = None, only: list[str] | None = None) -> list[cfgmod.Experiment]:
    """Every entry of the catalog (sorted by id), or the ``only`` ones in that order.
    ConfigError (exit 2, one line naming the file and key) for a bad entry, a duplicate id
    or an unknown ``--only`` id."""
    d = Path(directory) if directory else CATALOG_DIR
    if not d.is_dir():
        raise ConfigError("<command line>", "--catalog", f"{d}: not a directory")
    entries: dict[str, cfgmod.Experiment] = {}
    for p in sorted(d.glob("*.yaml")):
        exp = cfgmod.load(p)
        for key in REQUIRED:
            if not exp.raw.get(key):
                raise ConfigError(str(p), key, f"a catalog entry needs {key!r} "
                                  f"(title, links, why: what it is, the public record, which change decides it)")
        if re.fullmatch(r"lab(-\d+)?|.*\.attempt\d+", exp.name):
            raise ConfigError(str(p), "name", f"{exp.name!r} is the name of a directory `vmlab matrix` "
                              f"makes for itself (lab, lab-N, NAME.attemptN)")
        if exp.name in entries:
            raise ConfigError(str(p), "name", f"{exp.name!r} is also the id of {entries[exp.name].path}")
        entries[exp.name] = exp
    if not entries:
        raise ConfigError("<command line>", "--catalog", f"{d}: no *.yaml entries")
    if not only:
        return [entries[k] for k in sorted(entries)]
    unknown = [i for i in only if i not in entries]
    if unknown:
        raise ConfigError("<command line>", "--only", f"no catalog entry {unknown[0]!r} in {d} "
                          f"(ids: {', '.join(sorted(entries))})")
    return [entries[i] for i in dict.fromkeys(only)]
