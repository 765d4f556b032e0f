"""Reports a person reads at a glance: the matrix as one HTML table (entry x kernel,
coloured by match, each cell linking its results), self-contained (no script, no
network), every value escaped."""
from __future__ import annotations

import html
import os
from pathlib import Path

_STYLE = """
body { font: 14px system-ui, sans-serif; margin: 1.5em; }
table { border-collapse: collapse; }
th, td { border: 1px solid #999; padding: .35em .6em; vertical-align: top; }
th { background: #eee; text-align: left; }
td.match { background: #d9f2d9; } td.mismatch { background: #f8d0d0; }
td.na { background: #eee; color: #555; } td.none { background: #fff; }
.small { font-size: 12px; color: #444; }
"""
_CLASS = {True: "match", False: "mismatch", None: "na"}
_WORD = {True: "match", False: "MISMATCH", None: "not applicable"}


def _link(text: str) -> str:
    """A link from a catalog entry's ``links``: URLs as they are, lore message ids to lore,
    commit ids to the kernel's git web."""
    t = text.strip()
    if not t:
        return ""
    if t.startswith(("http://", "https://")):
        href = t
    elif "@" in t:
        href = f"https://lore.kernel.org/r/{t}"
    elif all(c in "0123456789abcdef" for c in t.split()[0].lower()) and len(t.split()[0]) >= 7:
        href = f"https://git.kernel.org/linus/{t.split()[0]}"
    else:
        return html.escape(t)
    return f'<a href="{html.escape(href, quote=True)}">{html.escape(t)}</a>'


def matrix_html(result: dict, base: Path | None = None) -> str:
    kernels, entries = result["kernels"], result["entries"]
    by = {(c["entry"], c["kernel_suite"]): c for c in result["cells"]}
    info: dict = {}
    for c in result["cells"]:
        if c.get("title") or c["entry"] not in info:
            info[c["entry"]] = c
    rel = {k: next((c.get("kernel_release") for c in result["cells"]
                    if c["kernel_suite"] == k and c.get("kernel_release")), None) for k in kernels}
    head = "".join(f"<th>{html.escape(k)}<br><span class=small>{html.escape(rel[k] or '')}</span></th>"
                   for k in kernels)
    rows = []
    for e in entries:
        c0 = info.get(e, {})
        links = " ".join(_link(x) for x in (c0.get("links") or []))
        tds = [f"<th>{html.escape(e)}<br><span class=small>{html.escape(c0.get('title') or '')}"
               f"<br>{links}</span></th>"]
        for k in kernels:
            c = by.get((e, k))
            if c is None:
                tds.append('<td class="none">not run</td>')
                continue
            verdicts = " ".join(str(v) for v in c["verdicts"]) or "-"
            expected = "; ".join("/".join(x or []) for x in c["expected"]) or "-"
            where = c.get("results") or ""
            if base is not None and where:
                where = os.path.relpath(where, base)
            reason = f"<br><span class=small>{html.escape(c['reason'])}</span>" if c.get("reason") else ""
            tds.append(f'<td class="{_CLASS[c["match"]]}"><b>{_WORD[c["match"]]}</b><br>'
                       f'{html.escape(verdicts)}<br><span class=small>expected {html.escape(expected)}'
                       f'</span>{reason}<br><a href="{html.escape(where, quote=True)}/results.json">'
                       f'results</a></td>')
        rows.append("<tr>" + "".join(tds) + "</tr>")
    s = result.get("summary") or {}
    summary = html.escape(", ".join(f"{k.replace('_', ' ')} {v}" for k, v in s.items()))
    return (f"<!doctype html>\n<html><head><meta charset=utf-8><title>vmlab matrix</title>"
            f"<style>{_STYLE}</style></head><body>\n<h1>vmlab matrix</h1>\n"
            f"<p>{summary} &middot; status {html.escape(str(result.get('status')))} &middot; "
            f"{html.escape(str(result.get('started')))}</p>\n"
            f"<table><tr><th>entry</th>{head}</tr>\n" + "\n".join(rows) + "\n</table>\n</body></html>\n")
