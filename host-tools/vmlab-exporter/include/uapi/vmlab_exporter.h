/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * /dev/vmlab-exporter: a dma-buf exporter that can be told to move a live
 * buffer.  Every ioctl, struct and constant of the interface is here and only
 * here; vmlab/exporter_uapi.py mirrors it and a test compares the two.
 *
 * A buffer is addressed by its dma-buf fd (as udmabuf and dma-heaps hand
 * them out); its u64 id is a module-wide counter (> 0, never reused within a
 * module load; each load starts it at a random multiple of 2^32, so an id
 * stamped into memory by an earlier load is unlikely to recur), is what every
 * page stamp carries, and names the buffer's retired pages in the
 * module-wide quarantine, which outlives the buffer.
 *
 * Pages are never freed while a guest may still reach them: a MIGRATE
 * retires the old pages into the quarantine, and so does closing a buffer
 * (the last reference to its dma-buf): its current pages are stamped RETIRED
 * and quarantined under its id, since a KVM that missed a zap or munmap
 * notifier may still map them.  The owner frees them with
 * VMLAB_IOC_RELEASE_QUARANTINE {id} once no guest can reach them (its VMM has
 * exited).  If the quarantine is full (max_quarantine_mb) a closing buffer's
 * pages are freed at once, counted in debugfs close_freed, warned about once.
 * Freed pages have their stamp header cleared first.
 *
 * An ioctl that fails with -EFAULT only when copying its result back may
 * already have done its work (see VMLAB_IOC_MOVE, VMLAB_IOC_RELEASE_QUARANTINE).
 *
 * All structs are fixed-size, naturally aligned, without implicit padding.
 * Every "flags"/"pad" field must be zero on input (-EINVAL otherwise) so it
 * can gain meaning later.
 */
#ifndef _UAPI_VMLAB_EXPORTER_H
#define _UAPI_VMLAB_EXPORTER_H

#include <linux/ioctl.h>
#include <linux/types.h>

#define VMLAB_EXPORTER_ABI_VERSION 5  /* 3: MIGRATE_SILENT; 4: CREATE_RO_FAULT, info.mkwrites;
					* 5: ALLOC_HUGE_PMD, page-range MOVE, info.pmd_faults */

/* caching */
#define VMLAB_CACHING_WB   0
#define VMLAB_CACHING_WC   1
#define VMLAB_CACHING_UC   2
#define VMLAB_CACHING_KEEP 0xffffffffu  /* MOVE: keep the current caching */

/* VM_PROT values of the 2022 DMA_BUF_IOCTL_INFO / DMA_BUF_INFO_VM_PROT proposal, plus UC */
#define VMLAB_VM_PROT_WC     0
#define VMLAB_VM_PROT_CACHED 1
#define VMLAB_VM_PROT_UC     2

/* alloc */
#define VMLAB_ALLOC_ORDER0      0  /* one order-0 page at a time */
#define VMLAB_ALLOC_COMPOUND    1  /* high-order, __GFP_COMP (folios) */
#define VMLAB_ALLOC_NONCOMPOUND 2  /* high-order without __GFP_COMP, as TTM pools */
/*
 * 2 MiB-aligned order-9 blocks, split into order-0 pages (each its own
 * refcount, so one can move alone), mapped with one PMD per block where the
 * mapping is 2 MiB-aligned in address and offset ("mm: Support huge pfnmaps",
 * 6.12); 4 KiB PTEs elsewhere.  size >= 2 MiB.
 */
#define VMLAB_ALLOC_HUGE_PMD    3

/* move modes */
#define VMLAB_MOVE_MIGRATE        1  /* new pages, zap, copy + gen+1, caching, quarantine old */
#define VMLAB_MOVE_MIGRATE_NO_ZAP 2  /* copy + gen+1 without any zap: the negative control */
#define VMLAB_MOVE_ZAP_ONLY       3  /* zap every mapping, keep the pages */
/*
 * As MIGRATE_NO_ZAP, but the old pages are stamped LIVE with the new generation
 * instead of RETIRED: a stale mapping the stamps cannot see (only an oracle that
 * knows which physical page an access hit can call it).  Test-only.
 */
#define VMLAB_MOVE_MIGRATE_SILENT 4

/* page_cache_mode values as reported in memtype fields (x86 enum page_cache_mode) */
#define VMLAB_MEMTYPE_WB       0
#define VMLAB_MEMTYPE_WC       1
#define VMLAB_MEMTYPE_UC_MINUS 2
#define VMLAB_MEMTYPE_UC       3
#define VMLAB_MEMTYPE_WT       4
#define VMLAB_MEMTYPE_WP       5
#define VMLAB_MEMTYPE_UNKNOWN  0xffffffffu

/* create flags */
#define VMLAB_CREATE_CLOEXEC 0x1u  /* dma-buf fd gets O_CLOEXEC */
/*
 * A read fault inserts a read-only PTE; the first write to it goes through
 * vm_ops->pfn_mkwrite, which makes it writable (counted in info.mkwrites).
 * What gem-shmem does since 7.1 (28e3918179aa), to track dirty folios.
 */
#define VMLAB_CREATE_RO_FAULT 0x2u
#define VMLAB_CREATE_FLAGS_ALL (VMLAB_CREATE_CLOEXEC | VMLAB_CREATE_RO_FAULT)

/* release flags */
#define VMLAB_RELEASE_FORCE 0x1u   /* zap the live buffer's mappings first instead of -EBUSY */
#define VMLAB_RELEASE_FLAGS_ALL (VMLAB_RELEASE_FORCE)

struct vmlab_create {
	/*
	 * in: bytes, power of two, multiple of PAGE_SIZE, <= max_buffer_mb.  The
	 * module refuses to load with max_buffer_mb above 512 GiB: its per-page
	 * arrays (8 bytes per page, kvcalloc) must stay below INT_MAX bytes.
	 * Large sizes may still fail with -ENOMEM.
	 */
	__u64 size;
	__u32 caching;  /* in: VMLAB_CACHING_{WB,WC,UC} */
	__u32 alloc;    /* in: VMLAB_ALLOC_* */
	__u32 flags;    /* in: VMLAB_CREATE_* */
	__s32 fd;       /* out: dma-buf fd */
	__u64 id;       /* out: buffer id (> 0, never reused within a module load) */
};

struct vmlab_info {
	__s32 fd;          /* in: dma-buf fd of a vmlab buffer */
	__u32 flags;       /* in: must be 0 */
	__u64 pfns_ptr;    /* in: user pointer to __u64[pfns_count], or 0 */
	__u64 pfns_count;  /* in: capacity of pfns_ptr; out: pages in the buffer */
	__u64 id;          /* out: buffer id */
	__u32 caching;     /* out: VMLAB_CACHING_* */
	__u32 vm_prot;     /* out: VMLAB_VM_PROT_* */
	__u32 alloc;       /* out: VMLAB_ALLOC_* */
	__u32 pad;         /* in: must be 0; out: 0 */
	__u64 size;        /* out */
	__u64 generation;  /* out: starts at 1 */
	__u64 faults;      /* out: fault-handler insertions */
	__u64 zaps;        /* out: unmap_mapping_range calls on the buffer's mapping */
	__u64 moves;       /* out: completed MOVE ioctls of any mode */
	__u64 mmaps;       /* out: mmap calls ever */
	__u64 live_mappings;     /* out: VMAs currently open */
	__u64 quarantined_pages; /* out: retired pages of this buffer not yet freed */
	__u64 stale_mapped;      /* out: 1 while a NO_ZAP move left retired pages mapped */
	__u64 module_pages;      /* out: pages the module holds, all buffers + quarantine */
	__u64 refaulted_pages;   /* out: distinct pages faulted in since the last zap */
	__u64 module_quarantined_pages; /* out: retired pages of every buffer, open or closed */
	__u64 leaked_pages;      /* out: pages never freed because WB could not be restored */
	__u64 mkwrites;          /* out: pfn_mkwrite calls: writes to read-only PTEs (CREATE_RO_FAULT);
				  * the core upgrades the PTE unless a MOVE zapped it meanwhile */
	__u64 create_flags;      /* out: VMLAB_CREATE_* the buffer was created with */
	__u64 pmd_faults;        /* out: ALLOC_HUGE_PMD: 2 MiB PMDs inserted, in any mapping
				  * (each also adds 512 to faults) */
};

/*
 * -EFAULT when the generation cannot be copied back comes after a completed
 * move: the buffer did move; VMLAB_IOC_INFO gives its generation.
 *
 * A page range (page_count > 0) moves only pages [first_page, first_page +
 * page_count): MIGRATE or MIGRATE_NO_ZAP, caching KEEP, on an ORDER0 or
 * HUGE_PMD buffer (pages that can be freed one by one).  The moved pages carry
 * the new generation, the others keep theirs: from then on a buffer's pages
 * may differ in generation.  MIGRATE zaps only the range, which on a PMD
 * mapping removes the whole 2 MiB entry (the rest refaults at 4 KiB: the
 * block is no longer contiguous).
 */
struct vmlab_move {
	__s32 fd;          /* in: dma-buf fd of a vmlab buffer */
	__u32 mode;        /* in: VMLAB_MOVE_* */
	__u32 caching;     /* in: new caching for MIGRATE*, or VMLAB_CACHING_KEEP */
	__u32 flags;       /* in: must be 0 */
	__u64 generation;  /* out: generation after the move (of the moved pages) */
	__u64 first_page;  /* in: first page of the range; 0 when page_count is 0 */
	__u64 page_count;  /* in: pages to move; 0 = the whole buffer */
};

/*
 * Free retired page sets.  Works whether the buffer is open or closed.
 * A set retired by MIGRATE_NO_ZAP while the buffer was mapped is "still
 * mapped" (host PTEs point at it) until the buffer's mapping is next zapped
 * or the buffer is released: then -EBUSY, unless VMLAB_RELEASE_FORCE, which
 * zaps every such live buffer's mapping first.  The sets of a closed buffer
 * include its last current pages (retired at close, never still mapped).
 * -ENOENT for an id this module load never issued.  Nothing is freed on
 * error, except -EFAULT when freed_pages cannot be copied back: the pages
 * were freed already.
 */
struct vmlab_release_quarantine {
	__u64 id;              /* in: buffer id; 0 = every buffer */
	__u64 max_generation;  /* in: free sets whose generation <= this; 0 = all */
	__u32 flags;           /* in: VMLAB_RELEASE_* */
	__u32 pad;             /* in: must be 0 */
	__u64 freed_pages;     /* out */
};

/*
 * Look up the PTE of a user address in the caller's own mm (a VM_PFNMAP
 * mapping of a vmlab buffer), so the memtype the lab kernel really gave a
 * host process's mapping is read, not assumed.
 */
struct vmlab_pte {
	__u64 addr;     /* in: user virtual address in the caller */
	__u32 flags;    /* in: must be 0 */
	__u32 memtype;  /* out: VMLAB_MEMTYPE_* from the PTE's PAT bits */
	__u64 pfn;      /* out */
	/*
	 * out: PTE value.  Before 6.12 the raw entry (follow_pte); from 6.12
	 * rebuilt as pfn_pte(pfn, pgprot) from follow_pfnmap_start(), which is
	 * equal to the raw entry for the 4 KiB x86 PTEs the module inserts.
	 */
	__u64 pte;
	__u64 pat_msr;  /* out: IA32_PAT of the CPU that answered */
	__u64 page_memtype; /* out: memtype of the backing RAM page (linear map), VMLAB_MEMTYPE_* */
};

struct vmlab_abi {
	__u32 abi_version;   /* out: VMLAB_EXPORTER_ABI_VERSION */
	__u32 page_size;     /* out */
	__u64 max_buffer_bytes;     /* out: current max_buffer_mb limit */
	__u64 max_quarantine_bytes; /* out: current max_quarantine_mb limit */
	__u32 sizeof_create, sizeof_info, sizeof_move, sizeof_release, sizeof_pte, sizeof_abi;
};

/*
 * 0xBB: no entry in Documentation/userspace-api/ioctl/ioctl-number.rst (the
 * table goes 0xB7 remoteproc_cdev.h + nsfs.h, 0xB8 mrvl_cn10k_dpi.h + mshv.h,
 * 0xBA 00-0F liveupdate.h, then 0xC0 usb/iowarrior.h), and no uapi header of
 * Debian's 7.3.4 kernel defines it as an ioctl type.  0xB7 (ABI 1) was taken
 * twice (nsfs, remoteproc).
 */
#define VMLAB_IOC_MAGIC 0xbb

#define VMLAB_IOC_ABI                _IOR(VMLAB_IOC_MAGIC, 0x00, struct vmlab_abi)
#define VMLAB_IOC_CREATE             _IOWR(VMLAB_IOC_MAGIC, 0x01, struct vmlab_create)
#define VMLAB_IOC_INFO               _IOWR(VMLAB_IOC_MAGIC, 0x02, struct vmlab_info)
#define VMLAB_IOC_MOVE               _IOWR(VMLAB_IOC_MAGIC, 0x03, struct vmlab_move)
#define VMLAB_IOC_RELEASE_QUARANTINE _IOWR(VMLAB_IOC_MAGIC, 0x04, struct vmlab_release_quarantine)
#define VMLAB_IOC_PTE                _IOWR(VMLAB_IOC_MAGIC, 0x05, struct vmlab_pte)

#endif /* _UAPI_VMLAB_EXPORTER_H */
