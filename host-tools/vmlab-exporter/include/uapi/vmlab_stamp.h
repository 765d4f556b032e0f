/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * vmlab page stamp: the one definition of what every 4 KiB page of an
 * exporter buffer carries.  Used by the kernel module (writer), the guest
 * agent (reader) and mirrored by vmlab/stamp.py; host-tools/stamp-vectors.txt
 * holds test vectors that every implementation must reproduce.
 *
 * Layout of a page (little endian):
 *   [0,4)      magic       VMLAB_STAMP_MAGIC
 *   [4,6)      version     VMLAB_STAMP_VERSION
 *   [6,8)      state       VMLAB_STAMP_LIVE / VMLAB_STAMP_RETIRED
 *   [8,16)     buffer_id
 *   [16,24)    generation
 *   [24,32)    page_index
 *   [32,36)    checksum    FNV-1a 32 over [0,32) then [64,2048)
 *   [36,64)    zero
 *   [64,2048)  pattern     248 u64 words, vmlab_stamp_word(id, gen, idx, i)
 *   [2048,4096) guest area: not covered by the checksum; a move copies it.
 *               The guest agent keeps a u64 tag at offset 2048.
 *
 * A stale mapping therefore reads a page whose generation is old or whose
 * state is RETIRED: both are recognisable, and neither is somebody else's
 * memory.
 */
#ifndef _UAPI_VMLAB_STAMP_H
#define _UAPI_VMLAB_STAMP_H

#ifdef __KERNEL__
#include <linux/types.h>
#include <linux/string.h>
typedef __u8 vmlab_u8;
typedef __u16 vmlab_u16;
typedef __u32 vmlab_u32;
typedef __u64 vmlab_u64;
#else
#include <stdint.h>
#include <string.h>
typedef uint8_t vmlab_u8;
typedef uint16_t vmlab_u16;
typedef uint32_t vmlab_u32;
typedef uint64_t vmlab_u64;
#endif

#define VMLAB_STAMP_PAGE_SIZE     4096u
#define VMLAB_STAMP_MAGIC         0x424c4d56u /* "VMLB" as bytes in memory */
#define VMLAB_STAMP_VERSION       1u
#define VMLAB_STAMP_LIVE          1u
#define VMLAB_STAMP_RETIRED       2u
#define VMLAB_STAMP_HDR_SUMMED    32u   /* header bytes covered by the checksum */
#define VMLAB_STAMP_CSUM_OFF      32u
#define VMLAB_STAMP_PATTERN_OFF   64u
#define VMLAB_STAMP_GUEST_OFF     2048u
#define VMLAB_STAMP_PATTERN_WORDS ((VMLAB_STAMP_GUEST_OFF - VMLAB_STAMP_PATTERN_OFF) / 8u)

struct vmlab_stamp_hdr {
	vmlab_u32 magic;
	vmlab_u16 version;
	vmlab_u16 state;
	vmlab_u64 buffer_id;
	vmlab_u64 generation;
	vmlab_u64 page_index;
	vmlab_u32 checksum;
	vmlab_u32 zero[7];
};

static inline vmlab_u64 vmlab_splitmix64(vmlab_u64 x)
{
	vmlab_u64 z = x + 0x9e3779b97f4a7c15ull;

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static inline vmlab_u64 vmlab_stamp_word(vmlab_u64 id, vmlab_u64 gen,
					 vmlab_u64 idx, vmlab_u64 i)
{
	return vmlab_splitmix64(id * 0x9e3779b97f4a7c15ull +
				gen * 0xc2b2ae3d27d4eb4full +
				idx * 0x165667b19e3779f9ull + i);
}

static inline vmlab_u32 vmlab_fnv1a32(vmlab_u32 h, const void *p, unsigned long n)
{
	const vmlab_u8 *b = (const vmlab_u8 *)p;

	while (n--) {
		h ^= *b++;
		h *= 16777619u;
	}
	return h;
}

#define VMLAB_FNV1A32_INIT 2166136261u

/* Checksum of a stamped page; the page must be at least 2048 bytes. */
static inline vmlab_u32 vmlab_stamp_checksum(const void *page)
{
	const vmlab_u8 *p = (const vmlab_u8 *)page;
	vmlab_u32 h = vmlab_fnv1a32(VMLAB_FNV1A32_INIT, p, VMLAB_STAMP_HDR_SUMMED);

	return vmlab_fnv1a32(h, p + VMLAB_STAMP_PATTERN_OFF,
			     VMLAB_STAMP_GUEST_OFF - VMLAB_STAMP_PATTERN_OFF);
}

/* Write header and pattern; leaves the guest area untouched. x86/LE only. */
static inline void vmlab_stamp_page(void *page, vmlab_u64 id, vmlab_u64 gen,
				    vmlab_u64 idx, vmlab_u16 state)
{
	struct vmlab_stamp_hdr *h = (struct vmlab_stamp_hdr *)page;
	vmlab_u64 *w = (vmlab_u64 *)((vmlab_u8 *)page + VMLAB_STAMP_PATTERN_OFF);
	vmlab_u64 i;

	memset(h, 0, sizeof(*h));
	h->magic = VMLAB_STAMP_MAGIC;
	h->version = VMLAB_STAMP_VERSION;
	h->state = state;
	h->buffer_id = id;
	h->generation = gen;
	h->page_index = idx;
	for (i = 0; i < VMLAB_STAMP_PATTERN_WORDS; i++)
		w[i] = vmlab_stamp_word(id, gen, idx, i);
	h->checksum = vmlab_stamp_checksum(page);
}

/* Change only the state (e.g. LIVE -> RETIRED) and refresh the checksum. */
static inline void vmlab_stamp_set_state(void *page, vmlab_u16 state)
{
	struct vmlab_stamp_hdr *h = (struct vmlab_stamp_hdr *)page;

	h->state = state;
	h->checksum = vmlab_stamp_checksum(page);
}

/* 0 when header, checksum and pattern are all self-consistent. */
#define VMLAB_STAMP_OK          0
#define VMLAB_STAMP_BAD_MAGIC   1
#define VMLAB_STAMP_BAD_CSUM    2
#define VMLAB_STAMP_BAD_PATTERN 3

static inline int vmlab_stamp_check(const void *page)
{
	const struct vmlab_stamp_hdr *h = (const struct vmlab_stamp_hdr *)page;
	const vmlab_u64 *w = (const vmlab_u64 *)((const vmlab_u8 *)page + VMLAB_STAMP_PATTERN_OFF);
	vmlab_u64 i;

	if (h->magic != VMLAB_STAMP_MAGIC || h->version != VMLAB_STAMP_VERSION)
		return VMLAB_STAMP_BAD_MAGIC;
	if (h->checksum != vmlab_stamp_checksum(page))
		return VMLAB_STAMP_BAD_CSUM;
	for (i = 0; i < VMLAB_STAMP_PATTERN_WORDS; i++)
		if (w[i] != vmlab_stamp_word(h->buffer_id, h->generation, h->page_index, i))
			return VMLAB_STAMP_BAD_PATTERN;
	return VMLAB_STAMP_OK;
}

#endif /* _UAPI_VMLAB_STAMP_H */
