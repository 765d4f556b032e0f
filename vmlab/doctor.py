"""`vmlab doctor`: what this machine, the lab host and a guest can do, and why."""
from __future__ import annotations

import json
import os
import platform

from . import kvm_probe
from .qemu import qemu_version

LAB_PROBE = r"""
echo "kernel=$(uname -r)"
echo "qemu=$(qemu-system-x86_64 --version | head -n1 | sed 's/QEMU emulator version //')"
for m in kvm_amd kvm_intel; do [ -d /sys/module/$m ] && echo "kvm_module=$m"; done
for p in npt ept nested; do for m in kvm_amd kvm_intel; do
  f=/sys/module/$m/parameters/$p; [ -r $f ] && echo "$p=$(cat $f)"; done; done
[ -c /dev/kvm ] && echo kvm_dev=1
[ -c /dev/udmabuf ] && echo udmabuf=1
for h in /dev/dma_heap/*; do [ -e "$h" ] && echo "dma_heap=${h##*/}"; done
[ -c /dev/vmlab-exporter ] && echo "exporter_dev=$(stat -c %a:%U /dev/vmlab-exporter)"
[ -d /sys/module/vmlab_exporter ] && echo exporter_module=1
for r in /dev/dri/renderD*; do [ -e "$r" ] && echo "render_node=$r"; done
grep -m1 -o -w -e svm -e vmx /proc/cpuinfo | sed 's/^/cpu_virt=/'
grep -m1 'model name' /proc/cpuinfo | sed 's/.*: /cpu_model=/'
"""

GUEST_PROBE = r"""
echo "kernel=$(uname -r)"
grep -m1 -o -w hypervisor /proc/cpuinfo | sed 's/^/cpu_flag=/'
dmesg | grep -m1 'Hypervisor detected' | sed 's/.*Hypervisor detected: /hypervisor=/'
dmesg | grep -m1 'virtio_gpu.*features' | sed 's/.*features: /virtio_gpu_features=/'
"""


def _kv(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def _yes(v: str | None) -> bool:
    return (v or "").strip() in ("Y", "1", "y")


def machine_facts() -> dict:
    kvm = "/dev/kvm"
    return {"kernel": platform.release(), "qemu_version": qemu_version(),
            "cpus": os.cpu_count(), "dev_kvm": os.path.exists(kvm),
            "dev_kvm_accessible": os.access(kvm, os.R_OK | os.W_OK) if os.path.exists(kvm) else False,
            # the accel probe's quick half: a 5-byte VM through the KVM API (not the verdict)
            "kvm_api_tiny_vm": kvm_probe.probe() if os.access(kvm, os.R_OK | os.W_OK) else None}


def lab_facts(lab) -> dict:
    _, out, _ = lab.run(LAB_PROBE, timeout=60, check=False)
    kv = _kv(out)
    g = lambda k: (kv.get(k) or [None])[0]  # noqa: E731
    npt = g("npt") if g("npt") is not None else g("ept")
    return {"kind": lab.kind, "accel": lab.accel, "accel_reason": lab.accel_reason,
            "kernel": g("kernel"), "qemu_version": g("qemu"), "kvm_module": g("kvm_module"),
            "kvm_dev": g("kvm_dev") == "1", "nested_paging": _yes(npt), "nested": _yes(g("nested")),
            "cpu_virt": g("cpu_virt"), "cpu_model": g("cpu_model"),
            "udmabuf": g("udmabuf") == "1", "dma_heaps": kv.get("dma_heap", []),
            "exporter_loaded": g("exporter_module") == "1", "exporter_dev_mode": g("exporter_dev"),
            "render_nodes": kv.get("render_node", []), "boot_seconds": lab.boot_seconds}


def guest_facts(guest) -> dict:
    _, out, _ = guest.run(GUEST_PROBE, timeout=60, check=False)
    kv = _kv(out)
    g = lambda k: (kv.get(k) or [None])[0]  # noqa: E731
    kvm = guest.cmd("query-kvm")
    facts = {"accel": "kvm" if kvm.get("enabled") else "tcg", "query_kvm": kvm,
             "kernel": g("kernel"), "hypervisor": g("hypervisor"),
             "cpu_hypervisor_flag": g("cpu_flag") == "hypervisor",
             "boot_seconds": guest.boot_seconds}
    feats = g("virtio_gpu_features")
    if feats:
        facts["virtio_gpu_features"] = feats
    facts["virtio_gpu"] = gpu_probe(guest)
    return facts


def gpu_probe(guest) -> dict:
    """The guest agent's DRM GETPARAM answers; an error says which ioctl and errno."""
    rc, out, err = guest.run("vmlab-guest-agent gpu probe", timeout=60, check=False)
    if rc != 0:
        return {"error": (err.strip() or out.strip() or f"exit {rc}").splitlines()[-1]}
    return json.loads(out)


def report(machine: dict, lab: dict | None, guest: dict | None) -> dict:
    return {"machine": machine, "lab": lab, "guest": guest}


def render(rep: dict) -> str:
    lines = []
    m = rep["machine"]
    lines.append(f"machine: kernel {m['kernel']}, QEMU {m['qemu_version']}, {m['cpus']} CPUs, "
                 f"/dev/kvm {'present' if m['dev_kvm'] else 'absent'}")
    lab = rep.get("lab")
    if lab:
        lines.append(f"lab:     accel {lab['accel']} ({lab['accel_reason']})")
        lines.append(f"         kernel {lab['kernel']}, QEMU {lab['qemu_version']}, "
                     f"{lab['kvm_module']} nested paging {'yes' if lab['nested_paging'] else 'NO'}")
        lines.append(f"         udmabuf {'yes' if lab['udmabuf'] else 'no'}, dma-heaps "
                     f"{', '.join(lab['dma_heaps']) or 'none'}, vmlab-exporter "
                     f"{'loaded' if lab['exporter_loaded'] else 'NOT loaded'} ({lab['exporter_dev_mode']})")
    guest = rep.get("guest")
    if guest:
        lines.append(f"guest:   accel {guest['accel']}, kernel {guest['kernel']}, "
                     f"hypervisor seen by guest: {guest['hypervisor']}")
        if guest.get("virtio_gpu"):
            lines.append(f"         virtio-gpu: {json.dumps(guest['virtio_gpu'])}")
    return "\n".join(lines)
