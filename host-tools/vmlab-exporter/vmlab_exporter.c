// SPDX-License-Identifier: GPL-2.0
/*
 * vmlab-exporter: a dma-buf exporter whose buffers can be forced to move.
 *
 * It reproduces the KVM x dma-buf stale-mapping bug class: a VMM mmaps the
 * dma-buf (VM_PFNMAP), KVM maps those pfns into a guest; on a move the
 * exporter zaps the PTEs with unmap_mapping_range() and KVM's MMU notifier
 * must zap its stage-2 entries so that the guest refaults onto the new pages.
 *
 * Control device: /dev/vmlab-exporter (root only, CAP_SYS_ADMIN).  The uapi
 * is include/uapi/vmlab_exporter.h; every 4 KiB page carries the stamp of
 * include/uapi/vmlab_stamp.h.  Buffers are addressed by their dma-buf fd.
 *
 * Modelled on drivers/dma-buf/udmabuf.c, drivers/dma-buf/heaps/system_heap.c
 * and, for moves, on TTM (ttm_bo_handle_move_mem: unmap the CPU mappings
 * before the copy, under the object's lock; ttm_bo_vm_reserve: faults wait
 * for that lock, killably; ttm_pool: set_pages_array_* for caching).
 *
 * Pages are never freed while a guest may still reach them.  A MIGRATE
 * retires the old set (stamped RETIRED) into a module-wide quarantine.  So
 * does closing a buffer (the dma-buf's release()): its current set is stamped
 * RETIRED and quarantined under the buffer's id, because a KVM that missed a
 * zap or munmap notifier (the bug class this lab hunts) may still map it, and
 * freeing it would let the guest read and write reused host memory.  The
 * controller frees a closed buffer's sets by id (VMLAB_IOC_RELEASE_QUARANTINE)
 * once the guest's QEMU is gone.  Both are bounded by max_quarantine_mb: a
 * MIGRATE past it fails with -ENOSPC; a close past it frees the set at once,
 * counts it (debugfs close_freed) and warns once.  Module unload frees all.
 *
 * Locks, in the order they nest:
 *   mmap_lock (fault) -> buf->lock -> vmlab_quarantine_lock
 *   vmlab_buffers_lock -> vmlab_quarantine_lock   (debugfs)
 * buf->lock is per buffer and may be held for a whole MOVE (allocation, zap,
 * copy); vmlab_buffers_lock and vmlab_quarantine_lock are module-wide and
 * only ever held briefly, never while waiting for a buf->lock.  mmap() does
 * not take buf->lock: it runs with mmap_lock held for write, and waiting there
 * for a long MOVE would stall every mmap_read_lock of the VMM.
 */

#ifndef CONFIG_X86_64
#error "vmlab-exporter is x86_64 only (PAT memtypes, set_pages_array_*, PAGE_SIZE 4096)"
#endif

#include <linux/atomic.h>
#include <linux/bitmap.h>
#include <linux/build_bug.h>
#include <linux/capability.h>
#include <linux/compat.h>
#include <linux/debugfs.h>
#include <linux/delay.h>
#include <linux/dma-buf.h>
#include <linux/dma-mapping.h>
#include <linux/err.h>
#include <linux/fcntl.h>
#include <linux/file.h>
#include <linux/fs.h>
#include <linux/gfp.h>
#include <linux/highmem.h>
#include <linux/huge_mm.h>
#include <linux/version.h>
/* pfn_t went away after 6.12 (vmf_insert_pfn_pmd takes a plain pfn since) */
#if __has_include(<linux/pfn_t.h>)
#include <linux/pfn_t.h>
#define VMLAB_HAVE_PFN_T 1
#endif
#if LINUX_VERSION_CODE >= KERNEL_VERSION(5, 18, 0)
#include <linux/iosys-map.h>
typedef struct iosys_map vmlab_map_t;
#define vmlab_map_set_vaddr iosys_map_set_vaddr
#elif LINUX_VERSION_CODE >= KERNEL_VERSION(5, 11, 0)
#include <linux/dma-buf-map.h>
typedef struct dma_buf_map vmlab_map_t;
#define vmlab_map_set_vaddr dma_buf_map_set_vaddr
#endif
#include <linux/kernel.h>
#include <linux/kref.h>
#include <linux/list.h>
#include <linux/log2.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/mmzone.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/overflow.h>
#include <linux/random.h>
#include <linux/scatterlist.h>
#include <linux/sched.h>
#include <linux/sched/signal.h>
#include <linux/seq_file.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/version.h>
#include <linux/vmalloc.h>

#include <asm/cacheflush.h>
#include <asm/cpufeature.h>
#include <asm/msr.h>
#include <asm/pgtable.h>
#include <asm/set_memory.h>

#include <vmlab_exporter.h>
#include <vmlab_stamp.h>

/* The uapi promises fixed sizes without implicit padding. */
static_assert(sizeof(struct vmlab_create) == 32);
static_assert(sizeof(struct vmlab_info) == 176);
static_assert(sizeof(struct vmlab_move) == 40);
static_assert(sizeof(struct vmlab_release_quarantine) == 32);
static_assert(sizeof(struct vmlab_pte) == 48);
static_assert(sizeof(struct vmlab_abi) == 48);

/* ------------------------------------------------------------------------- */
/* API drift                                                                 */

#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 8, 0)
#define VMLAB_MAX_PAGE_ORDER MAX_PAGE_ORDER
#elif LINUX_VERSION_CODE >= KERNEL_VERSION(6, 4, 0)
#define VMLAB_MAX_PAGE_ORDER MAX_ORDER		/* inclusive since 6.4 */
#else
#define VMLAB_MAX_PAGE_ORDER (MAX_ORDER - 1)	/* exclusive before 6.4 */
#endif

/*
 * Huge PFNMAP PMDs need 6.12 ("mm: Support huge pfnmaps"): before it a PFNMAP
 * PMD is not marked special, so GUP-fast would take it for a THP and grab a
 * reference on the block's first page for an access to any of its 512 pages
 * (the put goes to the subpage): a refcount imbalance on pages we own.  Older
 * kernels refuse ALLOC_HUGE_PMD (-EOPNOTSUPP) rather than risk that.
 */
#if defined(CONFIG_TRANSPARENT_HUGEPAGE) && LINUX_VERSION_CODE >= KERNEL_VERSION(6, 12, 0)
#define VMLAB_HUGE_PFNMAP 1
#endif

static inline void vmlab_vm_flags_set(struct vm_area_struct *vma, unsigned long flags)
{
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 3, 0)
	vm_flags_set(vma, flags);
#else
	vma->vm_flags |= flags;
#endif
}

#if LINUX_VERSION_CODE < KERNEL_VERSION(5, 14, 0)
/* vma_lookup() is 5.14: the VMA containing @addr, not merely the next one */
static inline struct vm_area_struct *vma_lookup(struct mm_struct *mm, unsigned long addr)
{
	struct vm_area_struct *vma = find_vma(mm, addr);

	return vma && vma->vm_start <= addr ? vma : NULL;
}
#endif

/* Drop the lock a fault runs under (mmap_lock, or the VMA lock on newer kernels). */
static inline void vmlab_release_fault_lock(struct vm_fault *vmf)
{
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 8, 0)
	release_fault_lock(vmf);
#else
	/*
	 * Here ->fault always runs under mmap_read_lock, never under the
	 * per-VMA lock (FAULT_FLAG_VMA_LOCK): before 6.4 there is no per-VMA
	 * lock; 6.4 to 6.6 either refuse non-anonymous VMAs in
	 * lock_vma_under_rcu() or, in do_read/cow/shared_fault(), drop the VMA
	 * lock and return VM_FAULT_RETRY before calling ->fault, so the fault
	 * is retried under mmap_lock; from 6.7 vmf_can_call_fault() calls
	 * ->fault under the VMA lock only for vm_ops with ->map_pages, which
	 * ours has not.  So mmap_read_unlock() is the lock to drop.
	 */
	mmap_read_unlock(vmf->vma->vm_mm);
#endif
}

#ifdef rdmsrq
#define vmlab_rdmsr64(msr, val) rdmsrq(msr, val)	/* >= 6.16 */
#else
#define vmlab_rdmsr64(msr, val) rdmsrl(msr, val)
#endif

/* ------------------------------------------------------------------------- */
/* Limits                                                                    */

/*
 * 512 GiB: the page arrays (kvcalloc, 8 bytes per 4 KiB page) must stay below
 * INT_MAX bytes, kvmalloc's limit; 1 TiB would need exactly 2 GiB.
 */
#define VMLAB_MAX_BUFFER_MB_CAP (1u << 19)
static_assert(((u64)VMLAB_MAX_BUFFER_MB_CAP << (20 - 12)) * sizeof(struct page *) <= INT_MAX);

static unsigned int max_buffer_mb = 256;
module_param(max_buffer_mb, uint, 0444);
MODULE_PARM_DESC(max_buffer_mb, "Largest buffer VMLAB_IOC_CREATE accepts, in MiB (default 256, at most 524288)");

static unsigned int max_order = 9;
module_param(max_order, uint, 0444);
MODULE_PARM_DESC(max_order, "Largest page order of COMPOUND/NONCOMPOUND allocations (default 9, <= MAX_PAGE_ORDER)");

static unsigned int max_quarantine_mb = 256;
module_param(max_quarantine_mb, uint, 0644);
MODULE_PARM_DESC(max_quarantine_mb, "Cap on retired (quarantined) pages of all buffers, in MiB; a MOVE past it fails with ENOSPC, a closed buffer's pages past it are freed at once (default 256)");

/*
 * Fault injection for the ordering test: widen MIGRATE's window between the copy of the
 * guest area and the swap. With the zap first (the only correct order) a writer that
 * touches the buffer inside the window faults and waits for the swap, so nothing is
 * lost however wide the window; with the zap after the copy, every write inside the
 * window lands on the old pages and is lost. On a one-vCPU lab the window is otherwise
 * too short for any other thread to run inside it.
 */
#define VMLAB_MOVE_WINDOW_MS_MAX 1000u
static unsigned int move_window_ms;
module_param(move_window_ms, uint, 0644);
MODULE_PARM_DESC(move_window_ms, "Test only: sleep this long inside MIGRATE between copying the guest area and the swap (default 0, at most 1000)");

/* ------------------------------------------------------------------------- */
/* Data structures                                                           */

/* One set of backing pages: the current set of a buffer, or a retired one. */
struct vmlab_pageset {
	struct list_head node;		/* in vmlab_quarantine once retired */
	struct page **pages;		/* one entry per 4 KiB page */
	struct page **chunks;		/* allocation heads, each 2^order pages */
	/*
	 * Per-page generation, or NULL when every page carries @generation.  A
	 * page-range MOVE gives the current set pages of different generations,
	 * and retires a set of just the range (@first = its first page index).
	 */
	u64 *gens;
	unsigned long first;		/* buffer page index of pages[0] */
	unsigned long npages;
	unsigned long nchunks;
	unsigned long nallocated;	/* chunks actually allocated */
	unsigned int order;
	u32 alloc;			/* VMLAB_ALLOC_* */
	/*
	 * Caching of the linear map: WB, or the WC/UC that set_pages_array_*
	 * was asked for (possibly only partly applied if it failed); anything
	 * but WB must be restored before the pages are freed.
	 */
	u32 caching;
	u64 buf_id;			/* the buffer whose stamps these pages carry */
	u64 generation;			/* the generation stamped into them (the newest, with @gens) */
	bool still_mapped;		/* retired, host PTEs may still map it; vmlab_quarantine_lock */
};

struct vmlab_buffer {
	struct list_head node;		/* in vmlab_buffers, vmlab_buffers_lock */
	struct kref ref;		/* the dma-buf's, plus short-lived lookups by id */
	struct mutex lock;		/* pages, generation, counters below */
	struct dma_buf *dmabuf;
	/*
	 * The dma-buf file's address_space, kept alive by a reference on its
	 * inode: the file itself may be freed before our release() runs (it
	 * runs from the dentry's d_release), the inode not while we hold it.
	 */
	struct address_space *mapping;
	struct inode *inode;
	u64 id;
	u64 size;
	unsigned long npages;
	u32 alloc;
	u32 caching;			/* of the current page set */
	u64 generation;
	struct vmlab_pageset *cur;
	unsigned long *faulted;		/* pages faulted in since the last zap */
	unsigned long refaulted;	/* weight of @faulted */
	unsigned int mapped_attachments;
	unsigned int vmaps;
	void *vaddr;
	bool stale_mapped;		/* a retired set of ours is still mapped */
	bool released;			/* release() ran: no mapping, no pages */
	bool published;			/* its fd reached user space: close quarantines */
	u64 zaps;
	u64 moves;
	u32 create_flags;		/* VMLAB_CREATE_*, fixed at create */
	/* touched from vm_ops without the buffer lock */
	atomic64_t faults;
	atomic64_t mkwrites;
	atomic64_t pmd_faults;
	atomic64_t mmaps;
	atomic64_t live_mappings;
};

/* Live buffers, for debugfs and FORCE releases: never held while waiting. */
static DEFINE_MUTEX(vmlab_buffers_lock);
static LIST_HEAD(vmlab_buffers);

/* Retired page sets of every buffer, open or closed. */
static DEFINE_MUTEX(vmlab_quarantine_lock);
static LIST_HEAD(vmlab_quarantine);
static unsigned long vmlab_quarantine_committed;	/* quarantined + reserved by MOVEs in flight */

/*
 * Buffer ids: vmlab_first_id is a random multiple of 2^32 drawn at load, ids
 * of this load are vmlab_first_id + 1, + 2, ...: > 0, unique within a load,
 * and unlikely to match an id stamped into memory by an earlier load.
 */
static u64 vmlab_first_id;
static atomic64_t vmlab_last_id = ATOMIC64_INIT(0);
static atomic_long_t vmlab_module_pages = ATOMIC_LONG_INIT(0);
static atomic_long_t vmlab_quarantined_pages = ATOMIC_LONG_INIT(0);
static atomic_long_t vmlab_leaked_pages = ATOMIC_LONG_INIT(0);
/* pages of closed buffers freed at once because the quarantine was full */
static atomic_long_t vmlab_close_freed_pages = ATOMIC_LONG_INIT(0);
/* pages whose stamp was not the module's own when retired: left untouched */
static atomic_long_t vmlab_corrupt_retired_pages = ATOMIC_LONG_INIT(0);
static struct dentry *vmlab_debugfs;
static const struct dma_buf_ops vmlab_dmabuf_ops;
static const struct vm_operations_struct vmlab_vm_ops;
#ifdef VMLAB_HUGE_PFNMAP
static const struct vm_operations_struct vmlab_vm_ops_huge;
#endif

/* ------------------------------------------------------------------------- */
/* Caching                                                                   */

static pgprot_t vmlab_prot(pgprot_t prot, u32 caching)
{
	switch (caching) {
	case VMLAB_CACHING_WC:
		return pgprot_writecombine(prot);
	case VMLAB_CACHING_UC:
		return pgprot_noncached(prot);
	default:
		return prot;
	}
}

/*
 * On x86 the memtype of a RAM page (its linear map, reserved with
 * set_pages_array_*) overrides the cache bits of any other mapping of it, so
 * WC/UC buffers change the linear map of the whole page array in one call,
 * as ttm_pool_apply_caching() does.
 */
static int vmlab_pageset_set_caching(struct vmlab_pageset *ps, u32 caching)
{
	if (caching == VMLAB_CACHING_WB)
		return 0;
	/* from here on the free path restores WB, also after a partial failure */
	ps->caching = caching;
	if (caching == VMLAB_CACHING_WC)
		return set_pages_array_wc(ps->pages, ps->npages);
	return set_pages_array_uc(ps->pages, ps->npages);
}

/* ------------------------------------------------------------------------- */
/* Page sets                                                                 */

/*
 * Free a page set.  A page whose linear map could not be set back to WB is
 * never freed (the next owner would inherit WC/UC): it is leaked, counted
 * and warned about once (pr_warn, not WARN: a lab may run panic_on_warn).
 * The stamp header of every freed page is cleared first, so that a stale
 * read of the page after reuse never finds a (buffer id, generation) stamp.
 */
static void vmlab_pageset_free(struct vmlab_pageset *ps)
{
	unsigned long i, j, n = ps->nallocated << ps->order, leaked = 0;
	bool wb = ps->caching == VMLAB_CACHING_WB || !set_pages_array_wb(ps->pages, n);

	for (i = 0; i < ps->nallocated; i++) {
		/* the batch failed: retry chunk by chunk, leak what still fails */
		if (!wb && set_pages_array_wb(ps->pages + (i << ps->order), 1 << ps->order)) {
			leaked += 1UL << ps->order;
			continue;
		}
		/* linear map WB again: plain stores */
		for (j = 0; j < (1UL << ps->order); j++)
			memset(page_address(ps->chunks[i] + j), 0, sizeof(struct vmlab_stamp_hdr));
		__free_pages(ps->chunks[i], ps->order);
		if (!(i & 255))
			cond_resched();
	}
	atomic_long_sub(n, &vmlab_module_pages);
	if (leaked) {
		atomic_long_add(leaked, &vmlab_leaked_pages);
		pr_warn_once("vmlab-exporter: could not restore WB on %lu pages; leaking them\n",
			     leaked);
	}
	kvfree(ps->gens);
	kvfree(ps->chunks);
	kvfree(ps->pages);
	kfree(ps);
}

/* Allocate zeroed pages per strategy, linear map still WB. */
static struct vmlab_pageset *vmlab_pageset_alloc(unsigned long npages, u32 alloc)
{
	const gfp_t arr_gfp = GFP_KERNEL | __GFP_NOWARN | __GFP_RETRY_MAYFAIL;
	struct vmlab_pageset *ps;
	unsigned long i, j, n = 0;
	int ret = -ENOMEM;
	gfp_t gfp;

	ps = kzalloc(sizeof(*ps), GFP_KERNEL);
	if (!ps)
		return ERR_PTR(-ENOMEM);
	INIT_LIST_HEAD(&ps->node);
	ps->npages = npages;
	ps->alloc = alloc;
	ps->caching = VMLAB_CACHING_WB;
	if (alloc == VMLAB_ALLOC_ORDER0 || alloc == VMLAB_ALLOC_HUGE_PMD)
		ps->order = 0;	/* HUGE_PMD: order-9 blocks split into order-0 chunks */
	else
		ps->order = min3((unsigned int)ilog2(npages), max_order,
				 (unsigned int)VMLAB_MAX_PAGE_ORDER);
	ps->nchunks = npages >> ps->order;

	ps->pages = kvcalloc(npages, sizeof(*ps->pages), arr_gfp);
	if (!ps->pages)
		goto err_free_ps;
	ps->chunks = kvcalloc(ps->nchunks, sizeof(*ps->chunks), arr_gfp);
	if (!ps->chunks)
		goto err_free_pages_array;

	/* __GFP_RETRY_MAYFAIL: fail with -ENOMEM rather than invoke the OOM killer */
	gfp = GFP_KERNEL | __GFP_ZERO | __GFP_NOWARN | __GFP_RETRY_MAYFAIL;
	if (alloc == VMLAB_ALLOC_COMPOUND && ps->order)
		gfp |= __GFP_COMP;
#ifdef VMLAB_HUGE_PFNMAP
	if (alloc == VMLAB_ALLOC_HUGE_PMD) {
		/* the caller checked: npages is a multiple of HPAGE_PMD_NR */
		for (i = 0; i < ps->nchunks; i += HPAGE_PMD_NR) {
			struct page *block = alloc_pages(gfp, HPAGE_PMD_ORDER);

			if (!block)
				goto err_free_chunks;
			/* order-0 pages with a refcount each: any one can move (and be freed) alone */
			split_page(block, HPAGE_PMD_ORDER);
			for (j = 0; j < HPAGE_PMD_NR; j++)
				ps->chunks[i + j] = ps->pages[i + j] = block + j;
			ps->nallocated = i + HPAGE_PMD_NR;
			atomic_long_add(HPAGE_PMD_NR, &vmlab_module_pages);
			if (fatal_signal_pending(current)) {
				ret = -EINTR;
				goto err_free_chunks;
			}
			cond_resched();
		}
		return ps;
	}
#endif
	for (i = 0; i < ps->nchunks; i++) {
		struct page *chunk = alloc_pages(gfp, ps->order);

		if (!chunk)
			goto err_free_chunks;
		ps->chunks[i] = chunk;
		ps->nallocated = i + 1;
		atomic_long_add(1UL << ps->order, &vmlab_module_pages);
		for (j = 0; j < (1UL << ps->order); j++)
			ps->pages[n++] = chunk + j;
		if (fatal_signal_pending(current)) {
			ret = -EINTR;
			goto err_free_chunks;
		}
		cond_resched();
	}
	return ps;

err_free_chunks:
	vmlab_pageset_free(ps);		/* frees the arrays and @ps too */
	return ERR_PTR(ret);
err_free_pages_array:
	kvfree(ps->pages);
err_free_ps:
	kfree(ps);
	return ERR_PTR(ret);
}

/*
 * Stamp every page LIVE with (id, gen); if @from, copy its guest area.  The
 * caller guarantees that nothing maps @from any more (MIGRATE zapped it) or
 * accepts that later writes to it are lost (the NO_ZAP negative control).
 *
 * @ps is still WB here (its caching is set afterwards, and set_pages_array_*
 * flushes the caches of the pages it changes), so the destination needs no
 * flush.  A WC/UC @from is read through its WC/UC linear map while KVM may
 * map the same RAM WB: on a CPU without self-snoop a dirty line of that WB
 * alias would be missed, so the source guest area is clflushed (written back
 * and invalidated) before the copy, as drm_clflush_virt_range() does.
 */
static void vmlab_pageset_stamp(struct vmlab_pageset *ps, u64 id, u64 gen,
				struct vmlab_pageset *from)
{
	const unsigned int guest_len = VMLAB_STAMP_PAGE_SIZE - VMLAB_STAMP_GUEST_OFF;
	bool flush_src = from && from->caching != VMLAB_CACHING_WB;
	unsigned long i;

	ps->buf_id = id;
	ps->generation = gen;
	for (i = 0; i < ps->npages; i++) {
		u8 *dst = page_address(ps->pages[i]);

		vmlab_stamp_page(dst, id, gen, ps->first + i, VMLAB_STAMP_LIVE);
		if (from) {
			u8 *src = page_address(from->pages[ps->first - from->first + i]);

			if (flush_src)
				clflush_cache_range(src + VMLAB_STAMP_GUEST_OFF, guest_len);
			memcpy(dst + VMLAB_STAMP_GUEST_OFF, src + VMLAB_STAMP_GUEST_OFF, guest_len);
		}
		if (!(i & 255))
			cond_resched();
	}
}

/*
 * Page @i of @ps: LIVE -> RETIRED, but only if it still holds exactly the
 * stamp the module wrote (magic, version, LIVE, the set's id and generation,
 * index @i, pattern and checksum: vmlab_stamp_check() plus the identity).
 * Anything else is evidence of a stale writer: the page is left untouched
 * (false) rather than re-validated by a fresh checksum.
 *
 * The header is read once into @hdr and both checksums (old, to verify; new,
 * to write) are computed from @hdr and the expected pattern words, never
 * from the page again, so a write that lands while we work is not folded
 * into the new checksum: it stays visible as a bad checksum or pattern.
 *
 * Publishing: state (bytes 6-7) and checksum (32-35) are in different 8-byte
 * words, so no single store can change both (cmpxchg16b covers [0,16) or
 * [32,48), and locked operations are not for WC memory anyway); rewriting
 * the whole header from a local buffer would change these same two fields
 * with no order at all.  So two ordered stores: checksum first, then state,
 * with wmb() between (WC stores may otherwise be reordered or combined).
 * The only intermediate a reader can see is LIVE with RETIRED's checksum;
 * FNV-1a of inputs that differ in one byte always differs, so it fails the
 * checksum and is reported BAD_CSUM (the oracle's TORN), never a valid page.
 * A reader that copies the header in ascending order (the guest agent does)
 * and sees RETIRED has read the new checksum too: RETIRED is never torn.
 */
static bool vmlab_page_retire(struct vmlab_pageset *ps, unsigned long i)
{
	u8 *page = page_address(ps->pages[i]);
	const u64 *pattern = (const u64 *)(page + VMLAB_STAMP_PATTERN_OFF);
	struct vmlab_stamp_hdr *h = (struct vmlab_stamp_hdr *)page;
	bool wb = ps->caching == VMLAB_CACHING_WB;
	struct vmlab_stamp_hdr hdr;
	u32 csum_old, csum_new;
	u64 k, word;

	static_assert(sizeof(hdr) == 64);
	static_assert(offsetof(struct vmlab_stamp_hdr, checksum) == VMLAB_STAMP_CSUM_OFF);
	/* see vmlab_pageset_stamp(): a WB alias may hold a dirty line */
	if (!wb)
		clflush_cache_range(page, sizeof(hdr));
	memcpy(&hdr, page, sizeof(hdr));
	if (hdr.magic != VMLAB_STAMP_MAGIC || hdr.version != VMLAB_STAMP_VERSION ||
	    hdr.state != VMLAB_STAMP_LIVE || hdr.buffer_id != ps->buf_id ||
	    hdr.generation != (ps->gens ? ps->gens[i] : ps->generation) ||
	    hdr.page_index != ps->first + i)
		return false;
	csum_old = vmlab_fnv1a32(VMLAB_FNV1A32_INIT, &hdr, VMLAB_STAMP_HDR_SUMMED);
	hdr.state = VMLAB_STAMP_RETIRED;
	csum_new = vmlab_fnv1a32(VMLAB_FNV1A32_INIT, &hdr, VMLAB_STAMP_HDR_SUMMED);
	for (k = 0; k < VMLAB_STAMP_PATTERN_WORDS; k++) {
		word = vmlab_stamp_word(hdr.buffer_id, hdr.generation, hdr.page_index, k);
		if (READ_ONCE(pattern[k]) != word)
			return false;
		/* little endian: the bytes of @word are the bytes in the page */
		csum_old = vmlab_fnv1a32(csum_old, &word, sizeof(word));
		csum_new = vmlab_fnv1a32(csum_new, &word, sizeof(word));
	}
	if (csum_old != hdr.checksum)
		return false;

	WRITE_ONCE(h->checksum, csum_new);
	wmb();
	WRITE_ONCE(h->state, (u16)VMLAB_STAMP_RETIRED);
	if (!wb) {
		wmb();		/* drain the WC buffers */
		clflush_cache_range(page, sizeof(hdr));	/* no stale line in a WB alias */
	}
	return true;
}

/* Stamp every page of @ps RETIRED; pages with a foreign stamp are counted. */
static void vmlab_pageset_retire(struct vmlab_pageset *ps)
{
	unsigned long i, corrupt = 0;

	for (i = 0; i < ps->npages; i++) {
		if (!vmlab_page_retire(ps, i))
			corrupt++;
		if (!(i & 255))
			cond_resched();
	}
	if (corrupt) {
		atomic_long_add(corrupt, &vmlab_corrupt_retired_pages);
		pr_warn_ratelimited("vmlab-exporter: buffer %llu generation %llu: %lu of %lu pages had a foreign stamp when retired; left untouched\n",
				    ps->buf_id, ps->generation, corrupt, ps->npages);
	}
}

/* ------------------------------------------------------------------------- */
/* Quarantine: module-wide, outlives the buffers                             */

static unsigned long vmlab_quarantine_cap_pages(void)
{
	return (unsigned long)READ_ONCE(max_quarantine_mb) << (20 - PAGE_SHIFT);
}

/* Reserve room for @n retired pages before a MOVE touches anything. */
static int vmlab_quarantine_reserve(unsigned long n)
{
	int ret = 0;

	mutex_lock(&vmlab_quarantine_lock);
	if (vmlab_quarantine_committed + n > vmlab_quarantine_cap_pages())
		ret = -ENOSPC;
	else
		vmlab_quarantine_committed += n;
	mutex_unlock(&vmlab_quarantine_lock);
	return ret;
}

static void vmlab_quarantine_unreserve(unsigned long n)
{
	mutex_lock(&vmlab_quarantine_lock);
	vmlab_quarantine_committed -= n;
	mutex_unlock(&vmlab_quarantine_lock);
}

/* Turn a reservation into a quarantined (already RETIRED) set. */
static void vmlab_quarantine_add(struct vmlab_pageset *ps, bool still_mapped)
{
	mutex_lock(&vmlab_quarantine_lock);
	ps->still_mapped = still_mapped;
	list_add_tail(&ps->node, &vmlab_quarantine);
	atomic_long_add(ps->npages, &vmlab_quarantined_pages);
	mutex_unlock(&vmlab_quarantine_lock);
}

/* No host PTE maps any retired set of buffer @id any more. */
static void vmlab_quarantine_unmark(u64 id)
{
	struct vmlab_pageset *ps;

	mutex_lock(&vmlab_quarantine_lock);
	list_for_each_entry(ps, &vmlab_quarantine, node)
		if (ps->buf_id == id)
			ps->still_mapped = false;
	mutex_unlock(&vmlab_quarantine_lock);
}

static unsigned long vmlab_quarantine_pages_of(u64 id)
{
	struct vmlab_pageset *ps;
	unsigned long n = 0;

	mutex_lock(&vmlab_quarantine_lock);
	list_for_each_entry(ps, &vmlab_quarantine, node)
		if (ps->buf_id == id)
			n += ps->npages;
	mutex_unlock(&vmlab_quarantine_lock);
	return n;
}

static bool vmlab_quarantine_match(const struct vmlab_pageset *ps, u64 id, u64 max_gen)
{
	return (!id || ps->buf_id == id) && (!max_gen || ps->generation <= max_gen);
}

/*
 * Move the matching sets to @out, unless one of them is still mapped: then
 * take nothing and return that set's buffer id.
 */
static u64 vmlab_quarantine_take(u64 id, u64 max_gen, struct list_head *out,
				 unsigned long *pages)
{
	struct vmlab_pageset *ps, *tmp;
	u64 busy = 0;

	*pages = 0;
	mutex_lock(&vmlab_quarantine_lock);
	list_for_each_entry(ps, &vmlab_quarantine, node) {
		if (vmlab_quarantine_match(ps, id, max_gen) && ps->still_mapped) {
			busy = ps->buf_id;
			goto out;
		}
	}
	list_for_each_entry_safe(ps, tmp, &vmlab_quarantine, node) {
		if (!vmlab_quarantine_match(ps, id, max_gen))
			continue;
		list_move_tail(&ps->node, out);
		*pages += ps->npages;
	}
	vmlab_quarantine_committed -= *pages;
	atomic_long_sub(*pages, &vmlab_quarantined_pages);
out:
	mutex_unlock(&vmlab_quarantine_lock);
	return busy;
}

/*
 * The smallest buffer id > @after owning a still-mapped set that matches
 * (@id, @max_gen), or 0: walks every busy buffer once, in id order.
 */
static u64 vmlab_quarantine_next_busy(u64 id, u64 max_gen, u64 after)
{
	struct vmlab_pageset *ps;
	u64 next = 0;

	mutex_lock(&vmlab_quarantine_lock);
	list_for_each_entry(ps, &vmlab_quarantine, node)
		if (ps->still_mapped && ps->buf_id > after &&
		    vmlab_quarantine_match(ps, id, max_gen) && (!next || ps->buf_id < next))
			next = ps->buf_id;
	mutex_unlock(&vmlab_quarantine_lock);
	return next;
}

static void vmlab_pageset_free_list(struct list_head *list)
{
	struct vmlab_pageset *ps, *tmp;

	list_for_each_entry_safe(ps, tmp, list, node) {
		list_del(&ps->node);
		vmlab_pageset_free(ps);
		cond_resched();
	}
}

/* ------------------------------------------------------------------------- */
/* Buffers                                                                   */

static void vmlab_buffer_free(struct kref *ref)
{
	struct vmlab_buffer *buf = container_of(ref, struct vmlab_buffer, ref);

	kvfree(buf->faulted);
	mutex_destroy(&buf->lock);
	kfree(buf);
}

/*
 * The vmlab buffer behind dma-buf fd @fd, with a reference on the dma-buf
 * (drop it with dma_buf_put()): -EBADF for no such fd, -EINVAL for an fd
 * that is not a vmlab dma-buf.
 */
static struct dma_buf *vmlab_dmabuf_get(int fd)
{
	struct dma_buf *dmabuf = dma_buf_get(fd);

	if (IS_ERR(dmabuf))
		return dmabuf;
	if (dmabuf->ops != &vmlab_dmabuf_ops) {
		dma_buf_put(dmabuf);
		return ERR_PTR(-EINVAL);
	}
	return dmabuf;
}

/*
 * Zap every user mapping of the buffer: host PTEs, and through the MMU
 * notifiers every secondary MMU (KVM) built on them.  Afterwards no PTE maps
 * any page set of the buffer; faults (blocked on buf->lock) map buf->cur.
 */
static void vmlab_zap_locked(struct vmlab_buffer *buf)
{
	lockdep_assert_held(&buf->lock);
	unmap_mapping_range(buf->mapping, 0, buf->size, 1);
	WRITE_ONCE(buf->zaps, buf->zaps + 1);
	bitmap_zero(buf->faulted, buf->npages);
	WRITE_ONCE(buf->refaulted, 0);
	WRITE_ONCE(buf->stale_mapped, false);
	vmlab_quarantine_unmark(buf->id);
}

/*
 * Zap pages [first, first + count) only.  A PMD that maps part of the range
 * goes entirely (the core splits a special PMD by clearing it), so pages
 * around the range refault too.  Earlier NO_ZAP marks stay: a PTE of a retired
 * full set may sit outside the range.
 */
static void vmlab_zap_range_locked(struct vmlab_buffer *buf, unsigned long first,
				   unsigned long count)
{
	lockdep_assert_held(&buf->lock);
	unmap_mapping_range(buf->mapping, (loff_t)first << PAGE_SHIFT,
			    (loff_t)count << PAGE_SHIFT, 1);
	WRITE_ONCE(buf->zaps, buf->zaps + 1);
	bitmap_clear(buf->faulted, first, count);
	WRITE_ONCE(buf->refaulted, bitmap_weight(buf->faulted, buf->npages));
}

/* FORCE release: zap the mapping of live buffer @id, if it is still live. */
static int vmlab_zap_by_id(u64 id)
{
	struct vmlab_buffer *buf, *found = NULL;
	int ret = 0;

	mutex_lock(&vmlab_buffers_lock);
	list_for_each_entry(buf, &vmlab_buffers, node) {
		if (buf->id == id) {
			kref_get(&buf->ref);
			found = buf;
			break;
		}
	}
	mutex_unlock(&vmlab_buffers_lock);
	/* not listed: release() ran, it unmarked the sets (no VMA is left) */
	if (!found)
		return 0;

	if (mutex_lock_killable(&found->lock)) {
		ret = -EINTR;
		goto out_put;
	}
	if (!found->released)
		vmlab_zap_locked(found);
	mutex_unlock(&found->lock);
out_put:
	kref_put(&found->ref, vmlab_buffer_free);
	return ret;
}

/*
 * The old set of a MIGRATE_SILENT move: every page restamped LIVE as page @i of
 * generation @gen, exactly as the new set's page @i (the guest areas are equal:
 * the new set was copied from this one).  The set keeps its own generation for
 * the quarantine.  Each stamp is built in @scratch and copied in one pass (a
 * reader racing it may still see a torn stamp: TORN, never a valid old one);
 * on a WC/UC set the stores are fenced and the WB alias that KVM may map is
 * flushed, as vmlab_page_retire() does.
 */
static void vmlab_pageset_restamp_live(struct vmlab_pageset *ps, u64 id, u64 gen,
				       u8 *scratch)
{
	unsigned long i;

	WARN_ON_ONCE(ps->first);	/* whole sets only: page i is buffer page i */
	for (i = 0; i < ps->npages; i++) {
		u8 *page = page_address(ps->pages[i]);

		vmlab_stamp_page(scratch, id, gen, i, VMLAB_STAMP_LIVE);
		memcpy(page, scratch, VMLAB_STAMP_GUEST_OFF);
		if (ps->caching != VMLAB_CACHING_WB) {
			wmb();
			clflush_cache_range(page, VMLAB_STAMP_GUEST_OFF);
		}
		if (!(i & 255))
			cond_resched();
	}
}

/*
 * MIGRATE, MIGRATE_NO_ZAP and MIGRATE_SILENT.  MIGRATE zaps before it reads
 * the old pages: until the zap the VMM's PTEs and KVM's sptes can still write
 * them, and a write after the copy would be lost.  From the zap to the swap
 * every fault waits on buf->lock, then maps the new pages.
 */
static int vmlab_migrate_locked(struct vmlab_buffer *buf, u32 caching, u32 mode)
{
	struct vmlab_pageset *old = buf->cur, *new;
	bool zap = mode == VMLAB_MOVE_MIGRATE;
	bool still_mapped = false;
	u8 *scratch = NULL;
	int ret;

	lockdep_assert_held(&buf->lock);
	/* devices and kernel mappings hold the old pages: refuse to move */
	if (buf->mapped_attachments || buf->vmaps)
		return -EBUSY;
	if (mode == VMLAB_MOVE_MIGRATE_SILENT) {
		scratch = kmalloc(VMLAB_STAMP_GUEST_OFF, GFP_KERNEL);
		if (!scratch)
			return -ENOMEM;
	}
	ret = vmlab_quarantine_reserve(old->npages);
	if (ret)
		goto err_scratch;

	new = vmlab_pageset_alloc(buf->npages, buf->alloc);
	if (IS_ERR(new)) {
		ret = PTR_ERR(new);
		goto err_unreserve;
	}
	if (zap)
		vmlab_zap_locked(buf);
	else	/* some PTE may map the old set: it has a VMA and a fault since the last zap */
		still_mapped = atomic64_read(&buf->live_mappings) > 0 && buf->refaulted > 0;

	vmlab_pageset_stamp(new, buf->id, buf->generation + 1, old);
	if (READ_ONCE(move_window_ms))
		msleep(min(READ_ONCE(move_window_ms), VMLAB_MOVE_WINDOW_MS_MAX));
	ret = vmlab_pageset_set_caching(new, caching);
	if (ret)
		goto err_free_new;

	buf->cur = new;
	WRITE_ONCE(buf->caching, caching);
	WRITE_ONCE(buf->generation, buf->generation + 1);
	if (still_mapped)
		WRITE_ONCE(buf->stale_mapped, true);

	/* a stale mapping may still reach the old pages: retire, never free */
	if (scratch)
		vmlab_pageset_restamp_live(old, buf->id, buf->generation, scratch);
	else
		vmlab_pageset_retire(old);
	vmlab_quarantine_add(old, still_mapped);
	kfree(scratch);
	return 0;

err_free_new:
	vmlab_pageset_free(new);
err_unreserve:
	vmlab_quarantine_unreserve(old->npages);
err_scratch:
	kfree(scratch);
	return ret;
}

/*
 * A page-range MIGRATE or MIGRATE_NO_ZAP: pages [first, first + count) move to
 * new order-0 pages stamped with the next generation, in the same order as a
 * whole MIGRATE (zap, copy, caching, swap); the others keep page and
 * generation.  The range's old pages become a set of their own (@first,
 * per-page @gens), retired and quarantined like a whole old set.  The caller
 * checked that every page of the buffer is its own order-0 chunk.
 */
static int vmlab_migrate_range_locked(struct vmlab_buffer *buf, unsigned long first,
				      unsigned long count, u32 mode)
{
	const gfp_t gfp = GFP_KERNEL | __GFP_NOWARN | __GFP_RETRY_MAYFAIL;
	struct vmlab_pageset *cur = buf->cur, *part;
	u64 gen = buf->generation + 1, newest_old = 0;
	bool still_mapped = false;
	unsigned long i;
	int ret;

	lockdep_assert_held(&buf->lock);
	if (buf->mapped_attachments || buf->vmaps)
		return -EBUSY;
	if (!cur->gens) {	/* uniform until now; harmless to keep if we fail below */
		cur->gens = kvmalloc_array(cur->npages, sizeof(*cur->gens), gfp);
		if (!cur->gens)
			return -ENOMEM;
		for (i = 0; i < cur->npages; i++)
			cur->gens[i] = cur->generation;
	}
	ret = vmlab_quarantine_reserve(count);
	if (ret)
		return ret;
	part = vmlab_pageset_alloc(count, VMLAB_ALLOC_ORDER0);
	if (IS_ERR(part)) {
		ret = PTR_ERR(part);
		goto err_unreserve;
	}
	part->gens = kvmalloc_array(count, sizeof(*part->gens), gfp);
	if (!part->gens) {
		ret = -ENOMEM;
		goto err_free_part;
	}
	part->first = first;

	if (mode == VMLAB_MOVE_MIGRATE)
		vmlab_zap_range_locked(buf, first, count);
	else
		still_mapped = atomic64_read(&buf->live_mappings) > 0 && buf->refaulted > 0;

	vmlab_pageset_stamp(part, buf->id, gen, cur);
	if (READ_ONCE(move_window_ms))
		msleep(min(READ_ONCE(move_window_ms), VMLAB_MOVE_WINDOW_MS_MAX));
	ret = vmlab_pageset_set_caching(part, buf->caching);
	if (ret)
		goto err_free_part;

	/* swap: @part takes the range's old pages (order 0: chunk == page) */
	for (i = 0; i < count; i++) {
		struct page *old = cur->pages[first + i];

		part->gens[i] = cur->gens[first + i];
		newest_old = max(newest_old, part->gens[i]);
		cur->pages[first + i] = cur->chunks[first + i] = part->pages[i];
		cur->gens[first + i] = gen;
		part->pages[i] = part->chunks[i] = old;
	}
	part->generation = newest_old;	/* RELEASE_QUARANTINE matches on it */
	cur->generation = gen;
	WRITE_ONCE(buf->generation, gen);
	if (still_mapped)
		WRITE_ONCE(buf->stale_mapped, true);

	vmlab_pageset_retire(part);
	vmlab_quarantine_add(part, still_mapped);
	return 0;

err_free_part:
	vmlab_pageset_free(part);
err_unreserve:
	vmlab_quarantine_unreserve(count);
	return ret;
}

/* ------------------------------------------------------------------------- */
/* mmap                                                                      */

/*
 * The current set of a buffer being closed (no VMA, attachment or vmap is
 * left, nothing else can reach @ps).  A secondary MMU that missed a zap or
 * the munmap may still map it, so it is retired and quarantined under the
 * buffer's id like a MIGRATE's old set, until the controller releases it by
 * id.  Not still_mapped: no host PTE is left.  Freed at once only if the
 * buffer never reached user space (CREATE failed after the export) or the
 * quarantine is full (counted, warned about once).
 */
static void vmlab_pageset_close(struct vmlab_pageset *ps, bool published)
{
	if (!published) {
		vmlab_pageset_free(ps);
		return;
	}
	if (vmlab_quarantine_reserve(ps->npages)) {
		atomic_long_add(ps->npages, &vmlab_close_freed_pages);
		pr_warn_once("vmlab-exporter: quarantine full (max_quarantine_mb): freeing the pages of closed buffer %llu at once\n",
			     ps->buf_id);
		vmlab_pageset_free(ps);
		return;
	}
	vmlab_pageset_retire(ps);
	vmlab_quarantine_add(ps, false);
}

static void vmlab_vm_open(struct vm_area_struct *vma)
{
	struct vmlab_buffer *buf = vma->vm_private_data;

	atomic64_inc(&buf->live_mappings);
}

static void vmlab_vm_close(struct vm_area_struct *vma)
{
	struct vmlab_buffer *buf = vma->vm_private_data;

	atomic64_dec(&buf->live_mappings);
}

/*
 * A MOVE holds buf->lock from its zap to the swap; a fault waits for it as
 * ttm_bo_vm_reserve() waits for the BO's reservation: on the first attempt
 * with the fault lock dropped and VM_FAULT_RETRY (the file pinned meanwhile),
 * else killably, returning VM_FAULT_NOPAGE (nothing mapped) when killed.
 * Returns 0 with buf->lock held.
 */
static vm_fault_t vmlab_fault_lock(struct vm_fault *vmf, struct vmlab_buffer *buf)
{
	struct file *file;

	if (mutex_trylock(&buf->lock))
		return 0;
	if (fault_flag_allow_retry_first(vmf->flags)) {
		if (!(vmf->flags & FAULT_FLAG_RETRY_NOWAIT)) {
			file = get_file(vmf->vma->vm_file);
			vmlab_release_fault_lock(vmf);
			if (!mutex_lock_killable(&buf->lock))
				mutex_unlock(&buf->lock);
			fput(file);
		}
		return VM_FAULT_RETRY;
	}
	if (mutex_lock_killable(&buf->lock))
		return VM_FAULT_NOPAGE;
	return 0;
}

static vm_fault_t vmlab_vm_fault(struct vm_fault *vmf)
{
	struct vm_area_struct *vma = vmf->vma;
	struct vmlab_buffer *buf = vma->vm_private_data;
	pgprot_t prot;
	vm_fault_t ret;

	ret = vmlab_fault_lock(vmf, buf);
	if (ret)
		return ret;
	if (vmf->pgoff >= buf->npages) {
		ret = VM_FAULT_SIGBUS;
		goto out;
	}
#ifdef VMLAB_HUGE_PFNMAP
	/*
	 * Another fault mapped this block with a PMD since the core found the PMD empty
	 * (ours fell back, e.g. while a range move had broken the block, and waited here
	 * for a MIGRATE that made it whole again): insert_pfn() would find no page table
	 * and answer VM_FAULT_OOM, which KVM's fixup_user_fault() turns into -ENOMEM.
	 * PMDs are only inserted under buf->lock; the access retries and finds this one.
	 */
	if (vma->vm_ops == &vmlab_vm_ops_huge && pmd_leaf(pmdp_get_lockless(vmf->pmd))) {
		ret = VM_FAULT_NOPAGE;
		goto out;
	}
#endif
	/*
	 * RO_FAULT: a read fault maps read-only whatever the VMA allows, so the
	 * first write comes back through vmlab_pfn_mkwrite (as gem-shmem's does).
	 */
	if ((buf->create_flags & VMLAB_CREATE_RO_FAULT) && !(vmf->flags & FAULT_FLAG_WRITE))
		prot = vm_get_page_prot(vma->vm_flags & ~VM_WRITE);
	else
		prot = vm_get_page_prot(vma->vm_flags);
	prot = vmlab_prot(prot, buf->caching);
	ret = vmf_insert_pfn_prot(vma, vmf->address,
				  page_to_pfn(buf->cur->pages[vmf->pgoff]), prot);
	if (!(ret & VM_FAULT_ERROR)) {
		atomic64_inc(&buf->faults);
		if (!__test_and_set_bit(vmf->pgoff, buf->faulted))
			WRITE_ONCE(buf->refaulted, buf->refaulted + 1);
	}
out:
	mutex_unlock(&buf->lock);
	return ret;
}

static const struct vm_operations_struct vmlab_vm_ops = {
	.open = vmlab_vm_open,
	.close = vmlab_vm_close,
	.fault = vmlab_vm_fault,
};

#ifdef VMLAB_HUGE_PFNMAP
/*
 * ALLOC_HUGE_PMD: map a whole 2 MiB block with one PMD when the VMA covers it
 * at a 2 MiB-aligned address and buffer offset, the block is still one
 * aligned physically contiguous run (a page-range MOVE breaks that) and the
 * buffer is WB (vmf_insert_pfn_pmd takes the VMA's prot, which may predate a
 * caching change).  Anything else falls back to 4 KiB PTEs (vmlab_vm_fault).
 */
static vm_fault_t vmlab_vm_huge_fault(struct vm_fault *vmf, unsigned int order)
{
	struct vm_area_struct *vma = vmf->vma;
	struct vmlab_buffer *buf = vma->vm_private_data;
	unsigned long haddr = vmf->address & HPAGE_PMD_MASK;
	unsigned long pgoff, pfn, i;
	vm_fault_t ret;
	pmd_t pmd;

	if (order != HPAGE_PMD_ORDER || haddr < vma->vm_start ||
	    haddr + HPAGE_PMD_SIZE > vma->vm_end)
		return VM_FAULT_FALLBACK;
	pgoff = vma->vm_pgoff + ((haddr - vma->vm_start) >> PAGE_SHIFT);
	if (pgoff & (HPAGE_PMD_NR - 1))
		return VM_FAULT_FALLBACK;
	ret = vmlab_fault_lock(vmf, buf);
	if (ret)
		return ret;
	ret = VM_FAULT_FALLBACK;
	if (pgoff + HPAGE_PMD_NR > buf->npages || buf->caching != VMLAB_CACHING_WB)
		goto out;
	/*
	 * The core saw this PMD empty without a lock; a 4 KiB fault may have put a page
	 * table there since (only our ->fault does, under buf->lock, which we hold now):
	 * inserting a PMD over it would WARN in insert_pfn_pmd.
	 */
	pmd = pmdp_get_lockless(vmf->pmd);
	if (!pmd_none(pmd) && !pmd_leaf(pmd))
		goto out;
	if (pmd_leaf(pmd)) {
		/*
		 * A fault on a PMD we mapped: a write to one that soft-dirty tracking
		 * (clear_refs) write-protected.  Refresh that mapping, as the 4 KiB path's
		 * wp_pfn_shared() does: a NO_ZAP or SILENT move may have left it on the old
		 * block, and insert_pfn_pmd() WARNs on a present PMD of another pfn.  Only a
		 * zap moves it (under buf->lock, held), so the snapshot is still the PMD.
		 */
		pfn = pmd_pfn(pmd);
		goto insert;
	}
	pfn = page_to_pfn(buf->cur->pages[pgoff]);
	if (pfn & (HPAGE_PMD_NR - 1))
		goto out;
	for (i = 1; i < HPAGE_PMD_NR; i++)
		if (page_to_pfn(buf->cur->pages[pgoff + i]) != pfn + i)
			goto out;
insert:
#ifdef VMLAB_HAVE_PFN_T
	ret = vmf_insert_pfn_pmd(vmf, __pfn_to_pfn_t(pfn, 0), vmf->flags & FAULT_FLAG_WRITE);
#else
	ret = vmf_insert_pfn_pmd(vmf, pfn, vmf->flags & FAULT_FLAG_WRITE);
#endif
	if (!(ret & VM_FAULT_ERROR) && pmd_none(pmd)) {	/* a new PMD, not a refresh */
		atomic64_inc(&buf->pmd_faults);
		atomic64_add(HPAGE_PMD_NR, &buf->faults);	/* faults count pages */
		bitmap_set(buf->faulted, pgoff, HPAGE_PMD_NR);
		WRITE_ONCE(buf->refaulted, bitmap_weight(buf->faulted, buf->npages));
	}
out:
	mutex_unlock(&buf->lock);
	return ret;
}

static const struct vm_operations_struct vmlab_vm_ops_huge = {
	.open = vmlab_vm_open,
	.close = vmlab_vm_close,
	.fault = vmlab_vm_fault,
	.huge_fault = vmlab_vm_huge_fault,
};
#endif

/*
 * A write to a read-only PTE of an RO_FAULT buffer.  Returning 0 lets the core
 * (wp_pfn_shared -> finish_mkwrite_fault) make that PTE writable, under the
 * PTE lock and only if it is still the PTE the write hit: a MOVE that zapped
 * it meanwhile wins, and the write refaults onto the new pages.  No buffer
 * lock needed, and none taken (a MOVE holds it across its copy).
 */
static vm_fault_t vmlab_pfn_mkwrite(struct vm_fault *vmf)
{
	struct vmlab_buffer *buf = vmf->vma->vm_private_data;

	atomic64_inc(&buf->mkwrites);
	return 0;
}

/* separate ops: with ->pfn_mkwrite the core write-protects vm_page_prot */
static const struct vm_operations_struct vmlab_vm_ops_ro_fault = {
	.open = vmlab_vm_open,
	.close = vmlab_vm_close,
	.fault = vmlab_vm_fault,
	.pfn_mkwrite = vmlab_pfn_mkwrite,
};

/* Ours by vm_ops (the caller also checks vm_file is one of our dma-bufs) */
static bool vmlab_vma_ours(const struct vm_area_struct *vma)
{
#ifdef VMLAB_HUGE_PFNMAP
	if (vma->vm_ops == &vmlab_vm_ops_huge)
		return true;
#endif
	return vma->vm_ops == &vmlab_vm_ops || vma->vm_ops == &vmlab_vm_ops_ro_fault;
}

/*
 * Runs with mmap_lock held for write: no buf->lock here (a long MOVE would
 * stall every mmap_read_lock of the VMM).  The caching read may be older than
 * a concurrent MOVE's; vm_page_prot is only a hint, the fault handler builds
 * the prot from buf->caching under buf->lock.
 */
static int vmlab_mmap(struct dma_buf *dmabuf, struct vm_area_struct *vma)
{
	struct vmlab_buffer *buf = dmabuf->priv;
	unsigned long pages = vma_pages(vma);

	if (!(vma->vm_flags & VM_SHARED))
		return -EINVAL;
	if (vma->vm_pgoff >= buf->npages || pages > buf->npages - vma->vm_pgoff)
		return -EINVAL;

	vmlab_vm_flags_set(vma, VM_PFNMAP | VM_IO | VM_DONTEXPAND | VM_DONTDUMP);
	vma->vm_page_prot = vmlab_prot(vma->vm_page_prot, READ_ONCE(buf->caching));
	vma->vm_ops = (buf->create_flags & VMLAB_CREATE_RO_FAULT) ? &vmlab_vm_ops_ro_fault : &vmlab_vm_ops;
#ifdef VMLAB_HUGE_PFNMAP
	/* RO_FAULT keeps 4 KiB PTEs: pfn_mkwrite has no PMD counterpart here */
	if (buf->alloc == VMLAB_ALLOC_HUGE_PMD && !(buf->create_flags & VMLAB_CREATE_RO_FAULT))
		vma->vm_ops = &vmlab_vm_ops_huge;
#endif
	vma->vm_private_data = buf;
	atomic64_inc(&buf->mmaps);
	atomic64_inc(&buf->live_mappings);	/* ->open is not called for the first VMA */
	return 0;
}

/* ------------------------------------------------------------------------- */
/* dma_buf_ops                                                               */

static struct sg_table *vmlab_map_dma_buf(struct dma_buf_attachment *at,
					  enum dma_data_direction dir)
{
	struct vmlab_buffer *buf = at->dmabuf->priv;
	struct sg_table *sgt;
	int ret;

	sgt = kzalloc(sizeof(*sgt), GFP_KERNEL);
	if (!sgt)
		return ERR_PTR(-ENOMEM);

	mutex_lock(&buf->lock);
	ret = sg_alloc_table_from_pages(sgt, buf->cur->pages, buf->npages, 0,
					buf->size, GFP_KERNEL);
	if (ret)
		goto err_unlock;
	ret = dma_map_sgtable(at->dev, sgt, dir, 0);
	if (ret)
		goto err_free_table;
	buf->mapped_attachments++;
	mutex_unlock(&buf->lock);
	return sgt;

err_free_table:
	sg_free_table(sgt);
err_unlock:
	mutex_unlock(&buf->lock);
	kfree(sgt);
	return ERR_PTR(ret);
}

static void vmlab_unmap_dma_buf(struct dma_buf_attachment *at,
				struct sg_table *sgt, enum dma_data_direction dir)
{
	struct vmlab_buffer *buf = at->dmabuf->priv;

	dma_unmap_sgtable(at->dev, sgt, dir, 0);
	sg_free_table(sgt);
	kfree(sgt);
	mutex_lock(&buf->lock);
	buf->mapped_attachments--;
	mutex_unlock(&buf->lock);
}

/*
 * No device caches to maintain: the pages are either WB (coherent on x86) or
 * WC/UC in every CPU mapping the module creates, and importers map them
 * through the DMA API in map_dma_buf.
 */
static int vmlab_begin_cpu_access(struct dma_buf *dmabuf, enum dma_data_direction dir)
{
	return 0;
}

static int vmlab_end_cpu_access(struct dma_buf *dmabuf, enum dma_data_direction dir)
{
	return 0;
}

/* The vmap itself; refcounted here as well as in the core (be defensive). */
static void *vmlab_vmap_vaddr(struct vmlab_buffer *buf)
{
	void *vaddr;

	mutex_lock(&buf->lock);
	if (buf->vmaps) {
		buf->vmaps++;
		vaddr = buf->vaddr;
		goto out;
	}
	vaddr = vmap(buf->cur->pages, buf->npages, VM_MAP,
		     vmlab_prot(PAGE_KERNEL, buf->caching));
	if (!vaddr)
		goto out;
	buf->vaddr = vaddr;
	buf->vmaps = 1;
out:
	mutex_unlock(&buf->lock);
	return vaddr;
}

static void vmlab_vunmap_vaddr(struct vmlab_buffer *buf)
{
	mutex_lock(&buf->lock);
	if (buf->vmaps && --buf->vmaps == 0) {
		vunmap(buf->vaddr);
		buf->vaddr = NULL;
	}
	mutex_unlock(&buf->lock);
}

#if LINUX_VERSION_CODE >= KERNEL_VERSION(5, 11, 0)
static int vmlab_vmap(struct dma_buf *dmabuf, vmlab_map_t *map)
{
	void *vaddr = vmlab_vmap_vaddr(dmabuf->priv);

	if (!vaddr)
		return -ENOMEM;
	vmlab_map_set_vaddr(map, vaddr);
	return 0;
}

static void vmlab_vunmap(struct dma_buf *dmabuf, vmlab_map_t *map)
{
	vmlab_vunmap_vaddr(dmabuf->priv);
}
#else
/* 5.10: ->vmap returns the address (NULL on failure), ->vunmap takes it */
static void *vmlab_vmap(struct dma_buf *dmabuf)
{
	return vmlab_vmap_vaddr(dmabuf->priv);
}

static void vmlab_vunmap(struct dma_buf *dmabuf, void *vaddr)
{
	vmlab_vunmap_vaddr(dmabuf->priv);
}
#endif

/*
 * Mirrors vmlab_ioc_create.  Runs when the last reference to the dma-buf is
 * gone, so no VMA (each holds the file) and no attachment is left.  The
 * current pages are not freed but retired into the quarantine under the
 * buffer's id (vmlab_pageset_close), next to the sets earlier MIGRATEs
 * retired: a guest whose KVM missed a notifier may still reach any of them.
 */
static void vmlab_release(struct dma_buf *dmabuf)
{
	struct vmlab_buffer *buf = dmabuf->priv;
	struct vmlab_pageset *cur;

	mutex_lock(&buf->lock);
	buf->released = true;
	vmlab_quarantine_unmark(buf->id);	/* no host PTE is left */
	if (buf->vaddr)
		vunmap(buf->vaddr);
	buf->vaddr = NULL;
	cur = buf->cur;
	buf->cur = NULL;
	mutex_unlock(&buf->lock);

	mutex_lock(&vmlab_buffers_lock);
	list_del(&buf->node);
	mutex_unlock(&vmlab_buffers_lock);
	iput(buf->inode);
	vmlab_pageset_close(cur, READ_ONCE(buf->published));
	kref_put(&buf->ref, vmlab_buffer_free);
}

static const struct dma_buf_ops vmlab_dmabuf_ops = {
	.map_dma_buf = vmlab_map_dma_buf,
	.unmap_dma_buf = vmlab_unmap_dma_buf,
	.release = vmlab_release,
	.mmap = vmlab_mmap,
	.vmap = vmlab_vmap,
	.vunmap = vmlab_vunmap,
	.begin_cpu_access = vmlab_begin_cpu_access,
	.end_cpu_access = vmlab_end_cpu_access,
};

/* ------------------------------------------------------------------------- */
/* ioctls                                                                    */

static u64 vmlab_max_buffer_bytes(void)
{
	return (u64)max_buffer_mb << 20;
}

static long vmlab_ioc_abi(void __user *argp)
{
	struct vmlab_abi abi;

	memset(&abi, 0, sizeof(abi));
	abi.abi_version = VMLAB_EXPORTER_ABI_VERSION;
	abi.page_size = PAGE_SIZE;
	abi.max_buffer_bytes = vmlab_max_buffer_bytes();
	abi.max_quarantine_bytes = (u64)READ_ONCE(max_quarantine_mb) << 20;
	abi.sizeof_create = sizeof(struct vmlab_create);
	abi.sizeof_info = sizeof(struct vmlab_info);
	abi.sizeof_move = sizeof(struct vmlab_move);
	abi.sizeof_release = sizeof(struct vmlab_release_quarantine);
	abi.sizeof_pte = sizeof(struct vmlab_pte);
	abi.sizeof_abi = sizeof(struct vmlab_abi);
	if (copy_to_user(argp, &abi, sizeof(abi)))
		return -EFAULT;
	return 0;
}

static bool vmlab_caching_valid(u32 caching)
{
	return caching == VMLAB_CACHING_WB || caching == VMLAB_CACHING_WC ||
	       caching == VMLAB_CACHING_UC;
}

static long vmlab_ioc_create(void __user *argp)
{
	DEFINE_DMA_BUF_EXPORT_INFO(exp_info);
	struct vmlab_pageset *cur;
	struct vmlab_create arg;
	struct vmlab_buffer *buf;
	struct dma_buf *dmabuf;
	int fd, ret;

	if (copy_from_user(&arg, argp, sizeof(arg)))
		return -EFAULT;

	/* every bound before anything is allocated */
	if (arg.size == 0 || !IS_ALIGNED(arg.size, PAGE_SIZE) ||
	    !is_power_of_2(arg.size) || arg.size > vmlab_max_buffer_bytes())
		return -EINVAL;
	if (!vmlab_caching_valid(arg.caching))
		return -EINVAL;
	if (arg.alloc != VMLAB_ALLOC_ORDER0 && arg.alloc != VMLAB_ALLOC_COMPOUND &&
	    arg.alloc != VMLAB_ALLOC_NONCOMPOUND && arg.alloc != VMLAB_ALLOC_HUGE_PMD)
		return -EINVAL;
	if (arg.alloc == VMLAB_ALLOC_HUGE_PMD) {
#ifdef VMLAB_HUGE_PFNMAP
		if (arg.size < HPAGE_PMD_SIZE)	/* a power of two: a multiple of 2 MiB now */
			return -EINVAL;
#else
		return -EOPNOTSUPP;
#endif
	}
	if (arg.flags & ~VMLAB_CREATE_FLAGS_ALL)
		return -EINVAL;

	buf = kzalloc(sizeof(*buf), GFP_KERNEL);
	if (!buf)
		return -ENOMEM;
	mutex_init(&buf->lock);
	kref_init(&buf->ref);
	INIT_LIST_HEAD(&buf->node);
	buf->size = arg.size;
	buf->npages = arg.size >> PAGE_SHIFT;
	buf->alloc = arg.alloc;
	buf->caching = arg.caching;
	buf->generation = 1;
	buf->create_flags = arg.flags;

	buf->faulted = kvcalloc(BITS_TO_LONGS(buf->npages), sizeof(unsigned long),
				GFP_KERNEL | __GFP_NOWARN | __GFP_RETRY_MAYFAIL);
	if (!buf->faulted) {
		ret = -ENOMEM;
		goto err_free_buf;
	}

	/* unique within the load: stamps and quarantined sets name the buffer by it */
	buf->id = atomic64_inc_return(&vmlab_last_id);

	/* allocate, stamp on the WB linear map, then set the caching */
	cur = vmlab_pageset_alloc(buf->npages, buf->alloc);
	if (IS_ERR(cur)) {
		ret = PTR_ERR(cur);
		goto err_free_bitmap;
	}
	buf->cur = cur;
	vmlab_pageset_stamp(cur, buf->id, buf->generation, NULL);
	ret = vmlab_pageset_set_caching(cur, buf->caching);
	if (ret)
		goto err_free_pageset;

	exp_info.ops = &vmlab_dmabuf_ops;
	exp_info.size = buf->size;
	exp_info.flags = O_RDWR;
	exp_info.priv = buf;
	exp_info.owner = THIS_MODULE;
	dmabuf = dma_buf_export(&exp_info);
	if (IS_ERR(dmabuf)) {
		ret = PTR_ERR(dmabuf);
		goto err_free_pageset;
	}
	buf->dmabuf = dmabuf;
	buf->mapping = dmabuf->file->f_mapping;
	buf->inode = file_inode(dmabuf->file);
	ihold(buf->inode);
	mutex_lock(&vmlab_buffers_lock);
	list_add_tail(&buf->node, &vmlab_buffers);
	mutex_unlock(&vmlab_buffers_lock);
	/* from here on vmlab_release() owns buf: unwind with dma_buf_put() */

	fd = get_unused_fd_flags(O_RDWR |
				 ((arg.flags & VMLAB_CREATE_CLOEXEC) ? O_CLOEXEC : 0));
	if (fd < 0) {
		ret = fd;
		goto err_put_dmabuf;
	}

	arg.fd = fd;
	arg.id = buf->id;
	if (copy_to_user(argp, &arg, sizeof(arg))) {
		ret = -EFAULT;
		goto err_put_fd;
	}
	/*
	 * Only now can user space map it; before this the unwind frees the
	 * pages at once.  fd_install() publishes the file (and this store).
	 */
	WRITE_ONCE(buf->published, true);
	fd_install(fd, dmabuf->file);	/* consumes the export reference */
	return 0;

err_put_fd:
	put_unused_fd(fd);
err_put_dmabuf:
	dma_buf_put(dmabuf);
	return ret;
err_free_pageset:
	vmlab_pageset_free(cur);
err_free_bitmap:
	kvfree(buf->faulted);
err_free_buf:
	mutex_destroy(&buf->lock);
	kfree(buf);
	return ret;
}

static u32 vmlab_vm_prot(u32 caching)
{
	switch (caching) {
	case VMLAB_CACHING_WC:
		return VMLAB_VM_PROT_WC;
	case VMLAB_CACHING_UC:
		return VMLAB_VM_PROT_UC;
	default:
		return VMLAB_VM_PROT_CACHED;
	}
}

static long vmlab_ioc_info(void __user *argp)
{
	struct vmlab_info arg;
	struct vmlab_buffer *buf;
	struct dma_buf *dmabuf;
	u64 *pfns = NULL;
	u64 bytes;
	unsigned long n = 0, i;
	long ret = 0;

	if (copy_from_user(&arg, argp, sizeof(arg)))
		return -EFAULT;
	if (arg.flags || arg.pad)
		return -EINVAL;
	if (arg.pfns_ptr && check_mul_overflow(arg.pfns_count, (u64)sizeof(u64), &bytes))
		return -EINVAL;

	dmabuf = vmlab_dmabuf_get(arg.fd);
	if (IS_ERR(dmabuf))
		return PTR_ERR(dmabuf);
	buf = dmabuf->priv;

	if (arg.pfns_ptr) {
		n = min_t(u64, arg.pfns_count, buf->npages);
		if (n) {
			pfns = kvmalloc_array(n, sizeof(*pfns),
					      GFP_KERNEL | __GFP_NOWARN | __GFP_RETRY_MAYFAIL);
			if (!pfns) {
				ret = -ENOMEM;
				goto out_put;
			}
		}
	}

	/* no copy_to_user under buf->lock: a fault on our own mmap takes it */
	if (mutex_lock_killable(&buf->lock)) {
		ret = -EINTR;
		goto out_free;
	}
	for (i = 0; i < n; i++)
		pfns[i] = page_to_pfn(buf->cur->pages[i]);
	arg.id = buf->id;
	arg.caching = buf->caching;
	arg.vm_prot = vmlab_vm_prot(buf->caching);
	arg.alloc = buf->alloc;
	arg.size = buf->size;
	arg.generation = buf->generation;
	arg.zaps = buf->zaps;
	arg.moves = buf->moves;
	arg.stale_mapped = buf->stale_mapped;
	arg.refaulted_pages = buf->refaulted;
	mutex_unlock(&buf->lock);
	arg.quarantined_pages = vmlab_quarantine_pages_of(buf->id);
	arg.faults = atomic64_read(&buf->faults);
	arg.mkwrites = atomic64_read(&buf->mkwrites);
	arg.pmd_faults = atomic64_read(&buf->pmd_faults);
	arg.create_flags = buf->create_flags;
	arg.mmaps = atomic64_read(&buf->mmaps);
	arg.live_mappings = atomic64_read(&buf->live_mappings);
	arg.module_pages = atomic_long_read(&vmlab_module_pages);
	arg.module_quarantined_pages = atomic_long_read(&vmlab_quarantined_pages);
	arg.leaked_pages = atomic_long_read(&vmlab_leaked_pages);
	arg.pfns_count = buf->npages;

	if (n && copy_to_user(u64_to_user_ptr(arg.pfns_ptr), pfns, n * sizeof(*pfns))) {
		ret = -EFAULT;
		goto out_free;
	}
	if (copy_to_user(argp, &arg, sizeof(arg)))
		ret = -EFAULT;
out_free:
	kvfree(pfns);
out_put:
	dma_buf_put(dmabuf);
	return ret;
}

static long vmlab_ioc_move(void __user *argp)
{
	struct vmlab_move arg;
	struct vmlab_buffer *buf;
	struct dma_buf *dmabuf;
	u32 caching;
	long ret;

	if (copy_from_user(&arg, argp, sizeof(arg)))
		return -EFAULT;
	if (arg.flags)
		return -EINVAL;
	if (arg.page_count) {
		/* a range keeps the caching: one buffer, one caching */
		if ((arg.mode != VMLAB_MOVE_MIGRATE && arg.mode != VMLAB_MOVE_MIGRATE_NO_ZAP) ||
		    arg.caching != VMLAB_CACHING_KEEP)
			return -EINVAL;
	} else if (arg.first_page) {
		return -EINVAL;
	}
	switch (arg.mode) {
	case VMLAB_MOVE_MIGRATE:
	case VMLAB_MOVE_MIGRATE_NO_ZAP:
	case VMLAB_MOVE_MIGRATE_SILENT:
		if (arg.caching != VMLAB_CACHING_KEEP && !vmlab_caching_valid(arg.caching))
			return -EINVAL;
		break;
	case VMLAB_MOVE_ZAP_ONLY:
		if (arg.caching != VMLAB_CACHING_KEEP)
			return -EINVAL;
		break;
	default:
		return -EINVAL;
	}

	dmabuf = vmlab_dmabuf_get(arg.fd);
	if (IS_ERR(dmabuf))
		return PTR_ERR(dmabuf);
	buf = dmabuf->priv;
	/* a range needs pages that can be freed one by one; npages never changes */
	if (arg.page_count &&
	    ((buf->alloc != VMLAB_ALLOC_ORDER0 && buf->alloc != VMLAB_ALLOC_HUGE_PMD) ||
	     arg.first_page >= buf->npages || arg.page_count > buf->npages - arg.first_page)) {
		ret = -EINVAL;
		goto out_put;
	}

	if (mutex_lock_killable(&buf->lock)) {
		ret = -EINTR;
		goto out_put;
	}
	caching = arg.caching == VMLAB_CACHING_KEEP ? buf->caching : arg.caching;
	switch (arg.mode) {
	case VMLAB_MOVE_ZAP_ONLY:
		vmlab_zap_locked(buf);
		ret = 0;
		break;
	default:
		if (arg.page_count)
			ret = vmlab_migrate_range_locked(buf, arg.first_page, arg.page_count,
							 arg.mode);
		else
			ret = vmlab_migrate_locked(buf, caching, arg.mode);
		break;
	}
	if (!ret) {
		WRITE_ONCE(buf->moves, buf->moves + 1);
		arg.generation = buf->generation;
	}
	mutex_unlock(&buf->lock);

	if (!ret && copy_to_user(argp, &arg, sizeof(arg)))
		ret = -EFAULT;
out_put:
	dma_buf_put(dmabuf);
	return ret;
}

/*
 * Bounds the FORCE loop: a pass zaps every busy buffer once, so a retry is
 * only needed when a concurrent NO_ZAP move re-marked a set after its zap.
 */
#define VMLAB_RELEASE_FORCE_TRIES 16

static long vmlab_ioc_release_quarantine(void __user *argp)
{
	struct vmlab_release_quarantine arg;
	unsigned long pages = 0;
	LIST_HEAD(doomed);
	unsigned int tries;
	u64 busy, zap;
	int ret;

	if (copy_from_user(&arg, argp, sizeof(arg)))
		return -EFAULT;
	if ((arg.flags & ~VMLAB_RELEASE_FLAGS_ALL) || arg.pad)
		return -EINVAL;
	if (arg.id && (arg.id <= vmlab_first_id ||
		       arg.id > (u64)atomic64_read(&vmlab_last_id)))
		return -ENOENT;		/* never issued by this load */

	for (tries = 0;; tries++) {
		busy = vmlab_quarantine_take(arg.id, arg.max_generation, &doomed, &pages);
		if (!busy)
			break;
		/* a host PTE may still map a matching set: never free it */
		if (!(arg.flags & VMLAB_RELEASE_FORCE) || tries >= VMLAB_RELEASE_FORCE_TRIES)
			return -EBUSY;
		/* zap every buffer that owns a busy matching set, once each */
		for (zap = 0; (zap = vmlab_quarantine_next_busy(arg.id, arg.max_generation, zap));) {
			ret = vmlab_zap_by_id(zap);
			if (ret)
				return ret;
		}
	}
	vmlab_pageset_free_list(&doomed);

	arg.freed_pages = pages;
	if (copy_to_user(argp, &arg, sizeof(arg)))
		return -EFAULT;
	return 0;
}

/*
 * PAT index of a 4K-format pgprot -> memtype, decoded with the PAT MSR value
 * itself (pgprot2cachemode() is not exported to modules).
 */
static u32 vmlab_pat_memtype(u64 pat, pgprotval_t prot)
{
	unsigned int idx = ((prot & _PAGE_PWT) ? 1 : 0) |
			   ((prot & _PAGE_PCD) ? 2 : 0) |
			   ((prot & _PAGE_PAT) ? 4 : 0);

	switch ((pat >> (idx * 8)) & 0x7) {
	case 0: return VMLAB_MEMTYPE_UC;
	case 1: return VMLAB_MEMTYPE_WC;
	case 4: return VMLAB_MEMTYPE_WT;
	case 5: return VMLAB_MEMTYPE_WP;
	case 6: return VMLAB_MEMTYPE_WB;
	case 7: return VMLAB_MEMTYPE_UC_MINUS;
	default: return VMLAB_MEMTYPE_UNKNOWN;
	}
}

/* Memtype of the direct-map alias of @pfn. */
static u32 vmlab_linear_memtype(u64 pat, unsigned long pfn)
{
	unsigned int level;
	pgprotval_t prot;
	pte_t *kpte;

	if (!pfn_valid(pfn))
		return VMLAB_MEMTYPE_UNKNOWN;
	kpte = lookup_address((unsigned long)page_address(pfn_to_page(pfn)), &level);
	if (!kpte)
		return VMLAB_MEMTYPE_UNKNOWN;
	switch (level) {
	case PG_LEVEL_4K:
		prot = pte_flags(*kpte);
		break;
	case PG_LEVEL_2M:
		prot = pgprot_val(pgprot_large_2_4k(__pgprot(pmd_flags(*(pmd_t *)kpte))));
		break;
	case PG_LEVEL_1G:
		prot = pgprot_val(pgprot_large_2_4k(__pgprot(pud_flags(*(pud_t *)kpte))));
		break;
	default:
		return VMLAB_MEMTYPE_UNKNOWN;
	}
	if (!(prot & _PAGE_PRESENT))
		return VMLAB_MEMTYPE_UNKNOWN;
	return vmlab_pat_memtype(pat, prot);
}

/*
 * Look up the user PTE; the caller holds the mmap lock.  From 6.12 on
 * (follow_pte is gone) the value is rebuilt as pfn_pte(pfn, pgprot) from
 * follow_pfnmap_start(): on x86 pgprot is pte_flags() of the entry, so the
 * value equals the raw PTE for the present 4 KiB entries that
 * vmf_insert_pfn_prot() creates (the only kind this module's VMAs hold).
 */
static int vmlab_follow(struct vm_area_struct *vma, unsigned long addr,
			unsigned long *pfn, u64 *pteval)
{
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 12, 0)
	struct follow_pfnmap_args args = { .vma = vma, .address = addr };

	if (follow_pfnmap_start(&args))
		return -ENOENT;
	*pfn = args.pfn;
	/* a PMD leaf (ALLOC_HUGE_PMD): its PAT bit is bit 12, bit 7 is PSE */
	*pteval = pte_val(pfn_pte(args.pfn, (pgprot_val(args.pgprot) & _PAGE_PSE) ?
				  pgprot_large_2_4k(args.pgprot) : args.pgprot));
	follow_pfnmap_end(&args);
	return 0;
#else
	spinlock_t *ptl;
	pte_t *ptep, pte;

#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 10, 0)
	if (follow_pte(vma, addr, &ptep, &ptl))
#else
	if (follow_pte(vma->vm_mm, addr, &ptep, &ptl))
#endif
		return -ENOENT;
	pte = ptep_get(ptep);
	pte_unmap_unlock(ptep, ptl);
	if (!pte_present(pte))
		return -ENOENT;
	*pfn = pte_pfn(pte);
	*pteval = pte_val(pte);
	return 0;
#endif
}

static long vmlab_ioc_pte(void __user *argp)
{
	struct mm_struct *mm = current->mm;
	struct vm_area_struct *vma;
	struct vmlab_pte arg;
	unsigned long pfn = 0;
	u64 pteval = 0;
	u64 pat = 0x0007040600070406ULL;	/* power-on default */
	long ret;

	if (copy_from_user(&arg, argp, sizeof(arg)))
		return -EFAULT;
	if (arg.flags)
		return -EINVAL;
	if (!mm || arg.addr != (unsigned long)arg.addr)
		return -EINVAL;

	if (mmap_read_lock_killable(mm))
		return -EINTR;
	vma = vma_lookup(mm, (unsigned long)arg.addr);
	/* only our own VMAs: vm_ops identifies them, vm_file is the dma-buf */
	if (!vma || !vmlab_vma_ours(vma) ||
	    !vma->vm_file ||
	    vma->vm_file->private_data != ((struct vmlab_buffer *)vma->vm_private_data)->dmabuf ||
	    ((struct dma_buf *)vma->vm_file->private_data)->ops != &vmlab_dmabuf_ops) {
		ret = -EINVAL;
		goto out_unlock;
	}
	ret = vmlab_follow(vma, (unsigned long)arg.addr, &pfn, &pteval);
out_unlock:
	mmap_read_unlock(mm);
	if (ret)
		return ret;

	if (boot_cpu_has(X86_FEATURE_PAT))
		vmlab_rdmsr64(MSR_IA32_CR_PAT, pat);
	arg.pfn = pfn;
	arg.pte = pteval;
	arg.pat_msr = pat;
	arg.memtype = vmlab_pat_memtype(pat, pteval & PTE_FLAGS_MASK);
	arg.page_memtype = vmlab_linear_memtype(pat, pfn);
	if (copy_to_user(argp, &arg, sizeof(arg)))
		return -EFAULT;
	return 0;
}

static long vmlab_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	void __user *argp = (void __user *)arg;

	switch (cmd) {
	case VMLAB_IOC_ABI:
		return vmlab_ioc_abi(argp);
	case VMLAB_IOC_CREATE:
		return vmlab_ioc_create(argp);
	case VMLAB_IOC_INFO:
		return vmlab_ioc_info(argp);
	case VMLAB_IOC_MOVE:
		return vmlab_ioc_move(argp);
	case VMLAB_IOC_RELEASE_QUARANTINE:
		return vmlab_ioc_release_quarantine(argp);
	case VMLAB_IOC_PTE:
		return vmlab_ioc_pte(argp);
	default:
		return -ENOTTY;
	}
}

static int vmlab_open(struct inode *inode, struct file *file)
{
	if (!capable(CAP_SYS_ADMIN))
		return -EPERM;
	return 0;
}

static const struct file_operations vmlab_fops = {
	.owner = THIS_MODULE,
	.open = vmlab_open,
	.unlocked_ioctl = vmlab_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
};

static struct miscdevice vmlab_misc = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "vmlab-exporter",
	.fops = &vmlab_fops,
	.mode = 0600,
};

/* ------------------------------------------------------------------------- */
/* debugfs                                                                   */

/*
 * One line per live buffer, all numeric (caching and alloc as in the uapi):
 * id size caching alloc generation faults zaps moves mmaps live_mappings
 * quarantined stale_mapped refaulted
 * Read without buf->lock (a MOVE may hold it for long): each value is read
 * once, the line is not a snapshot of one instant.
 */
static int vmlab_buffers_show(struct seq_file *m, void *unused)
{
	struct vmlab_buffer *buf;

	mutex_lock(&vmlab_buffers_lock);
	list_for_each_entry(buf, &vmlab_buffers, node) {
		seq_printf(m, "%llu %llu %u %u %llu %lld %llu %llu %lld %lld %lu %d %lu\n",
			   buf->id, buf->size, READ_ONCE(buf->caching), buf->alloc,
			   READ_ONCE(buf->generation), (long long)atomic64_read(&buf->faults),
			   READ_ONCE(buf->zaps), READ_ONCE(buf->moves),
			   (long long)atomic64_read(&buf->mmaps),
			   (long long)atomic64_read(&buf->live_mappings),
			   vmlab_quarantine_pages_of(buf->id),
			   READ_ONCE(buf->stale_mapped) ? 1 : 0, READ_ONCE(buf->refaulted));
	}
	mutex_unlock(&vmlab_buffers_lock);
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(vmlab_buffers);

/* One line per retired set: buffer_id generation pages still_mapped caching */
static int vmlab_quarantine_show(struct seq_file *m, void *unused)
{
	struct vmlab_pageset *ps;

	mutex_lock(&vmlab_quarantine_lock);
	list_for_each_entry(ps, &vmlab_quarantine, node)
		seq_printf(m, "%llu %llu %lu %d %u\n", ps->buf_id, ps->generation,
			   ps->npages, ps->still_mapped ? 1 : 0, ps->caching);
	mutex_unlock(&vmlab_quarantine_lock);
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(vmlab_quarantine);

static int vmlab_pages_show(struct seq_file *m, void *unused)
{
	seq_printf(m, "%ld\n", atomic_long_read(&vmlab_module_pages));
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(vmlab_pages);

static int vmlab_leaked_show(struct seq_file *m, void *unused)
{
	seq_printf(m, "%ld\n", atomic_long_read(&vmlab_leaked_pages));
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(vmlab_leaked);

static int vmlab_close_freed_show(struct seq_file *m, void *unused)
{
	seq_printf(m, "%ld\n", atomic_long_read(&vmlab_close_freed_pages));
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(vmlab_close_freed);

static int vmlab_corrupt_retired_show(struct seq_file *m, void *unused)
{
	seq_printf(m, "%ld\n", atomic_long_read(&vmlab_corrupt_retired_pages));
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(vmlab_corrupt_retired);

/* ------------------------------------------------------------------------- */
/* Module                                                                    */

static int __init vmlab_init(void)
{
	int ret;

	BUILD_BUG_ON(PAGE_SIZE != 4096);
	BUILD_BUG_ON(PAGE_SIZE != VMLAB_STAMP_PAGE_SIZE);

	if (max_order > VMLAB_MAX_PAGE_ORDER) {
		pr_err("vmlab-exporter: max_order %u > %u\n", max_order,
		       (unsigned int)VMLAB_MAX_PAGE_ORDER);
		return -EINVAL;
	}
	if (max_buffer_mb > VMLAB_MAX_BUFFER_MB_CAP) {
		pr_err("vmlab-exporter: max_buffer_mb %u > %u\n", max_buffer_mb,
		       VMLAB_MAX_BUFFER_MB_CAP);
		return -EINVAL;
	}

	vmlab_first_id = (u64)get_random_u32() << 32;
	atomic64_set(&vmlab_last_id, vmlab_first_id);

	ret = misc_register(&vmlab_misc);
	if (ret)
		return ret;

	vmlab_debugfs = debugfs_create_dir("vmlab-exporter", NULL);
	debugfs_create_file("buffers", 0400, vmlab_debugfs, NULL, &vmlab_buffers_fops);
	debugfs_create_file("quarantine", 0400, vmlab_debugfs, NULL, &vmlab_quarantine_fops);
	debugfs_create_file("pages", 0400, vmlab_debugfs, NULL, &vmlab_pages_fops);
	debugfs_create_file("leaked", 0400, vmlab_debugfs, NULL, &vmlab_leaked_fops);
	debugfs_create_file("close_freed", 0400, vmlab_debugfs, NULL, &vmlab_close_freed_fops);
	debugfs_create_file("corrupt_retired", 0400, vmlab_debugfs, NULL,
			    &vmlab_corrupt_retired_fops);
	return 0;
}

static void __exit vmlab_exit(void)
{
	LIST_HEAD(all);

	debugfs_remove_recursive(vmlab_debugfs);
	misc_deregister(&vmlab_misc);
	/* every dma-buf pins THIS_MODULE: no buffer, so no mapping, is left */
	WARN_ON(!list_empty(&vmlab_buffers));
	mutex_lock(&vmlab_quarantine_lock);
	list_splice_init(&vmlab_quarantine, &all);
	vmlab_quarantine_committed = 0;
	atomic_long_set(&vmlab_quarantined_pages, 0);
	mutex_unlock(&vmlab_quarantine_lock);
	vmlab_pageset_free_list(&all);
}

module_init(vmlab_init);
module_exit(vmlab_exit);

MODULE_DESCRIPTION("vmlab dma-buf exporter with forced buffer moves");
MODULE_LICENSE("GPL");
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 13, 0)
MODULE_IMPORT_NS("DMA_BUF");
#elif LINUX_VERSION_CODE >= KERNEL_VERSION(5, 16, 0)
MODULE_IMPORT_NS(DMA_BUF);	/* dma-buf's symbols are namespaced since 5.16 */
#endif
