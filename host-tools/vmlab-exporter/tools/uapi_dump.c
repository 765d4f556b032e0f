// SPDX-License-Identifier: GPL-2.0
/*
 * Print every ioctl number, constant, struct size and field offset of
 * vmlab_exporter.h as "NAME VALUE" (decimal), one per line, for comparison
 * with the Python mirror (vmlab/exporter_uapi.py).
 */
#include <stddef.h>
#include <stdio.h>
#include <vmlab_exporter.h>

#define P(name) printf("%s %llu\n", #name, (unsigned long long)(name))
#define S(type) printf("sizeof_%s %zu\n", #type, sizeof(struct type))
#define O(type, field) printf("offsetof_%s_%s %zu\n", #type, #field, offsetof(struct type, field))

int main(void)
{
	P(VMLAB_EXPORTER_ABI_VERSION);

	P(VMLAB_IOC_MAGIC);
	P(VMLAB_IOC_ABI);
	P(VMLAB_IOC_CREATE);
	P(VMLAB_IOC_INFO);
	P(VMLAB_IOC_MOVE);
	P(VMLAB_IOC_RELEASE_QUARANTINE);
	P(VMLAB_IOC_PTE);

	P(VMLAB_CACHING_WB);
	P(VMLAB_CACHING_WC);
	P(VMLAB_CACHING_UC);
	P(VMLAB_CACHING_KEEP);

	P(VMLAB_VM_PROT_WC);
	P(VMLAB_VM_PROT_CACHED);
	P(VMLAB_VM_PROT_UC);

	P(VMLAB_ALLOC_ORDER0);
	P(VMLAB_ALLOC_COMPOUND);
	P(VMLAB_ALLOC_NONCOMPOUND);
	P(VMLAB_ALLOC_HUGE_PMD);

	P(VMLAB_MOVE_MIGRATE);
	P(VMLAB_MOVE_MIGRATE_NO_ZAP);
	P(VMLAB_MOVE_ZAP_ONLY);
	P(VMLAB_MOVE_MIGRATE_SILENT);

	P(VMLAB_MEMTYPE_WB);
	P(VMLAB_MEMTYPE_WC);
	P(VMLAB_MEMTYPE_UC_MINUS);
	P(VMLAB_MEMTYPE_UC);
	P(VMLAB_MEMTYPE_WT);
	P(VMLAB_MEMTYPE_WP);
	P(VMLAB_MEMTYPE_UNKNOWN);

	P(VMLAB_CREATE_CLOEXEC);
	P(VMLAB_CREATE_RO_FAULT);
	P(VMLAB_CREATE_FLAGS_ALL);
	P(VMLAB_RELEASE_FORCE);
	P(VMLAB_RELEASE_FLAGS_ALL);

	S(vmlab_create);
	O(vmlab_create, size);
	O(vmlab_create, caching);
	O(vmlab_create, alloc);
	O(vmlab_create, flags);
	O(vmlab_create, fd);
	O(vmlab_create, id);

	S(vmlab_info);
	O(vmlab_info, fd);
	O(vmlab_info, flags);
	O(vmlab_info, pfns_ptr);
	O(vmlab_info, pfns_count);
	O(vmlab_info, id);
	O(vmlab_info, caching);
	O(vmlab_info, vm_prot);
	O(vmlab_info, alloc);
	O(vmlab_info, pad);
	O(vmlab_info, size);
	O(vmlab_info, generation);
	O(vmlab_info, faults);
	O(vmlab_info, zaps);
	O(vmlab_info, moves);
	O(vmlab_info, mmaps);
	O(vmlab_info, live_mappings);
	O(vmlab_info, quarantined_pages);
	O(vmlab_info, stale_mapped);
	O(vmlab_info, module_pages);
	O(vmlab_info, refaulted_pages);
	O(vmlab_info, module_quarantined_pages);
	O(vmlab_info, leaked_pages);
	O(vmlab_info, mkwrites);
	O(vmlab_info, create_flags);
	O(vmlab_info, pmd_faults);

	S(vmlab_move);
	O(vmlab_move, fd);
	O(vmlab_move, mode);
	O(vmlab_move, caching);
	O(vmlab_move, flags);
	O(vmlab_move, generation);
	O(vmlab_move, first_page);
	O(vmlab_move, page_count);

	S(vmlab_release_quarantine);
	O(vmlab_release_quarantine, id);
	O(vmlab_release_quarantine, max_generation);
	O(vmlab_release_quarantine, flags);
	O(vmlab_release_quarantine, pad);
	O(vmlab_release_quarantine, freed_pages);

	S(vmlab_pte);
	O(vmlab_pte, addr);
	O(vmlab_pte, flags);
	O(vmlab_pte, memtype);
	O(vmlab_pte, pfn);
	O(vmlab_pte, pte);
	O(vmlab_pte, pat_msr);
	O(vmlab_pte, page_memtype);

	S(vmlab_abi);
	O(vmlab_abi, abi_version);
	O(vmlab_abi, page_size);
	O(vmlab_abi, max_buffer_bytes);
	O(vmlab_abi, max_quarantine_bytes);
	O(vmlab_abi, sizeof_create);
	O(vmlab_abi, sizeof_info);
	O(vmlab_abi, sizeof_move);
	O(vmlab_abi, sizeof_release);
	O(vmlab_abi, sizeof_pte);
	O(vmlab_abi, sizeof_abi);
	return 0;
}
