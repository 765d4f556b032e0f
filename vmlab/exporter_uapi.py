"""Python mirror of host-tools/vmlab-exporter/include/uapi/vmlab_exporter.h (stdlib only:
it is also shipped to the lab host for the host agent). tests/unit/test_exporter_uapi.py
compiles the header's dump tool and checks every number, size and field offset below
against it."""
from __future__ import annotations

import struct

ABI_VERSION = 5
IOC_MAGIC = 0xBB  # free in Documentation/userspace-api/ioctl/ioctl-number.rst (see the header)

CACHING = {"WB": 0, "WC": 1, "UC": 2}
CACHING_KEEP = 0xFFFFFFFF
VM_PROT = {"WC": 0, "CACHED": 1, "UC": 2}
ALLOC = {"ORDER0": 0, "COMPOUND": 1, "NONCOMPOUND": 2, "HUGE_PMD": 3}
MOVE = {"MIGRATE": 1, "MIGRATE_NO_ZAP": 2, "ZAP_ONLY": 3, "MIGRATE_SILENT": 4}
MEMTYPE = {0: "WB", 1: "WC", 2: "UC-", 3: "UC", 4: "WT", 5: "WP", 0xFFFFFFFF: "unknown"}
CREATE_CLOEXEC = 0x1
CREATE_RO_FAULT = 0x2
CREATE_FLAGS_ALL = CREATE_CLOEXEC | CREATE_RO_FAULT
RELEASE_FORCE = 0x1
RELEASE_FLAGS_ALL = RELEASE_FORCE


def _layout(*fields: tuple[str, str]) -> tuple[struct.Struct, tuple[str, ...]]:
    """A little-endian struct without padding plus its field names, in C order. The C
    structs have no implicit padding, so "<" offsets are the C offsets (the test checks)."""
    return struct.Struct("<" + "".join(c for _, c in fields)), tuple(n for n, _ in fields)


CREATE, CREATE_FIELDS = _layout(("size", "Q"), ("caching", "I"), ("alloc", "I"), ("flags", "I"),
                                ("fd", "i"), ("id", "Q"))
INFO_OUT_U64 = ("size", "generation", "faults", "zaps", "moves", "mmaps", "live_mappings",
                "quarantined_pages", "stale_mapped", "module_pages", "refaulted_pages",
                "module_quarantined_pages", "leaked_pages", "mkwrites", "create_flags", "pmd_faults")
INFO, INFO_FIELDS = _layout(("fd", "i"), ("flags", "I"), ("pfns_ptr", "Q"), ("pfns_count", "Q"),
                            ("id", "Q"), ("caching", "I"), ("vm_prot", "I"), ("alloc", "I"),
                            ("pad", "I"), *((n, "Q") for n in INFO_OUT_U64))
MOVE_S, MOVE_FIELDS = _layout(("fd", "i"), ("mode", "I"), ("caching", "I"), ("flags", "I"),
                              ("generation", "Q"), ("first_page", "Q"), ("page_count", "Q"))
RELEASE, RELEASE_FIELDS = _layout(("id", "Q"), ("max_generation", "Q"), ("flags", "I"),
                                  ("pad", "I"), ("freed_pages", "Q"))
PTE, PTE_FIELDS = _layout(("addr", "Q"), ("flags", "I"), ("memtype", "I"), ("pfn", "Q"),
                          ("pte", "Q"), ("pat_msr", "Q"), ("page_memtype", "Q"))
ABI, ABI_FIELDS = _layout(("abi_version", "I"), ("page_size", "I"), ("max_buffer_bytes", "Q"),
                          ("max_quarantine_bytes", "Q"), ("sizeof_create", "I"),
                          ("sizeof_info", "I"), ("sizeof_move", "I"), ("sizeof_release", "I"),
                          ("sizeof_pte", "I"), ("sizeof_abi", "I"))

# C struct name -> (Struct, field names); also the names op_raw accepts.
STRUCTS = {"vmlab_create": (CREATE, CREATE_FIELDS), "vmlab_info": (INFO, INFO_FIELDS),
           "vmlab_move": (MOVE_S, MOVE_FIELDS),
           "vmlab_release_quarantine": (RELEASE, RELEASE_FIELDS),
           "vmlab_pte": (PTE, PTE_FIELDS), "vmlab_abi": (ABI, ABI_FIELDS)}


def pack(st: struct.Struct, names: tuple[str, ...], **values: int) -> bytearray:
    """A request buffer with the named fields set, every other field 0."""
    unknown = set(values) - set(names)
    if unknown:
        raise KeyError(f"no field {sorted(unknown)}")
    return bytearray(st.pack(*(values.get(n, 0) for n in names)))


def unpack(st: struct.Struct, names: tuple[str, ...], buf) -> dict[str, int]:
    return dict(zip(names, st.unpack_from(buf)))


def offsets(st: struct.Struct, names: tuple[str, ...]) -> dict[str, int]:
    fmt = st.format if isinstance(st.format, str) else st.format.decode()
    codes = fmt[1:]
    return {n: struct.calcsize("<" + codes[:i]) for i, n in enumerate(names)}


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
# DRM (include/uapi/drm/drm.h, drm_mode.h): a dumb buffer, exported with PRIME
DRM_MODE_CREATE_DUMB_S = struct.Struct("<IIIIIIQ")   # height width bpp flags handle pitch size
DRM_IOCTL_MODE_CREATE_DUMB = (3 << 30) | (32 << 16) | (ord("d") << 8) | 0xB2
DRM_PRIME_HANDLE_S = struct.Struct("<IIi")           # handle flags fd
DRM_IOCTL_PRIME_HANDLE_TO_FD = (3 << 30) | (12 << 16) | (ord("d") << 8) | 0x2D
DRM_GEM_CLOSE_S = struct.Struct("<II")               # handle pad
DRM_IOCTL_GEM_CLOSE = (1 << 30) | (8 << 16) | (ord("d") << 8) | 0x09


def dump_names() -> dict[str, int]:
    """The same NAME VALUE set tools/uapi_dump.c prints."""
    d = {"VMLAB_EXPORTER_ABI_VERSION": ABI_VERSION, "VMLAB_IOC_MAGIC": IOC_MAGIC,
         "VMLAB_IOC_ABI": IOC_ABI, "VMLAB_IOC_CREATE": IOC_CREATE, "VMLAB_IOC_INFO": IOC_INFO,
         "VMLAB_IOC_MOVE": IOC_MOVE, "VMLAB_IOC_RELEASE_QUARANTINE": IOC_RELEASE_QUARANTINE,
         "VMLAB_IOC_PTE": IOC_PTE, "VMLAB_CACHING_KEEP": CACHING_KEEP,
         "VMLAB_CREATE_CLOEXEC": CREATE_CLOEXEC, "VMLAB_CREATE_RO_FAULT": CREATE_RO_FAULT,
         "VMLAB_CREATE_FLAGS_ALL": CREATE_FLAGS_ALL,
         "VMLAB_RELEASE_FORCE": RELEASE_FORCE, "VMLAB_RELEASE_FLAGS_ALL": RELEASE_FLAGS_ALL}
    for cname, (st, names) in STRUCTS.items():
        d[f"sizeof_{cname}"] = st.size
        for field, off in offsets(st, names).items():
            d[f"offsetof_{cname}_{field}"] = off
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
