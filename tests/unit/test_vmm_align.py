"""host-tools/vmm-align: the LD_PRELOAD that the lab puts under the guest's QEMU for
guest.align_mappings: 2M. Built and run here as the lab builds and runs it (gcc, glibc);
the lab test (catalog entry huge-pfnmap) checks QEMU's real BAR mapping."""
from __future__ import annotations

import subprocess
from pathlib import Path

from ..prereq import need_tools

ROOT = Path(__file__).resolve().parents[2]

PROBE = r"""
#include <stdio.h>
#include <sys/mman.h>
int main(void)
{
	/* QEMU's reservation for a 2 MiB BAR: size + its 4 KiB alignment, PROT_NONE */
	for (int i = 0; i < 8; i++) {
		char *r = mmap(NULL, (2 << 20) + 4096, PROT_NONE,
			       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
		/* something else in between, so the next reservation is placed anew */
		char *rw = mmap(NULL, 12288, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (r == MAP_FAILED || rw == MAP_FAILED)
			return 2;
		printf("%lx\n", (unsigned long)r % (2 << 20));
	}
	return 0;
}
"""


def test_reservations_of_2m_or_more_start_on_2m(tmp_path):
    need_tools("gcc")
    so = tmp_path / "align.so"
    subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-shared", "-fPIC", "-o", str(so),
                    str(ROOT / "host-tools/vmm-align/vmlab_align_reserve.c"), "-ldl"], check=True)
    src = tmp_path / "probe.c"
    src.write_text(PROBE)
    exe = tmp_path / "probe"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True,
                         env={"LD_PRELOAD": str(so)}).stdout.split()
    assert len(out) == 8 and all(int(x, 16) == 0 for x in out), out
