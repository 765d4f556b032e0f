// SPDX-License-Identifier: GPL-2.0
/*
 * Print every ioctl number, constant and struct size of vmlab_exporter.h as
 * "NAME VALUE" (decimal), one per line, for comparison with the Python mirror.
 */
#include <stdio.h>
#include <vmlab_exporter.h>

#define P(name) printf("%s %llu\n", #name, (unsigned long long)(name))
#define S(type) printf("sizeof_%s %zu\n", #type, sizeof(struct type))

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

	P(VMLAB_MOVE_MIGRATE);
	P(VMLAB_MOVE_MIGRATE_NO_ZAP);
	P(VMLAB_MOVE_ZAP_ONLY);

	P(VMLAB_MEMTYPE_WB);
	P(VMLAB_MEMTYPE_WC);
	P(VMLAB_MEMTYPE_UC_MINUS);
	P(VMLAB_MEMTYPE_UC);
	P(VMLAB_MEMTYPE_WT);
	P(VMLAB_MEMTYPE_WP);
	P(VMLAB_MEMTYPE_UNKNOWN);

	P(VMLAB_CREATE_CLOEXEC);
	P(VMLAB_CREATE_FLAGS_ALL);

	S(vmlab_create);
	S(vmlab_info);
	S(vmlab_move);
	S(vmlab_release_quarantine);
	S(vmlab_pte);
	S(vmlab_abi);
	return 0;
}
