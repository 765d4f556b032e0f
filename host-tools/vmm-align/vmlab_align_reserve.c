// SPDX-License-Identifier: GPL-2.0
/*
 * LD_PRELOAD for the guest's QEMU in the lab (experiment key guest.align_mappings: 2M).
 *
 * QEMU maps a RAM block from an fd (ivshmem's BAR 2 from the exporter's dma-buf) into an
 * address range it first reserves with an anonymous PROT_NONE mapping, aligned only to
 * the fd's page size: 4 KiB for a dma-buf (system/physmem.c file_ram_alloc, util/
 * mmap-alloc.c qemu_ram_mmap).  KVM maps guest memory with a 2 MiB nested entry only
 * where the host virtual address is 2 MiB-aligned like the guest physical one, so a
 * huge PFNMAP in the VMM's page tables reaches the guest as 4 KiB entries unless the
 * VMM aligns.  This makes every anonymous PROT_NONE reservation of 2 MiB or more start
 * on a 2 MiB boundary, as the kernel itself did for large anonymous mappings from 6.7
 * until 6.12 limited that to sizes that are multiples of 2 MiB.  Nothing else changes.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/types.h>

#define ALIGN_2M (2UL << 20)

static void *(*real_mmap)(void *, size_t, int, int, int, off_t);

void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
	uintptr_t p, start;
	size_t head;

	if (!real_mmap)
		real_mmap = (void *(*)(void *, size_t, int, int, int, off_t))dlsym(RTLD_NEXT, "mmap");
	if (!real_mmap)
		return MAP_FAILED;
	if (addr || fd != -1 || prot != PROT_NONE || !(flags & MAP_ANONYMOUS) ||
	    (flags & MAP_FIXED) || len < ALIGN_2M || len > SIZE_MAX - ALIGN_2M)
		return real_mmap(addr, len, prot, flags, fd, off);
	p = (uintptr_t)real_mmap(NULL, len + ALIGN_2M, prot, flags, fd, off);
	if ((void *)p == MAP_FAILED)
		return MAP_FAILED;
	start = (p + ALIGN_2M - 1) & ~(uintptr_t)(ALIGN_2M - 1);
	head = start - p;
	if (head)
		munmap((void *)p, head);
	munmap((void *)(start + len), ALIGN_2M - head);
	return (void *)start;
}

void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t off)
	__attribute__((alias("mmap")));
