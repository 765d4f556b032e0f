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
 * include/uapi/vmlab_stamp.h.
 *
 * Modelled on drivers/dma-buf/udmabuf.c and drivers/dma-buf/heaps/system_heap.c.
 */

#include <linux/capability.h>
#include <linux/compat.h>
#include <linux/debugfs.h>
#include <linux/dma-buf.h>
#include <linux/dma-mapping.h>
#include <linux/fcntl.h>
#include <linux/file.h>
#include <linux/fs.h>
#include <linux/gfp.h>
#include <linux/highmem.h>
#include <linux/idr.h>
#include <linux/iosys-map.h>
#include <linux/kernel.h>
#include <linux/list.h>
#include <linux/log2.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/mmzone.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/overflow.h>
#include <linux/scatterlist.h>
#include <linux/sched.h>
#include <linux/seq_file.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/version.h>
#include <linux/vmalloc.h>

#ifdef CONFIG_X86
#include <asm/cpufeature.h>
#include <asm/msr.h>
#include <asm/pgtable.h>
#include <asm/set_memory.h>
#endif

#include <vmlab_exporter.h>
#include <vmlab_stamp.h>

/* ------------------------------------------------------------------------- */
/* API drift                                                                 */

#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 8, 0)
#define VMLAB_MAX_PAGE_ORDER MAX_PAGE_ORDER
#elif LINUX_VERSION_CODE >= KERNEL_VERSION(6, 4, 0)
#define VMLAB_MAX_PAGE_ORDER MAX_ORDER		/* inclusive since 6.4 */
#else
#define VMLAB_MAX_PAGE_ORDER (MAX_ORDER - 1)	/* exclusive before 6.4 */
#endif

static inline void vmlab_vm_flags_set(struct vm_area_struct *vma, unsigned long flags)
{
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 3, 0)
	vm_flags_set(vma, flags);
#else
	vma->vm_flags |= flags;
#endif
}

/* Take a file reference only if the file is not already on its way out. */
static inline bool vmlab_file_tryget(struct file **filep)
{
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 7, 0)
	return get_file_active(filep) != NULL;
#else
	return get_file_rcu(*filep);
#endif
}

#ifdef CONFIG_X86
#ifdef rdmsrq
#define vmlab_rdmsr64(msr, val) rdmsrq(msr, val)	/* >= 6.16 */
#else
#define vmlab_rdmsr64(msr, val) rdmsrl(msr, val)
#endif
#endif

/* ------------------------------------------------------------------------- */
/* Limits                                                                    */

#define VMLAB_MAX_BUFFER_MB_CAP (1u << 20)	/* 1 TiB: npages fits in an int */

static unsigned int max_buffer_mb = 256;
module_param(max_buffer_mb, uint, 0444);
MODULE_PARM_DESC(max_buffer_mb, "Largest buffer VMLAB_IOC_CREATE accepts, in MiB (default 256)");

static unsigned int max_order = 9;
module_param(max_order, uint, 0444);
MODULE_PARM_DESC(max_order, "Largest page order of COMPOUND/NONCOMPOUND allocations (default 9, <= MAX_PAGE_ORDER)");

/* ------------------------------------------------------------------------- */
/* Data structures                                                           */

/* One set of backing pages: the current set, or a retired (quarantined) one. */
struct vmlab_pageset {
	struct list_head node;		/* in vmlab_buffer.quarantine */
	struct page **pages;		/* one entry per 4 KiB page */
	struct page **chunks;		/* allocation heads, each 2^order pages */
	unsigned long npages;
	unsigned long nchunks;
	unsigned long nallocated;	/* chunks actually allocated */
	unsigned long ncached;		/* chunks whose linear map is not WB */
	unsigned int order;
	u32 alloc;			/* VMLAB_ALLOC_* */
	u32 caching;			/* caching of the linear map of these pages */
};

struct vmlab_buffer {
	struct mutex lock;		/* pages, generation, counters below */
	struct dma_buf *dmabuf;
	u64 id;
	u64 size;
	unsigned long npages;
	u32 alloc;
	u32 caching;			/* caching of the current page set */
	u64 generation;
	struct vmlab_pageset *cur;
	struct list_head quarantine;	/* of struct vmlab_pageset */
	unsigned long quarantined_pages;
	unsigned int mapped_attachments;
	unsigned int vmaps;
	void *vaddr;
	bool stale_mapped;
	u64 zaps;
	u64 moves;
	/* touched from vm_ops without the buffer lock */
	atomic64_t faults;
	atomic64_t mmaps;
	atomic64_t live_mappings;
};

static DEFINE_MUTEX(vmlab_idr_lock);
static DEFINE_IDR(vmlab_idr);
static atomic_long_t vmlab_module_pages = ATOMIC_LONG_INIT(0);
static struct dentry *vmlab_debugfs;
static const struct dma_buf_ops vmlab_dmabuf_ops;
static const struct vm_operations_struct vmlab_vm_ops;

/* ------------------------------------------------------------------------- */
/* Caching of the linear map                                                 */

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

static int vmlab_set_chunk_caching(struct page *chunk, unsigned int order, u32 caching)
{
#ifdef CONFIG_X86
	unsigned long addr = (unsigned long)page_address(chunk);
	int numpages = 1 << order;

	switch (caching) {
	case VMLAB_CACHING_WC:
		return set_memory_wc(addr, numpages);
	case VMLAB_CACHING_UC:
		return set_memory_uc(addr, numpages);
	default:
		return set_memory_wb(addr, numpages);
	}
#else
	return caching == VMLAB_CACHING_WB ? 0 : -EOPNOTSUPP;
#endif
}

/* Restore WB on the linear map of every chunk that was changed. */
static void vmlab_pageset_restore_wb(struct vmlab_pageset *ps)
{
	unsigned long i;

	if (ps->caching == VMLAB_CACHING_WB)
		return;
	for (i = 0; i < ps->ncached; i++)
		vmlab_set_chunk_caching(ps->chunks[i], ps->order, VMLAB_CACHING_WB);
	ps->ncached = 0;
	ps->caching = VMLAB_CACHING_WB;
}

static int vmlab_pageset_apply_caching(struct vmlab_pageset *ps, u32 caching)
{
	unsigned long i;
	int ret;

	if (caching == VMLAB_CACHING_WB)
		return 0;
	ps->caching = caching;
	for (i = 0; i < ps->nchunks; i++) {
		ret = vmlab_set_chunk_caching(ps->chunks[i], ps->order, caching);
		if (ret) {
			vmlab_pageset_restore_wb(ps);
			return ret;
		}
		ps->ncached = i + 1;
		cond_resched();
	}
	return 0;
}

/* ------------------------------------------------------------------------- */
/* Page sets                                                                 */

static void vmlab_pageset_free(struct vmlab_pageset *ps)
{
	unsigned long i;

	if (!ps)
		return;
	vmlab_pageset_restore_wb(ps);
	for (i = 0; i < ps->nallocated; i++)
		__free_pages(ps->chunks[i], ps->order);
	atomic_long_sub(ps->nallocated << ps->order, &vmlab_module_pages);
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
	gfp_t gfp;

	ps = kzalloc(sizeof(*ps), GFP_KERNEL);
	if (!ps)
		return NULL;
	INIT_LIST_HEAD(&ps->node);
	ps->npages = npages;
	ps->alloc = alloc;
	ps->caching = VMLAB_CACHING_WB;
	if (alloc == VMLAB_ALLOC_ORDER0)
		ps->order = 0;
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
	for (i = 0; i < ps->nchunks; i++) {
		struct page *chunk = alloc_pages(gfp, ps->order);

		if (!chunk)
			goto err_free_chunks;
		ps->chunks[i] = chunk;
		ps->nallocated = i + 1;
		atomic_long_add(1UL << ps->order, &vmlab_module_pages);
		for (j = 0; j < (1UL << ps->order); j++)
			ps->pages[n++] = chunk + j;
		if (fatal_signal_pending(current))
			goto err_free_chunks;
		cond_resched();
	}
	return ps;

err_free_chunks:
	vmlab_pageset_free(ps);
	return NULL;
err_free_pages_array:
	kvfree(ps->pages);
err_free_ps:
	kfree(ps);
	return NULL;
}

/* Stamp every page LIVE; if @from, copy its guest area into the new pages. */
static void vmlab_pageset_stamp(struct vmlab_pageset *ps, u64 id, u64 gen,
				struct vmlab_pageset *from)
{
	unsigned long i;

	for (i = 0; i < ps->npages; i++) {
		u8 *dst = page_address(ps->pages[i]);

		vmlab_stamp_page(dst, id, gen, i, VMLAB_STAMP_LIVE);
		if (from) {
			const u8 *src = page_address(from->pages[i]);

			memcpy(dst + VMLAB_STAMP_GUEST_OFF, src + VMLAB_STAMP_GUEST_OFF,
			       VMLAB_STAMP_PAGE_SIZE - VMLAB_STAMP_GUEST_OFF);
		}
		if (!(i & 255))
			cond_resched();
	}
}

static void vmlab_pageset_retire(struct vmlab_pageset *ps)
{
	unsigned long i;

	for (i = 0; i < ps->npages; i++) {
		vmlab_stamp_set_state(page_address(ps->pages[i]), VMLAB_STAMP_RETIRED);
		if (!(i & 255))
			cond_resched();
	}
}

/* New page set: allocate, stamp (on the WB linear map), then set caching. */
static struct vmlab_pageset *vmlab_pageset_create(unsigned long npages, u32 alloc,
						  u32 caching, u64 id, u64 gen,
						  struct vmlab_pageset *from, int *err)
{
	struct vmlab_pageset *ps;
	int ret;

	ps = vmlab_pageset_alloc(npages, alloc);
	if (!ps) {
		*err = -ENOMEM;
		return NULL;
	}
	vmlab_pageset_stamp(ps, id, gen, from);
	ret = vmlab_pageset_apply_caching(ps, caching);
	if (ret) {
		vmlab_pageset_free(ps);
		*err = ret;
		return NULL;
	}
	return ps;
}

static void vmlab_free_quarantine(struct vmlab_buffer *buf)
{
	struct vmlab_pageset *ps, *tmp;

	list_for_each_entry_safe(ps, tmp, &buf->quarantine, node) {
		list_del(&ps->node);
		vmlab_pageset_free(ps);
		cond_resched();
	}
	buf->quarantined_pages = 0;
}

/* ------------------------------------------------------------------------- */
/* Lookup                                                                    */

/* Returns the buffer with a reference on its dma-buf file, or NULL. */
static struct vmlab_buffer *vmlab_buffer_get(u64 id)
{
	struct vmlab_buffer *buf;

	if (id == 0 || id > INT_MAX)
		return NULL;
	mutex_lock(&vmlab_idr_lock);
	buf = idr_find(&vmlab_idr, (unsigned long)id);
	/*
	 * release() removes the buffer under vmlab_idr_lock before anything is
	 * freed, so the file is still allocated here; but its refcount may
	 * already have dropped to zero, hence the try-get.
	 */
	if (buf && !vmlab_file_tryget(&buf->dmabuf->file))
		buf = NULL;
	mutex_unlock(&vmlab_idr_lock);
	return buf;
}

static void vmlab_buffer_put(struct vmlab_buffer *buf)
{
	dma_buf_put(buf->dmabuf);
}

/* ------------------------------------------------------------------------- */
/* mmap                                                                      */

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

static vm_fault_t vmlab_vm_fault(struct vm_fault *vmf)
{
	struct vm_area_struct *vma = vmf->vma;
	struct vmlab_buffer *buf = vma->vm_private_data;
	pgprot_t prot;
	vm_fault_t ret;

	mutex_lock(&buf->lock);
	if (vmf->pgoff >= buf->npages) {
		ret = VM_FAULT_SIGBUS;
		goto out;
	}
	prot = vmlab_prot(vm_get_page_prot(vma->vm_flags), buf->caching);
	ret = vmf_insert_pfn_prot(vma, vmf->address,
				  page_to_pfn(buf->cur->pages[vmf->pgoff]), prot);
	if (!(ret & VM_FAULT_ERROR))
		atomic64_inc(&buf->faults);
out:
	mutex_unlock(&buf->lock);
	return ret;
}

static const struct vm_operations_struct vmlab_vm_ops = {
	.open = vmlab_vm_open,
	.close = vmlab_vm_close,
	.fault = vmlab_vm_fault,
};

static int vmlab_mmap(struct dma_buf *dmabuf, struct vm_area_struct *vma)
{
	struct vmlab_buffer *buf = dmabuf->priv;
	unsigned long pages = vma_pages(vma);

	if (!(vma->vm_flags & VM_SHARED))
		return -EINVAL;
	if (vma->vm_pgoff >= buf->npages || pages > buf->npages - vma->vm_pgoff)
		return -EINVAL;

	vmlab_vm_flags_set(vma, VM_PFNMAP | VM_IO | VM_DONTEXPAND | VM_DONTDUMP);
	mutex_lock(&buf->lock);
	vma->vm_page_prot = vmlab_prot(vma->vm_page_prot, buf->caching);
	mutex_unlock(&buf->lock);
	vma->vm_ops = &vmlab_vm_ops;
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

static int vmlab_vmap(struct dma_buf *dmabuf, struct iosys_map *map)
{
	struct vmlab_buffer *buf = dmabuf->priv;
	void *vaddr;
	int ret = 0;

	mutex_lock(&buf->lock);
	if (buf->vmaps) {
		/* the core refcounts vmaps; be defensive anyway */
		buf->vmaps++;
		iosys_map_set_vaddr(map, buf->vaddr);
		goto out;
	}
	vaddr = vmap(buf->cur->pages, buf->npages, VM_MAP,
		     vmlab_prot(PAGE_KERNEL, buf->caching));
	if (!vaddr) {
		ret = -ENOMEM;
		goto out;
	}
	buf->vaddr = vaddr;
	buf->vmaps = 1;
	iosys_map_set_vaddr(map, vaddr);
out:
	mutex_unlock(&buf->lock);
	return ret;
}

static void vmlab_vunmap(struct dma_buf *dmabuf, struct iosys_map *map)
{
	struct vmlab_buffer *buf = dmabuf->priv;

	mutex_lock(&buf->lock);
	if (buf->vmaps && --buf->vmaps == 0) {
		vunmap(buf->vaddr);
		buf->vaddr = NULL;
	}
	mutex_unlock(&buf->lock);
}

/* Mirrors vmlab_ioc_create. */
static void vmlab_release(struct dma_buf *dmabuf)
{
	struct vmlab_buffer *buf = dmabuf->priv;

	mutex_lock(&vmlab_idr_lock);
	idr_remove(&vmlab_idr, (unsigned long)buf->id);
	mutex_unlock(&vmlab_idr_lock);

	if (buf->vaddr)
		vunmap(buf->vaddr);
	vmlab_free_quarantine(buf);
	vmlab_pageset_free(buf->cur);
	mutex_destroy(&buf->lock);
	kfree(buf);
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
	struct vmlab_create arg;
	struct vmlab_buffer *buf;
	struct dma_buf *dmabuf;
	int id, fd, ret;

	if (copy_from_user(&arg, argp, sizeof(arg)))
		return -EFAULT;

	/* every bound before anything is allocated */
	if (arg.size == 0 || !IS_ALIGNED(arg.size, PAGE_SIZE) ||
	    !is_power_of_2(arg.size) || arg.size > vmlab_max_buffer_bytes())
		return -EINVAL;
	if (!vmlab_caching_valid(arg.caching))
		return -EINVAL;
	if (arg.alloc != VMLAB_ALLOC_ORDER0 && arg.alloc != VMLAB_ALLOC_COMPOUND &&
	    arg.alloc != VMLAB_ALLOC_NONCOMPOUND)
		return -EINVAL;
	if (arg.flags & ~VMLAB_CREATE_FLAGS_ALL)
		return -EINVAL;
#ifndef CONFIG_X86
	if (arg.caching != VMLAB_CACHING_WB)
		return -EOPNOTSUPP;
#endif

	buf = kzalloc(sizeof(*buf), GFP_KERNEL);
	if (!buf)
		return -ENOMEM;
	mutex_init(&buf->lock);
	INIT_LIST_HEAD(&buf->quarantine);
	buf->size = arg.size;
	buf->npages = arg.size >> PAGE_SHIFT;
	buf->alloc = arg.alloc;
	buf->caching = arg.caching;
	buf->generation = 1;

	/* reserve the id with a NULL entry: invisible to lookups until ready */
	mutex_lock(&vmlab_idr_lock);
	id = idr_alloc_cyclic(&vmlab_idr, NULL, 1, 0, GFP_KERNEL);
	mutex_unlock(&vmlab_idr_lock);
	if (id < 0) {
		ret = id;
		goto err_free_buf;
	}
	buf->id = id;

	buf->cur = vmlab_pageset_create(buf->npages, buf->alloc, buf->caching,
					buf->id, buf->generation, NULL, &ret);
	if (!buf->cur)
		goto err_remove_id;

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

	mutex_lock(&vmlab_idr_lock);
	idr_replace(&vmlab_idr, buf, id);
	mutex_unlock(&vmlab_idr_lock);
	fd_install(fd, dmabuf->file);	/* consumes the export reference */
	return 0;

err_put_fd:
	put_unused_fd(fd);
err_put_dmabuf:
	dma_buf_put(dmabuf);
	return ret;
err_free_pageset:
	vmlab_pageset_free(buf->cur);
err_remove_id:
	mutex_lock(&vmlab_idr_lock);
	idr_remove(&vmlab_idr, id);
	mutex_unlock(&vmlab_idr_lock);
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
	u64 *pfns = NULL;
	u64 bytes;
	unsigned long n = 0, i;
	long ret = 0;

	if (copy_from_user(&arg, argp, sizeof(arg)))
		return -EFAULT;
	if (arg.flags)
		return -EINVAL;
	if (arg.pfns_ptr && check_mul_overflow(arg.pfns_count, (u64)sizeof(u64), &bytes))
		return -EINVAL;

	buf = vmlab_buffer_get(arg.id);
	if (!buf)
		return -ENOENT;

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
	mutex_lock(&buf->lock);
	for (i = 0; i < n; i++)
		pfns[i] = page_to_pfn(buf->cur->pages[i]);
	arg.caching = buf->caching;
	arg.vm_prot = vmlab_vm_prot(buf->caching);
	arg.alloc = buf->alloc;
	arg.size = buf->size;
	arg.generation = buf->generation;
	arg.zaps = buf->zaps;
	arg.moves = buf->moves;
	arg.quarantined_pages = buf->quarantined_pages;
	arg.stale_mapped = buf->stale_mapped;
	mutex_unlock(&buf->lock);
	arg.faults = atomic64_read(&buf->faults);
	arg.mmaps = atomic64_read(&buf->mmaps);
	arg.live_mappings = atomic64_read(&buf->live_mappings);
	arg.module_pages = atomic_long_read(&vmlab_module_pages);
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
	vmlab_buffer_put(buf);
	return ret;
}

static void vmlab_zap(struct vmlab_buffer *buf)
{
	unmap_mapping_range(buf->dmabuf->file->f_mapping, 0, buf->size, 1);
	buf->zaps++;
}

static long vmlab_ioc_move(void __user *argp)
{
	struct vmlab_move arg;
	struct vmlab_buffer *buf;
	struct vmlab_pageset *old, *new;
	u32 caching;
	int err = 0;
	long ret = 0;

	if (copy_from_user(&arg, argp, sizeof(arg)))
		return -EFAULT;
	if (arg.flags || arg.pad)
		return -EINVAL;
	switch (arg.mode) {
	case VMLAB_MOVE_MIGRATE:
	case VMLAB_MOVE_MIGRATE_NO_ZAP:
		if (arg.caching != VMLAB_CACHING_KEEP && !vmlab_caching_valid(arg.caching))
			return -EINVAL;
#ifndef CONFIG_X86
		if (arg.caching != VMLAB_CACHING_KEEP && arg.caching != VMLAB_CACHING_WB)
			return -EOPNOTSUPP;
#endif
		break;
	case VMLAB_MOVE_ZAP_ONLY:
		if (arg.caching != VMLAB_CACHING_KEEP)
			return -EINVAL;
		break;
	default:
		return -EINVAL;
	}

	buf = vmlab_buffer_get(arg.id);
	if (!buf)
		return -ENOENT;

	mutex_lock(&buf->lock);
	if (arg.mode == VMLAB_MOVE_ZAP_ONLY) {
		vmlab_zap(buf);
		buf->stale_mapped = false;
		goto done;
	}

	/* devices and kernel mappings hold the old pages: refuse to move */
	if (buf->mapped_attachments || buf->vmaps) {
		ret = -EBUSY;
		goto out_unlock;
	}
	caching = arg.caching == VMLAB_CACHING_KEEP ? buf->caching : arg.caching;
	old = buf->cur;
	new = vmlab_pageset_create(buf->npages, buf->alloc, caching, buf->id,
				   buf->generation + 1, old, &err);
	if (!new) {
		ret = err;
		goto out_unlock;
	}

	buf->cur = new;
	buf->caching = caching;
	buf->generation++;
	if (arg.mode == VMLAB_MOVE_MIGRATE) {
		vmlab_zap(buf);
		buf->stale_mapped = false;
	} else if (atomic64_read(&buf->live_mappings) > 0) {
		buf->stale_mapped = true;
	}
	/* a stale mapping may still reach the old pages: retire, never free */
	vmlab_pageset_retire(old);
	list_add_tail(&old->node, &buf->quarantine);
	buf->quarantined_pages += old->npages;
done:
	buf->moves++;
	arg.generation = buf->generation;
out_unlock:
	mutex_unlock(&buf->lock);
	if (!ret && copy_to_user(argp, &arg, sizeof(arg)))
		ret = -EFAULT;
	vmlab_buffer_put(buf);
	return ret;
}

static long vmlab_ioc_release_quarantine(void __user *argp)
{
	struct vmlab_release_quarantine arg;
	struct vmlab_buffer *buf;
	long ret = 0;

	if (copy_from_user(&arg, argp, sizeof(arg)))
		return -EFAULT;

	buf = vmlab_buffer_get(arg.id);
	if (!buf)
		return -ENOENT;

	mutex_lock(&buf->lock);
	if (buf->stale_mapped) {
		ret = -EBUSY;
	} else {
		arg.freed_pages = buf->quarantined_pages;
		vmlab_free_quarantine(buf);
	}
	mutex_unlock(&buf->lock);

	if (!ret && copy_to_user(argp, &arg, sizeof(arg)))
		ret = -EFAULT;
	vmlab_buffer_put(buf);
	return ret;
}

#ifdef CONFIG_X86
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

/* Look up the user PTE; the caller holds the mmap lock. */
static int vmlab_follow(struct vm_area_struct *vma, unsigned long addr,
			unsigned long *pfn, u64 *pteval)
{
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 12, 0)
	struct follow_pfnmap_args args = { .vma = vma, .address = addr };

	if (follow_pfnmap_start(&args))
		return -ENOENT;
	*pfn = args.pfn;
	*pteval = pte_val(pfn_pte(args.pfn, args.pgprot));
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
#endif /* CONFIG_X86 */

static long vmlab_ioc_pte(void __user *argp)
{
#ifdef CONFIG_X86
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
	if (!vma || vma->vm_ops != &vmlab_vm_ops || !vma->vm_file ||
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
#else
	return -EOPNOTSUPP;
#endif
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
 * quarantined stale_mapped
 */
static int vmlab_buffers_show(struct seq_file *m, void *unused)
{
	struct vmlab_buffer *buf;
	int id;

	mutex_lock(&vmlab_idr_lock);
	idr_for_each_entry(&vmlab_idr, buf, id) {
		mutex_lock(&buf->lock);
		seq_printf(m, "%llu %llu %u %u %llu %lld %llu %llu %lld %lld %lu %d\n",
			   buf->id, buf->size, buf->caching, buf->alloc,
			   buf->generation, (long long)atomic64_read(&buf->faults),
			   buf->zaps, buf->moves, (long long)atomic64_read(&buf->mmaps),
			   (long long)atomic64_read(&buf->live_mappings),
			   buf->quarantined_pages, buf->stale_mapped ? 1 : 0);
		mutex_unlock(&buf->lock);
	}
	mutex_unlock(&vmlab_idr_lock);
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(vmlab_buffers);

static int vmlab_pages_show(struct seq_file *m, void *unused)
{
	seq_printf(m, "%ld\n", atomic_long_read(&vmlab_module_pages));
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(vmlab_pages);

/* ------------------------------------------------------------------------- */
/* Module                                                                    */

static int __init vmlab_init(void)
{
	int ret;

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

	ret = misc_register(&vmlab_misc);
	if (ret)
		return ret;

	vmlab_debugfs = debugfs_create_dir("vmlab-exporter", NULL);
	debugfs_create_file("buffers", 0400, vmlab_debugfs, NULL, &vmlab_buffers_fops);
	debugfs_create_file("pages", 0400, vmlab_debugfs, NULL, &vmlab_pages_fops);
	return 0;
}

static void __exit vmlab_exit(void)
{
	debugfs_remove_recursive(vmlab_debugfs);
	misc_deregister(&vmlab_misc);
	/* every dma-buf pins THIS_MODULE, so no buffer is left here */
	idr_destroy(&vmlab_idr);
}

module_init(vmlab_init);
module_exit(vmlab_exit);

MODULE_DESCRIPTION("vmlab dma-buf exporter with forced buffer moves");
MODULE_LICENSE("GPL");
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 13, 0)
MODULE_IMPORT_NS("DMA_BUF");
#else
MODULE_IMPORT_NS(DMA_BUF);
#endif
