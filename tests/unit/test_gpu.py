"""vmlab/gpu.py: the blob-scanout pixel formula (cross-checked against the C one in
guest-images/agent/gpu.c via vmlab_stamp.h) and the PPM screendump comparison."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.prereq import need_tools

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vmlab import gpu  # noqa: E402

UAPI = ROOT / "host-tools" / "vmlab-exporter" / "include" / "uapi"
GPU_C = ROOT / "guest-images" / "agent" / "gpu.c"


def make_ppm(seed: int, width: int, height: int, screen=None, comment: bytes = b"") -> bytes:
    sw, sh = screen or (width, height)
    want = gpu.expected_rgb(seed, width, height)
    body = bytearray(sw * sh * 3)  # black outside the region
    for y in range(height):
        body[y * sw * 3:y * sw * 3 + width * 3] = want[y * width * 3:(y + 1) * width * 3]
    return b"P6\n" + comment + f"{sw} {sh}\n255\n".encode() + bytes(body)


def test_expected_pixel_matches_word():
    for seed, x, y, w in [(0, 0, 0, 64), (1, 5, 7, 64), (2**63, 1023, 767, 1024)]:
        v = gpu.expected_word(seed, x, y, w)
        assert v >> 24 == 0xFF
        assert gpu.expected_pixel(seed, x, y, w) == ((v >> 16) & 255, (v >> 8) & 255, v & 255)
    rgb = gpu.expected_rgb(9, 8, 3)
    assert tuple(rgb[3 * (2 * 8 + 5):3 * (2 * 8 + 5) + 3]) == gpu.expected_pixel(9, 5, 2, 8)


def test_formula_matches_c(tmp_path):
    """Compile the agent's own fill_pattern() (gpu.c #included whole, with vmlab_stamp.h)
    into a tiny program that prints a pattern, and compare every pixel with
    expected_pixel."""
    need_tools("gcc")
    prog = tmp_path / "pix.c"
    prog.write_text(r'''
#include "%s"
int main(int argc, char **argv)
{
	uint64_t seed;
	uint32_t w, h, pitch, x, y;
	uint32_t *px;

	if (argc != 4)
		return 2;
	seed = strtoull(argv[1], NULL, 0);
	w = (uint32_t)strtoul(argv[2], NULL, 0);
	h = (uint32_t)strtoul(argv[3], NULL, 0);
	pitch = w * 4 + 8; /* a padded stride must not change the formula */
	px = calloc((size_t)pitch / 4 * h, 4);
	fill_pattern(px, w, h, pitch, seed);
	for (y = 0; y < h; y++)
		for (x = 0; x < w; x++)
			printf("%%u %%u %%08" PRIx32 "\n", x, y, px[(size_t)y * (pitch / 4) + x]);
	free(px);
	return 0;
}
''' % GPU_C)
    exe = tmp_path / "pix"
    r = subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-Wno-unused-function",
                        "-I", str(UAPI), "-o", str(exe), str(prog),
                        str(Path(GPU_C).parent / "agent-common.c")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for seed, w, h in [(0, 5, 3), (12345, 17, 4), (2**64 - 1, 9, 2)]:
        out = subprocess.run([str(exe), str(seed), str(w), str(h)], capture_output=True,
                             text=True, check=True).stdout
        lines = out.splitlines()
        assert len(lines) == w * h
        for ln in lines:
            x, y, v = ln.split()
            v = int(v, 16)
            assert gpu.expected_word(seed, int(x), int(y), w) == v
            assert gpu.expected_pixel(seed, int(x), int(y), w) == (
                (v >> 16) & 255, (v >> 8) & 255, v & 255)


def test_parse_ppm_with_comments():
    data = make_ppm(3, 4, 2, comment=b"# made by a test\n#another\n")
    w, h, rgb = gpu.parse_ppm(data)
    assert (w, h) == (4, 2) and rgb == gpu.expected_rgb(3, 4, 2)
    # comment between tokens, odd whitespace
    data2 = b"P6 #c\n 4\t#x\n2 255\n" + rgb
    assert gpu.parse_ppm(data2) == (4, 2, rgb)


@pytest.mark.parametrize("bad", [b"P3\n1 1\n255\n\x00\x00\x00", b"P6\n1 1\n65535\n" + b"\0" * 6,
                                 b"P6\n2 2\n255\n\x00", b"P6\n2 2", b"P6\n2 x\n255\n"])
def test_parse_ppm_rejects(bad):
    with pytest.raises(ValueError):
        gpu.parse_ppm(bad)


def test_compare_exact_and_flipped_pixel():
    data = make_ppm(77, 16, 8)
    res = gpu.compare_screendump(data, 77, 16, 8)
    assert res["ok"] and res["mismatches"] == 0 and res["first_mismatch"] is None
    assert res["checked"] == 128
    # flip one bit of one channel of pixel (5, 3)
    hdr = len(data) - 16 * 8 * 3
    buf = bytearray(data)
    buf[hdr + (3 * 16 + 5) * 3 + 1] ^= 0x01
    res = gpu.compare_screendump(bytes(buf), 77, 16, 8)
    assert not res["ok"] and res["mismatches"] == 1
    assert res["first_mismatch"]["x"] == 5 and res["first_mismatch"]["y"] == 3
    assert res["first_mismatch"]["want"] == list(gpu.expected_pixel(77, 5, 3, 16))
    # another seed: (almost) everything differs
    assert gpu.compare_screendump(data, 78, 16, 8)["mismatches"] > 100


def test_compare_region_of_larger_screen():
    # the fb stride (formula width) is the region width; the rest of the screen is ignored
    data = make_ppm(5, 10, 4, screen=(32, 6))
    assert gpu.compare_screendump(data, 5, 10, 4)["ok"]
    with pytest.raises(ValueError):
        gpu.compare_screendump(data, 5, 40, 4)
