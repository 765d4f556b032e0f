"""vmlab/stamp.py against host-tools/stamp-vectors.txt and the C header vmlab_stamp.h."""
from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest

from tests.prereq import need_tools

from vmlab import stamp

ROOT = Path(__file__).resolve().parents[2]
VECTORS = ROOT / "host-tools" / "stamp-vectors.txt"
UAPI = ROOT / "host-tools" / "vmlab-exporter" / "include" / "uapi"


def test_vector_file_matches_vector_lines():
    lines = [ln.strip() for ln in VECTORS.read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    assert len(lines) == len(stamp.VECTOR_INPUTS) == 8
    assert lines == stamp.vector_lines()


def test_first_vector_known_values():
    page = stamp.stamp_page(1, 1, 0, stamp.LIVE)
    assert stamp.checksum(page) == 0x436E86AC
    assert stamp.fnv1a64(page[:stamp.GUEST_OFF]) == 0xB62587D4095929ED


def test_layout_constants():
    assert stamp.PAGE_SIZE == 4096
    assert stamp.PATTERN_WORDS == 248
    page = stamp.stamp_page(0x1122, 3, 9)
    assert len(page) == 4096
    magic, ver, state, bid, gen, idx, csum = struct.unpack_from("<IHHQQQI", page)
    assert page[:4] == b"VMLB"
    assert (magic, ver, state, bid, gen, idx) == (stamp.MAGIC, 1, stamp.LIVE, 0x1122, 3, 9)
    assert page[36:64] == b"\0" * 28
    assert csum == stamp.checksum(page)
    assert page[stamp.GUEST_OFF:] == b"\0" * 2048


@pytest.mark.parametrize("bid,gen,idx", [(1, 1, 0), (7, 3, 255), (2**64 - 1, 2**64 - 1, 2**64 - 1),
                                         (0x0123456789ABCDEF, 5, 4096)])
def test_round_trip(bid, gen, idx):
    s = stamp.parse_page(stamp.stamp_page(bid, gen, idx, guest_area=struct.pack("<Q", 0xABCDEF)))
    assert s.valid and s.magic_ok and s.checksum_ok and s.pattern_ok
    assert (s.buffer_id, s.generation, s.index, s.state, s.tag) == (bid, gen, idx, stamp.LIVE, 0xABCDEF)


def test_retired_state():
    live = stamp.stamp_page(5, 2, 1, stamp.LIVE)
    ret = stamp.stamp_page(5, 2, 1, stamp.RETIRED)
    s = stamp.parse_page(ret)
    assert s.valid and s.state == stamp.RETIRED == 2
    assert stamp.STATE_NAMES[s.state] == "RETIRED"
    # state is covered by the checksum; the pattern is not state-dependent
    assert stamp.checksum(live) != stamp.checksum(ret)
    assert live[stamp.PATTERN_OFF:stamp.GUEST_OFF] == ret[stamp.PATTERN_OFF:stamp.GUEST_OFF]


@pytest.mark.parametrize("off", [stamp.PATTERN_OFF, 1000, stamp.GUEST_OFF - 1])
def test_flipped_pattern_byte_breaks_checksum_and_pattern(off):
    page = bytearray(stamp.stamp_page(9, 4, 3))
    page[off] ^= 0x01
    s = stamp.parse_page(bytes(page))
    assert s.magic_ok
    assert not s.checksum_ok
    assert not s.pattern_ok
    assert not s.valid


def test_flipped_header_byte_breaks_checksum():
    page = bytearray(stamp.stamp_page(9, 4, 3))
    page[16] ^= 0x80  # generation
    s = stamp.parse_page(bytes(page))
    assert s.magic_ok and not s.checksum_ok and not s.valid


def test_bad_magic():
    page = bytearray(stamp.stamp_page(9, 4, 3))
    page[0] ^= 0xFF
    s = stamp.parse_page(bytes(page))
    assert not s.magic_ok and not s.valid


def test_guest_area_not_covered_by_checksum():
    a = stamp.stamp_page(3, 7, 11)
    b = stamp.stamp_page(3, 7, 11, guest_area=b"\xff" * 2048)
    assert a[:stamp.GUEST_OFF] == b[:stamp.GUEST_OFF]
    assert stamp.checksum(a) == stamp.checksum(b)
    page = bytearray(a)
    for off in (stamp.GUEST_OFF, 3000, 4095):
        page[off] ^= 0x5A
    assert stamp.checksum(bytes(page)) == stamp.checksum(a)
    s = stamp.parse_page(bytes(page))
    assert s.valid and s.tag == 0x5A


def test_guest_area_truncated_and_padded():
    assert len(stamp.stamp_page(1, 1, 1, guest_area=b"x" * 5000)) == 4096
    assert stamp.stamp_page(1, 1, 1, guest_area=b"ab")[2048:2051] == b"ab\0"


C_SRC = r"""
#include <stdio.h>
#include <stdlib.h>
#include <vmlab_stamp.h>
int main(int argc, char **argv)
{
	static vmlab_u8 page[VMLAB_STAMP_PAGE_SIZE];
	vmlab_u64 id = strtoull(argv[1], 0, 0), gen = strtoull(argv[2], 0, 0),
		  idx = strtoull(argv[3], 0, 0);
	unsigned state = (unsigned)strtoul(argv[4], 0, 0);
	memset(page, 0, sizeof(page));
	vmlab_stamp_page(page, id, gen, idx, (vmlab_u16)state);
	if (vmlab_stamp_check(page) != VMLAB_STAMP_OK)
		return 3;
	fwrite(page, 1, sizeof(page), stdout);
	return 0;
}
"""


@pytest.fixture(scope="module")
def c_stamper(tmp_path_factory) -> Path:
    need_tools("gcc")
    d = tmp_path_factory.mktemp("cstamp")
    (d / "s.c").write_text(C_SRC)
    r = subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-I", str(UAPI), "-o", str(d / "s"),
                        str(d / "s.c")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return d / "s"


@pytest.mark.parametrize("bid,gen,idx,state", stamp.VECTOR_INPUTS + [(0, 0, 0, stamp.LIVE)])
def test_c_header_matches_python(c_stamper, bid, gen, idx, state):
    r = subprocess.run([str(c_stamper), hex(bid), hex(gen), hex(idx), str(state)],
                       capture_output=True, timeout=10)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout) == 4096
    assert r.stdout == stamp.stamp_page(bid, gen, idx, state)
