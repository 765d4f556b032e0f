"""Python mirror of host-tools/vmlab-exporter/include/uapi/vmlab_exporter.h (stdlib only:
it is also shipped to the lab host for the host agent). tests/unit/test_exporter_uapi.py
compiles the header's dump tool and checks every number and size below against it."""
from __future__ import annotations

import struct

ABI_VERSION = 1
IOC_MAGIC = 0xB7

CACHING = {"WB": 0, "WC": 1, "UC": 2}
CACHING_KEEP = 0xFFFFFFFF
VM_PROT = {"WC": 0, "CACHED": 1, "UC": 2}
ALLOC = {"ORDER0": 0, "COMPOUND": 1, "NONCOMPOUND": 2}
MOVE = {"MIGRATE": 1, "MIGRATE_NO_ZAP": 2, "ZAP_ONLY": 3}
MEMTYPE = {0: "WB", 1: "WC", 2: "UC-", 3: "UC", 4: "WT", 5: "WP", 0xFFFFFFFF: "unknown"}
CREATE_CLOEXEC = 0x1
CREATE_FLAGS_ALL = CREATE_CLOEXEC

CREATE = struct.Struct("<QIIIiQ")            # size caching alloc flags fd id
INFO = struct.Struct("<QQQIIII10Q")          # id pfns_ptr pfns_count flags caching vm_prot alloc + 10 u64
INFO_FIELDS = ("size", "generation", "faults", "zaps", "moves", "mmaps", "live_mappings",
               "quarantined_pages", "stale_mapped", "module_pages")
MOVE_S = struct.Struct("<QIIIIQ")            # id mode caching flags pad generation
RELEASE = struct.Struct("<QQ")               # id freed_pages
PTE = struct.Struct("<QIIQQQQ")              # addr flags memtype pfn pte pat_msr page_memtype
ABI = struct.Struct("<IIQ6I")                # abi page_size max_bytes sizeof x6

_IOC_WRITE, _IOC_READ = 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (IOC_MAGIC << 8) | nr


IOC_ABI = _ioc(_IOC_READ, 0x00, ABI.size)
IOC_CREATE = _ioc(_IOC_READ | _IOC_WRITE, 0x01, CREATE.size)
IOC_INFO = _ioc(_IOC_READ | _IOC_WRITE, 0x02, INFO.size)
IOC_MOVE = _ioc(_IOC_READ | _IOC_WRITE, 0x03, MOVE_S.size)
IOC_RELEASE_QUARANTINE = _ioc(_IOC_READ | _IOC_WRITE, 0x04, RELEASE.size)
IOC_PTE = _ioc(_IOC_READ | _IOC_WRITE, 0x05, PTE.size)

# Upstream interfaces the host agent also drives.
UDMABUF_CREATE = (1 << 30) | (24 << 16) | (ord("u") << 8) | 0x42    # _IOW('u', 0x42, 24 bytes)
UDMABUF_CREATE_S = struct.Struct("<IIQQ")                           # memfd flags offset size
DMA_HEAP_IOCTL_ALLOC = (3 << 30) | (24 << 16) | (ord("H") << 8) | 0x0
DMA_HEAP_ALLOC_S = struct.Struct("<QIIQ")                           # len fd fd_flags heap_flags


def dump_names() -> dict[str, int]:
    """The same NAME VALUE set tools/uapi_dump.c prints."""
    d = {"VMLAB_EXPORTER_ABI_VERSION": ABI_VERSION, "VMLAB_IOC_MAGIC": IOC_MAGIC,
         "VMLAB_IOC_ABI": IOC_ABI, "VMLAB_IOC_CREATE": IOC_CREATE, "VMLAB_IOC_INFO": IOC_INFO,
         "VMLAB_IOC_MOVE": IOC_MOVE, "VMLAB_IOC_RELEASE_QUARANTINE": IOC_RELEASE_QUARANTINE,
         "VMLAB_IOC_PTE": IOC_PTE, "VMLAB_CACHING_KEEP": CACHING_KEEP,
         "VMLAB_CREATE_CLOEXEC": CREATE_CLOEXEC, "VMLAB_CREATE_FLAGS_ALL": CREATE_FLAGS_ALL,
         "sizeof_vmlab_create": CREATE.size, "sizeof_vmlab_info": INFO.size,
         "sizeof_vmlab_move": MOVE_S.size, "sizeof_vmlab_release_quarantine": RELEASE.size,
         "sizeof_vmlab_pte": PTE.size, "sizeof_vmlab_abi": ABI.size}
    for k, v in CACHING.items():
        d[f"VMLAB_CACHING_{k}"] = v
    for k, v in VM_PROT.items():
        d[f"VMLAB_VM_PROT_{k}"] = v
    for k, v in ALLOC.items():
        d[f"VMLAB_ALLOC_{k}"] = v
    for k, v in MOVE.items():
        d[f"VMLAB_MOVE_{k}"] = v
    for v, k in MEMTYPE.items():
        d["VMLAB_MEMTYPE_" + {"UC-": "UC_MINUS"}.get(k, k.upper())] = v
    return d
