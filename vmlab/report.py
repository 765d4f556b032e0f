"""Reports a person reads at a glance: report.html of a run, of a matrix and of a compare.

Built from Jinja2 templates (``vmlab/templates``, autoescaped: every value from a result
is escaped) and matplotlib plots (the page maps as inline PNG, the latency distribution as
inline SVG), self-contained: no script, no network. Every report ends with the
environment it ran in.
"""
from __future__ import annotations

import base64
import io
import logging
import math
import os
import platform
from functools import lru_cache
from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup

log = logging.getLogger("vmlab.report")

_CLASS = {True: "match", False: "mismatch", None: "na"}
_WORD = {True: "match", False: "MISMATCH", None: "not applicable"}
# a verdict's colour, everywhere: the page maps, their legend
PALETTE = {"REFAULTED": "#4caf50", "STALE": "#e53935", "HW_STALE": "#ff7043", "LOST_WRITE": "#8e24aa",
           "NOT_ZAPPED": "#fdd835", "TORN": "#3949ab", "MISSING": "#9e9e9e"}
MAX_MAPS = 120    # page maps drawn per report (a 100-move soak keeps all of its own)


@lru_cache(maxsize=1)
def _env() -> Environment:
    return Environment(loader=PackageLoader("vmlab", "templates"),
                       autoescape=select_autoescape(["j2", "html"]), trim_blocks=True,
                       lstrip_blocks=True)


def _link(text: str) -> dict:
    """A catalog entry's link: URLs as they are, lore message ids to lore, commit ids to
    the kernel's git web; anything else is text."""
    t = text.strip()
    if t.startswith(("http://", "https://")):
        return {"text": t, "href": t}
    if "@" in t:
        return {"text": t, "href": f"https://lore.kernel.org/r/{t}"}
    word = t.split()[0] if t else ""
    if len(word) >= 7 and all(c in "0123456789abcdef" for c in word.lower()):
        return {"text": t, "href": f"https://git.kernel.org/linus/{word}"}
    return {"text": t, "href": None}


def host_environment() -> list[tuple[str, str]]:
    """This machine: vmlab, its kernel, its QEMU (the one running the lab), its CPU."""
    from . import __version__
    from .qemu import qemu_version
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        pass
    try:
        qemu = qemu_version()
    except Exception as e:   # a report is written also when QEMU is missing
        qemu = f"unknown ({e})"
    return [("vmlab", __version__), ("host kernel", platform.release()), ("host QEMU", qemu),
            ("host CPU", cpu)]


# --- plots ----------------------------------------------------------------------------------
def _figure(w: float, h: float):
    # the object API, not pyplot: no global state, safe in any thread, no display needed
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def page_map_png(runs: list, npages: int) -> str:
    """A data: URI of the buffer's pages as a grid (row by row) coloured by verdict."""
    from matplotlib.colors import ListedColormap
    names = list(PALETTE)
    flat: list[int] = []
    for verdict, n in runs:
        flat += [names.index(verdict) if verdict in names else names.index("TORN")] * n
    flat = (flat + [names.index("MISSING")] * npages)[:npages]
    cols = 1 << math.ceil(math.log2(max(1, math.isqrt(npages))))
    rows = math.ceil(npages / cols)
    grid = [flat[r * cols:(r + 1) * cols] + [names.index("MISSING")] * (cols - len(flat[r * cols:(r + 1) * cols]))
            for r in range(rows)]
    side = 1.6
    fig = _figure(side, side * rows / cols if rows < cols else side)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(grid, cmap=ListedColormap([PALETTE[n] for n in names]), vmin=0, vmax=len(names) - 1,
              interpolation="nearest", aspect="auto")
    ax.set_axis_off()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def latency_svg(moves: list[dict]) -> str | None:
    """The distribution of per-move times as inline SVG: move + verified read (every
    move), and move -> the watching guest saw the new generation (watched moves)."""
    full = [m["seconds"] * 1000 for m in moves if isinstance(m.get("seconds"), (int, float))]
    seen = [m["watch"]["latency_s"] * 1000 for m in moves
            if isinstance((m.get("watch") or {}).get("latency_s"), (int, float))]
    if not full and not seen:
        return None
    fig = _figure(6.4, 2.6)
    ax = fig.add_subplot(1, 1, 1)
    for data, label, colour in ((full, "move + verified read", "#3949ab"),
                                (seen, "move -> guest observed", "#4caf50")):
        if data:
            ax.hist(data, bins=min(30, max(5, len(data))), alpha=0.7, label=f"{label} (n={len(data)})",
                    color=colour)
    ax.set_xlabel("milliseconds")
    ax.set_ylabel("moves")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Creator": None, "Date": None, "Format": None,
                                              "Type": None})
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]   # inline: no XML prolog or doctype


# --- the run report ---------------------------------------------------------------------------
def _chain(chain: dict) -> dict | None:
    if not chain:
        return None
    mism = chain.get("mismatches") or []
    said = " ".join(mism).lower()
    exp, host, kvm, guest = (chain.get(k) or {} for k in ("exporter", "lab_host_pte", "kvm", "guest"))
    boxes = [
        {"name": "exporter", "bad": "exporter" in said,
         "lines": [f"{exp.get('kind', '?')}: {exp.get('caching') or exp.get('requested') or '?'}",
                   f"vm_prot {exp['vm_prot']}" if exp.get("vm_prot") else ""]},
        {"name": "lab host PTE", "bad": "host" in said,
         "lines": [host.get("memtype") or host.get("error") or "not read", f"pfn {host['pfn']}" if "pfn" in host else ""]},
        {"name": "KVM", "bad": False, "lines": [kvm.get("mmu", "?"), kvm.get("memtype", "")]},
        {"name": "guest", "bad": "guest" in said,
         "lines": [f"asked {guest.get('requested', '?')}", f"got {guest.get('memtype') or '?'}"]},
    ]
    for b in boxes:
        b["lines"] = [x for x in b["lines"] if x]
    return {"boxes": boxes, "mismatches": mism}


@lru_cache(maxsize=4 * MAX_MAPS)
def _page_map_drawn(runs: tuple, npages: int) -> str:
    return page_map_png([list(r) for r in runs], npages)


@lru_cache(maxsize=4)
def _latency_drawn(times: tuple) -> str | None:
    return latency_svg([{"seconds": s, "watch": {"latency_s": w}} for s, w in times])


def _plot_inputs(res: dict) -> tuple[list, int, tuple]:
    """(page maps to draw, pages, per-move times) of a run, hashable: the plots are pure
    functions of them, drawn once (prerender) and found again by run_html."""
    npages = max(1, _buffer_pages(res))
    rows = ([res["baseline"]] if res.get("baseline") else []) + list(res.get("moves", []))
    maps = [tuple(tuple(x) for x in r["page_map"]) for r in rows if r.get("page_map")][:MAX_MAPS]
    times = tuple((m.get("seconds"), m["watch"].get("latency_s") if isinstance(m.get("watch"), dict) else None)
                  for m in res.get("moves", []))
    return maps, npages, times


def prerender(res: dict) -> None:
    """Draw a run's plots ahead (matplotlib: about 1 s), on a thread while the run tears
    down; run_html then finds them drawn. Never raises: run_html draws what is missing."""
    try:
        maps, npages, times = _plot_inputs(res)
        for m in maps:
            _page_map_drawn(m, npages)
        _latency_drawn(times)
    except Exception as e:
        log.warning("report: drawing the plots ahead: %s: %s", type(e).__name__, e)


def run_html(res: dict, outdir: Path) -> str:
    npages = max(1, _buffer_pages(res))
    rows, maps = [], []
    base = res.get("baseline")
    if base:
        rows.append(dict(base, n="baseline", mode="read", caching="", seconds=None))
    for m in res.get("moves", []):
        rows.append(m)
    for r in rows:
        if r.get("page_map") and len(maps) < MAX_MAPS:
            maps.append({"label": f"move {r['n']} {r.get('mode', '')}: {r.get('verdict')}"
                         if r["n"] != "baseline" else f"baseline: {r.get('verdict')}",
                         "png": _page_map_drawn(tuple(tuple(x) for x in r["page_map"]), npages)})
    drawn = sum(1 for r in rows if r.get("page_map"))
    kvm = []
    for m in res.get("moves", []):
        ev, slot = m.get("kvm_evidence") or {}, m.get("memslot_evidence")
        if ev or slot:
            kvm.append({"n": m["n"], "summary": ev.get("summary") or ev.get("error") or "",
                        "memslot": "" if not slot else
                        f"deleted {slot['deleted']}, created {slot['created']}"
                        + (", recreated" if slot.get("recreated") else "")})
    lab = res.get("lab") or {}
    guest = res.get("guest") or {}
    env = [("experiment", res.get("experiment", "?")),
           ("lab kernel", f"{lab.get('kernel', '?')} (package {lab.get('kernel_package', '?')})"),
           ("lab QEMU (the VMM under test)", f"{lab.get('qemu', '?')} ({lab.get('qemu_source', 'default')})"),
           ("accel", f"{lab.get('accel', '?')}: {lab.get('accel_reason', '')}"),
           ("guest kernel", guest.get("kernel", "?"))]
    if res.get("vmm"):
        env.append(("transport", f"{res['vmm'].get('transport')} (the VMM on a move: {res['vmm'].get('on_move')})"))
    files = [f for f in ("results.json", "junit.xml", "reproduce.sh", "config.yaml", "vmlab.log",
                         "lab-console.log", "guest-console.log", "guest.qemu.log", "hostagent.log",
                         "lab-dmesg.log", "guest-dmesg.log") if (Path(outdir) / f).exists()]
    svg = _latency_drawn(_plot_inputs(res)[2])
    return _env().get_template("run.html.j2").render(
        title=f"vmlab run: {res.get('experiment', '')}", res=res, rows=rows, maps=maps,
        colour={"REFAULTED": "#2e7d32", "STALE": "#c62828", "HW_STALE": "#d84315", "TORN": "#283593",
                "VMM_FAULT": "#6a1b9a", "GUEST_FAULT": "#6a1b9a", "NOT_ZAPPED": "#8d6e00"},
        maps_left=max(0, drawn - len(maps)), palette=list(PALETTE.items()),
        chain=_chain(res.get("caching_chain") or {}), latency_svg=Markup(svg) if svg else None,
        kvm=kvm, files=files, env=env + host_environment())


def _buffer_pages(res: dict) -> int:
    from .config import parse_size
    try:
        return parse_size((res.get("config") or {}).get("exporter", {}).get("size", 0)) // 4096
    except (ValueError, TypeError):
        return 0


# --- matrix and compare ---------------------------------------------------------------------
def matrix_html(result: dict, base: Path | None = None) -> str:
    kernels, entries = result["kernels"], result["entries"]
    by = {(c["entry"], c["kernel_suite"]): c for c in result["cells"]}
    info: dict = {}
    for c in result["cells"]:
        if c.get("title") or c["entry"] not in info:
            info[c["entry"]] = c
    rel = {k: next((c.get("kernel_release") for c in result["cells"]
                    if c["kernel_suite"] == k and c.get("kernel_release")), None) for k in kernels}
    rows = []
    for e in entries:
        c0 = info.get(e, {})
        cells = []
        for k in kernels:
            c = by.get((e, k))
            if c is None:
                cells.append(None)
                continue
            where = c.get("results") or ""
            if base is not None and where:
                where = os.path.relpath(where, base)
            cells.append({"cls": _CLASS[c["match"]], "word": _WORD[c["match"]],
                          "verdicts": " ".join(str(v) for v in c["verdicts"]) or "-",
                          "expected": "; ".join("/".join(x or []) for x in c["expected"]) or "-",
                          "reason": c.get("reason"), "where": where})
        rows.append({"entry": e, "title": c0.get("title") or "",
                     "links": [_link(x) for x in (c0.get("links") or []) if x.strip()], "cells": cells})
    s = result.get("summary") or {}
    # each cell's results.json, read once for the environment and the strategy table
    loaded = [(c, _cell_results(c, base)) for c in result["cells"]]
    return _env().get_template("matrix.html.j2").render(
        title="vmlab matrix" + (f": {result['strategy']['title']}" if result.get("strategy") else ""),
        strategy=_strategy_rows(result, loaded), kernels=[{"name": k, "release": rel[k]} for k in kernels],
        rows=rows,
        summary=", ".join(f"{k.replace('_', ' ')} {v}" for k, v in s.items()),
        status=result.get("status"), started=result.get("started"),
        env=_lab_environment(result, kernels, loaded) + host_environment())


def _lab_environment(result: dict, kernels: list[str], loaded: list) -> list[tuple[str, str]]:
    """Per lab kernel, from its first cell that booted: the kernel package, the lab's
    QEMU (the VMM under test) and the accel."""
    out = []
    for k in kernels:
        for c, res in loaded:
            lab = (res.get("lab") or {}) if c["kernel_suite"] == k else {}
            if lab.get("kernel"):
                out.append((f"lab {k}", f"kernel {lab['kernel']} (package {lab.get('kernel_package', '?')}); "
                                        f"QEMU {lab.get('qemu', '?')}; accel {lab.get('accel', '?')}"))
                break
    return out


def _cell_results(cell: dict, base: Path | None) -> dict:
    import json
    for p in (cell.get("results"), base / cell["results_rel"] if base and cell.get("results_rel") else None):
        if p and (Path(p) / "results.json").is_file():
            try:
                return json.loads((Path(p) / "results.json").read_text())
            except ValueError:
                return {}
    return {}


def _strategy_rows(result: dict, loaded: list) -> dict | None:
    """A strategy matrix's cells side by side: the axes, what each layer's memtype came out
    as, the mismatches, the verdicts, the move latency and the guest's read bandwidth
    (labelled not meaningful in a TCG lab, which models no caches)."""
    st = result.get("strategy")
    if not st:
        return None
    import statistics
    rows = []
    for c, res in loaded:
        chain = res.get("caching_chain") or {}
        moves = res.get("moves") or []
        secs = [m["seconds"] for m in moves if isinstance(m.get("seconds"), (int, float))]
        size = _buffer_pages(res) * 4096
        bw = [size / m["read_ns"] * 1e3 for m in moves if isinstance(m.get("read_ns"), (int, float)) and m["read_ns"]]
        tcg = (res.get("lab") or {}).get("accel") == "tcg"
        rows.append({
            "cell": c["entry"], "kernel": c["kernel_suite"], "cls": _CLASS[c["match"]],
            "axes": [st["cells"].get(c["entry"], {}).get(a, "") for a in st["axes"]],
            "exporter": " -> ".join(dict.fromkeys(x for x in [(chain.get("exporter") or {}).get("caching")] +
                                   [(m.get("exporter_info") or {}).get("caching") for m in moves] if x)),
            "host": (chain.get("lab_host_pte") or {}).get("memtype", ""),
            "kvm": (chain.get("kvm") or {}).get("mmu", ""),
            "guest": (chain.get("guest") or {}).get("memtype", ""),
            "mismatches": chain.get("mismatches") or [],
            "verdicts": " ".join(str(v) for v in c["verdicts"]) or "-",
            "latency": f"{statistics.median(secs) * 1000:.0f} ms" if secs else "-",
            "bandwidth": (f"{statistics.median(bw):.0f} MB/s" + (" (not meaningful: TCG lab, no caches)"
                                                                  if tcg else "")) if bw else "-"})
    return {"axes": st["axes"], "rows": rows, "file": st.get("file")}


def compare_html(rows: list[dict], a: str, b: str) -> str:
    cls = {"REGRESSION": "mismatch", "fixed": "match", "same": "none"}
    out = []
    for r in rows:
        t = r.get("timing") or {}
        cells = [f"{r['entry']}[{r['kernel']}]"]
        for side in (r["a"], r["b"]):
            cells.append(" ".join(map(str, side["verdicts"])) + f" ({_WORD[side['match']]})" if side else "-")
        cells.append(r["change"])
        cells.append(f"{t.get('median_a', '-')} s / {t.get('median_b', '-')} s, p={t.get('p', '-')}"
                     + (" changed" if t.get("changed") else ""))
        out.append({"cls": cls.get(r["change"], "na"), "cells": cells})
    return _env().get_template("compare.html.j2").render(title="vmlab compare", a=a, b=b, rows=out,
                                                          env=host_environment())
