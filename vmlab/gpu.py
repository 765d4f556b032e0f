"""Host side of the guest agent's ``gpu blob-scanout`` check: the expected pixels and
a pixel-exact comparison against a QMP ``screendump`` (binary P6 PPM).

The pattern is defined in guest-images/agent/gpu.c (fill_pattern); this mirrors it:

    pixel(x, y) = 0xFF000000 | (splitmix64(seed * 1000003 + y * width + x) & 0xFFFFFF)

stored as XRGB8888, so R = bits 16..23, G = bits 8..15, B = bits 0..7.  ``width`` is
the fb width the agent reports (the mode's hdisplay, which may exceed --width), and
is part of the formula: pass the reported one.
"""
from __future__ import annotations

from .stamp import splitmix64

_M64 = (1 << 64) - 1
SEED_MUL = 1000003


def expected_word(seed: int, x: int, y: int, width: int) -> int:
    """The 32-bit XRGB8888 value the agent writes at (x, y) of a ``width``-wide fb."""
    return 0xFF000000 | (splitmix64((seed * SEED_MUL + y * width + x) & _M64) & 0x00FFFFFF)


def expected_pixel(seed: int, x: int, y: int, width: int) -> tuple[int, int, int]:
    """(r, g, b) of pixel (x, y) for ``seed`` in a ``width``-wide fb."""
    v = expected_word(seed, x, y, width)
    return (v >> 16) & 0xFF, (v >> 8) & 0xFF, v & 0xFF


def expected_rgb(seed: int, width: int, height: int) -> bytes:
    """The whole width x height image as packed RGB (PPM body order)."""
    out = bytearray(width * height * 3)
    base = seed * SEED_MUL
    i = 0
    for y in range(height):
        row = base + y * width
        for x in range(width):
            v = splitmix64((row + x) & _M64)
            out[i] = (v >> 16) & 0xFF
            out[i + 1] = (v >> 8) & 0xFF
            out[i + 2] = v & 0xFF
            i += 3
    return bytes(out)


def _ppm_tokens(data: bytes, count: int) -> tuple[list[int], int]:
    """The first ``count`` header integers of a PPM and the offset just past the single
    whitespace byte that ends the last one; '#' comments run to end of line."""
    vals: list[int] = []
    i, n = 2, len(data)
    while len(vals) < count:
        if i >= n:
            raise ValueError("truncated PPM header")
        c = data[i:i + 1]
        if c.isspace():
            i += 1
        elif c == b"#":
            j = data.find(b"\n", i)
            if j < 0:
                raise ValueError("truncated PPM comment")
            i = j + 1
        elif c.isdigit():
            j = i
            while j < n and data[j:j + 1].isdigit():
                j += 1
            vals.append(int(data[i:j]))
            i = j
        else:
            raise ValueError(f"bad byte {c!r} in PPM header at {i}")
    if i >= n or not data[i:i + 1].isspace():
        raise ValueError("PPM header does not end in whitespace")
    return vals, i + 1


def parse_ppm(data: bytes) -> tuple[int, int, bytes]:
    """(width, height, rgb bytes) of a binary P6 PPM with maxval 255."""
    if data[:2] != b"P6":
        raise ValueError(f"not a binary P6 PPM (magic {data[:2]!r})")
    (width, height, maxval), off = _ppm_tokens(data, 3)
    if maxval != 255:
        raise ValueError(f"PPM maxval {maxval}, only 255 is supported")
    if width <= 0 or height <= 0:
        raise ValueError(f"bad PPM size {width}x{height}")
    need = width * height * 3
    body = data[off:off + need]
    if len(body) != need:
        raise ValueError(f"PPM body has {len(body)} bytes, {width}x{height} needs {need}")
    return width, height, body


def compare_screendump(ppm_bytes: bytes, seed: int, width: int, height: int) -> dict:
    """Compare the top-left width x height region of a screendump, pixel-exact, with
    the pattern of ``seed`` (``width`` is also the formula's row stride).

    Returns {"ok", "mismatches", "first_mismatch", "checked", "screen"}; first_mismatch
    is None or {"x", "y", "got": [r, g, b], "want": [r, g, b]}.
    """
    sw, sh, rgb = parse_ppm(ppm_bytes)
    if width > sw or height > sh:
        raise ValueError(f"screendump is {sw}x{sh}, smaller than the {width}x{height} region")
    want = expected_rgb(seed, width, height)
    mismatches = 0
    first = None
    row_bytes = width * 3
    for y in range(height):
        got_row = rgb[y * sw * 3:y * sw * 3 + row_bytes]
        want_row = want[y * row_bytes:(y + 1) * row_bytes]
        if got_row == want_row:
            continue
        for x in range(width):
            g = got_row[3 * x:3 * x + 3]
            w = want_row[3 * x:3 * x + 3]
            if g != w:
                mismatches += 1
                if first is None:
                    first = {"x": x, "y": y, "got": list(g), "want": list(w)}
    return {"ok": mismatches == 0, "mismatches": mismatches, "first_mismatch": first,
            "checked": width * height, "screen": [sw, sh]}
