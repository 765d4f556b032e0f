"""virtio-gpu blob round trips, run from the controller against a booted guest.

blob:      the guest fills a GUEST blob, scans it out (KMS), QEMU's screendump must show
           the pattern pixel-exact; the guest rewrites it, a second screendump must follow.
host-blob: the guest creates a virgl context and a HOST3D blob, maps it, writes a pattern;
           the pattern must be found in the lab-side QEMU's memory outside guest RAM, and
           the guest mapping's memtype tells which map_info the host returned.
"""
from __future__ import annotations

import json
import time

from . import gpu
from .errors import WaitTimeout
from .ssh import ChannelReader

AGENT = "vmlab-guest-agent"
MAP_INFO = {1: "CACHED", 2: "UNCACHED", 3: "WC", 0: "NONE"}


def _read_json_line(chan, buf: bytearray, timeout: float) -> dict:
    rd = ChannelReader(chan, "guest agent gpu", on_out=buf.extend)
    try:
        how = rd.pump(time.monotonic() + timeout, stop=lambda: b"\n" in buf)
    except WaitTimeout as e:
        raise RuntimeError(str(e))
    if how == "exit":
        raise RuntimeError(rd.err.decode(errors="replace").strip() or "the agent exited without a line")
    line, rest = bytes(buf).split(b"\n", 1)
    buf[:] = rest
    return json.loads(line)


def blob(guest) -> dict:
    res: dict = {"mode": "blob"}
    chan = guest.session.open_exec(f"{AGENT} gpu blob-scanout --seed 11 --rewrite-seed 22 "
                                   f"--rewrite-after 10 --hold 10")
    buf = bytearray()
    try:
        first = _read_json_line(chan, buf, 60)
        res["scanout"] = first
        w, h = first["width"], first["height"]
        time.sleep(1.0)  # DIRTYFB -> RESOURCE_FLUSH is asynchronous in QEMU
        res["screendump_1"] = gpu.compare_screendump(guest.screendump("shot1"), 11, w, h)
        second = _read_json_line(chan, buf, 60)
        res["rewrite"] = second
        time.sleep(1.0)
        res["screendump_2"] = gpu.compare_screendump(guest.screendump("shot2"), 22, w, h)
    except (RuntimeError, KeyError, ValueError) as e:
        res["error"] = str(e)
    finally:
        chan.close()
    res["passed"] = bool(res.get("screendump_1", {}).get("ok") and res.get("screendump_2", {}).get("ok"))
    return res


def host_blob(guest, agent) -> dict:
    res: dict = {"mode": "host-blob"}
    # --hold keeps the blob (and so the host resource) alive while the host side is read.
    chan = guest.session.open_exec(f"{AGENT} gpu host-blob --size 65536 --seed 7 --hold 120")
    buf = bytearray()
    r: dict = {}
    try:
        r = _read_json_line(chan, buf, 120)
        words = r.get("first_words") or []
        if r.get("readback_ok") and len(words) == 4:
            needle = b"".join(int(w, 16).to_bytes(8, "little") for w in words)
            hits = agent.request("find_bytes", pid=guest.pid, hex=needle.hex(), timeout=300)["hits"]
            res["host_view"] = {"found": bool(hits), "hits": hits,
                                "how": "the guest's first 32 bytes searched in the lab QEMU's memory, "
                                       "guest RAM excluded"}
    except (RuntimeError, ValueError) as e:
        res["error"] = str(e)
    finally:
        chan.close()
    res["guest"] = r
    if r.get("memtype") is None and len(r.get("pat_new_lines") or []) == 1:
        # pagemap shows no pfn for a PFNMAP page; the one PAT entry the mapping added is it
        line = r["pat_new_lines"][0]
        r["memtype"] = line.split("]", 1)[1].strip()
        r["map_info_inferred"] = {"write-combining": 3, "uncached-minus": 2, "uncached": 2,
                                  "write-back": 1}.get(r["memtype"])
    mi = r.get("map_info_inferred")
    res["map_info"] = {"value": mi, "name": MAP_INFO.get(mi), "source": r.get("map_info_source"),
                       "guest_memtype": r.get("memtype")}
    res["passed"] = bool(r.get("readback_ok") and res.get("host_view", {}).get("found"))
    return res
