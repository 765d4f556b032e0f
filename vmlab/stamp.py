"""The page stamp format, mirrored from host-tools/vmlab-exporter/include/uapi/vmlab_stamp.h.

That header is the definition; this module must agree with it byte for byte, which
host-tools/stamp-vectors.txt checks from both sides (tests/unit/test_stamp.py here,
``vmlab-guest-agent vectors`` in C).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

PAGE_SIZE = 4096
MAGIC = 0x424C4D56
VERSION = 1
LIVE = 1
RETIRED = 2
HDR_SUMMED = 32
CSUM_OFF = 32
PATTERN_OFF = 64
GUEST_OFF = 2048
PATTERN_WORDS = (GUEST_OFF - PATTERN_OFF) // 8
_M64 = (1 << 64) - 1
_HDR = struct.Struct("<IHHQQQI28x")  # 64 bytes
assert _HDR.size == PATTERN_OFF

STATE_NAMES = {LIVE: "LIVE", RETIRED: "RETIRED"}


def splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def word(buffer_id: int, generation: int, index: int, i: int) -> int:
    return splitmix64((buffer_id * 0x9E3779B97F4A7C15 + generation * 0xC2B2AE3D27D4EB4F
                       + index * 0x165667B19E3779F9 + i) & _M64)


def fnv1a32(data: bytes, h: int = 2166136261) -> int:
    for b in data:
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return h


def checksum(page: bytes) -> int:
    return fnv1a32(page[PATTERN_OFF:GUEST_OFF], fnv1a32(page[:HDR_SUMMED]))


def pattern(buffer_id: int, generation: int, index: int) -> bytes:
    return struct.pack(f"<{PATTERN_WORDS}Q",
                       *(word(buffer_id, generation, index, i) for i in range(PATTERN_WORDS)))


def stamp_page(buffer_id: int, generation: int, index: int, state: int = LIVE,
               guest_area: bytes = b"") -> bytes:
    """A whole 4 KiB page as the exporter writes it (guest area zero-filled unless given)."""
    head = _HDR.pack(MAGIC, VERSION, state, buffer_id, generation, index, 0)
    body = pattern(buffer_id, generation, index)
    csum = fnv1a32(body, fnv1a32(head[:HDR_SUMMED]))
    head = _HDR.pack(MAGIC, VERSION, state, buffer_id, generation, index, csum)
    guest = guest_area.ljust(PAGE_SIZE - GUEST_OFF, b"\0")[: PAGE_SIZE - GUEST_OFF]
    return head + body + guest


@dataclass(frozen=True)
class Stamp:
    magic_ok: bool
    checksum_ok: bool
    pattern_ok: bool
    buffer_id: int
    generation: int
    index: int
    state: int
    tag: int  # u64 at the start of the guest area

    @property
    def valid(self) -> bool:
        return self.magic_ok and self.checksum_ok and self.pattern_ok


def parse_page(page: bytes) -> Stamp:
    magic, version, state, bid, gen, idx, csum = _HDR.unpack_from(page)
    magic_ok = magic == MAGIC and version == VERSION
    (tag,) = struct.unpack_from("<Q", page, GUEST_OFF)
    if not magic_ok:
        return Stamp(False, False, False, bid, gen, idx, state, tag)
    return Stamp(True, csum == checksum(page),
                 page[PATTERN_OFF:GUEST_OFF] == pattern(bid, gen, idx), bid, gen, idx, state, tag)


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & _M64
    return h


# (buffer_id, generation, index, state): the inputs of host-tools/stamp-vectors.txt.
VECTOR_INPUTS = [
    (1, 1, 0, LIVE), (1, 1, 1, LIVE), (1, 2, 0, LIVE), (1, 1, 0, RETIRED),
    (7, 3, 255, LIVE), (0xFFFFFFFFFFFFFFFF, 0xFFFFFFFFFFFFFFFF, 0xFFFFFFFFFFFFFFFF, RETIRED),
    (42, 1000, 16383, LIVE), (0x0123456789ABCDEF, 5, 4096, RETIRED),
]


def vector_lines() -> list[str]:
    """One line per vector: id gen index state checksum fnv1a64(first 2048 bytes), all hex."""
    out = []
    for bid, gen, idx, state in VECTOR_INPUTS:
        page = stamp_page(bid, gen, idx, state)
        out.append(f"{bid:x} {gen:x} {idx:x} {state:x} {checksum(page):08x} "
                   f"{fnv1a64(page[:GUEST_OFF]):016x}")
    return out
