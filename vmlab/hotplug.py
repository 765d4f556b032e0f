"""Buffers that come and go in a running guest: each one an ivshmem-doorbell device
hot-plugged over QMP into a PCIe root port the guest was booted with, and unplugged again.

The guest gets ``PORTS`` root ports at boot (``root_port_args``), each with a 32-bit
prefetchable window reserved for a hot-plugged BAR (q35's pcie.0 itself takes no
hot-plug). A buffer: the host agent exports it (ivshmem server socket), QMP adds a socket
chardev to that server and the device on a free port, and the guest's PCI hot-plug
(ACPI, QEMU's default for q35 root ports) enumerates it on the port's secondary bus; the
guest agent is then told which device to read (``--device BDF``). Unplugging is device_del
and waiting until QEMU has finalized the device (the guest ejected it).

The buffer's pages stay quarantined until the device is known gone from the guest (QEMU
deletes the BAR's memslot, which zaps KVM's sptes, while it unrealizes the device, before
the device leaves the bus): ``HotPlug.gone()`` asks QEMU; the exporter answers EBUSY while
QEMU's own mapping of the buffer is still there. A device whose unplug cannot be confirmed
keeps its pages quarantined until the guest's QEMU exits.
"""
from __future__ import annotations

import json
import logging
import shlex
import time

from . import oracle
from .errors import RemoteError, WaitTimeout

log = logging.getLogger("vmlab.hotplug")
PORTS = 4
PORT_ID = "vmlab-hp{}"
# Each root port reserves a 32-bit prefetchable window (SeaBIOS honours QEMU's
# pref32-reserve hint), so a hot-plugged BAR lands below 4 GiB like a boot-time one: in
# the PCI hole, whose MTRR type (UC) is what the guest's PAT request meets. Measured on
# trixie's 6.12 guest: with pref64-reserve instead, SeaBIOS put the windows at the top of
# the 40-bit physical space, inside the range QEMU's e820 map reserves for AMD's
# HyperTransport (0xfd00000000-0xffffffffff), and Linux refused to allocate a hot-plugged
# BAR there ("can't assign; no space" for 64 MiB; 1 MiB fell back to the 32-bit window);
# with pci=no_e820 it took them, but then a guest's WB request on a hot-plugged BAR got WB
# (the 64-bit window's MTRR) where the same BAR at boot gets uncached-minus.
PORT_WINDOW = 128 << 20
# SeaBIOS aligns the window only to 4 MiB: of 128 MiB, an aligned 64 MiB block is certain
HOTPLUG_MAX_BAR = PORT_WINDOW // 2
IVSHMEM_DIR = "/run/vmlab/ivshmem"
IVSHMEM_PCI_ID = "1af4:1110"    # ivshmem-doorbell, as the guest kernel names it when it scans
AGENT = "vmlab-guest-agent"


def root_port_args(ports: int = PORTS) -> list[str]:
    """QEMU arguments for the guest: hot-pluggable root ports with reserved windows."""
    out = []
    for i in range(ports):
        out += ["-device", f"pcie-root-port,id={PORT_ID.format(i)},chassis={i + 1},slot={i + 1},"
                           f"pref32-reserve={PORT_WINDOW >> 20}M"]
    return out


def _root_ports(guest) -> dict[str, dict]:
    """Our root ports, in one query-pci: id -> {"secondary": the bus number the guest gave
    it (QEMU shows the bridge registers as the guest programmed them), "occupied": a device
    sits behind it (a buffer, or one whose unplug is still pending)}."""
    out = {}
    for bus in guest.cmd("query-pci"):
        for dev in bus.get("devices", []):
            qid = dev.get("qdev_id") or ""
            bridge = dev.get("pci_bridge") or {}
            if qid.startswith("vmlab-hp"):
                out[qid] = {"secondary": (bridge.get("bus") or {}).get("secondary"),
                            "occupied": any(d.get("qdev_id") for d in bridge.get("devices") or [])}
    return out


def free_ports(guest) -> list[str]:
    """Our root ports with nothing behind them."""
    ports = _root_ports(guest)
    return [p for p in (PORT_ID.format(i) for i in range(PORTS)) if p in ports and not ports[p]["occupied"]]


def _qdev_ids(guest) -> set[str]:
    ids = set()

    def walk(devices):
        for d in devices:
            if d.get("qdev_id"):
                ids.add(d["qdev_id"])
            walk(((d.get("pci_bridge") or {}).get("devices")) or [])
    for bus in guest.cmd("query-pci"):
        walk(bus.get("devices", []))
    return ids


def probe_verdict(out: str) -> tuple[str, object]:
    """What HotPlug's probe printed: ("present", BAR 2's start) once the resource file is
    there; ("no_room", the kernel's line) when the kernel's last word on this device's
    BAR 2, after its last enumeration (an earlier device at the same address said its own
    words), is that it found no room; else ("waiting", None)."""
    text = out.strip()
    if text.startswith("present"):
        words = text.split()
        try:
            return "present", int(words[1], 16)
        except (IndexError, ValueError):
            return "waiting", None      # the resource file, half-written: look again
    lines = text.splitlines()
    last_scan = max((i for i, ln in enumerate(lines) if f"[{IVSHMEM_PCI_ID}]" in ln), default=-1)
    bar2 = [ln for ln in lines[last_scan + 1:] if "BAR 2" in ln]
    if bar2 and ("can't assign" in bar2[-1] or "failed to assign" in bar2[-1]):
        return "no_room", bar2[-1].strip()
    return "waiting", None


class HotPlug:
    """One ivshmem-doorbell device hot-plugged into a free root port of ``guest``, its
    chardev connected to an ivshmem server socket that is already serving (the host
    agent's ``serve_ivshmem``); ``bdf`` is where the guest found it. ``close()`` unplugs
    it and waits until QEMU has let it go; ``stuck`` says the guest never did."""

    def __init__(self, guest, sock: str, name: str):
        """Nothing happens until ``plug()``: the owner holds the object first, so a plug
        that fails half-way is still its to clean up and to account for."""
        self.guest, self.sock, self.name = guest, sock, name
        self.chardev, self.device = f"{name}-chr", f"{name}-dev"
        self.chardev_added = self.plugged = self.stuck = False
        self.port: str | None = None
        self.bdf: str | None = None

    def plug(self, timeout: float = 60) -> "HotPlug":
        guest = self.guest
        try:
            self.port = self._free_port()
            guest.cmd("chardev-add", id=self.chardev,
                      backend={"type": "socket", "data": {"addr": {"type": "unix", "data": {"path": self.sock}},
                                                          "server": False}})
            self.chardev_added = True
            # plugged from the moment it is asked for: a lost reply may hide a done device_add
            self.plugged = True
            guest.cmd("device_add", driver="ivshmem-doorbell", id=self.device, chardev=self.chardev,
                      vectors=1, bus=self.port)
            self.bdf = f"0000:{_root_ports(guest)[self.port]['secondary']:02x}:00.0"
            self._wait_in_guest(timeout)
        except BaseException:
            try:
                self.close()
            except Exception as e:   # the first error is the one to see
                log.warning("%s: cleaning up after a failed plug: %s", self.name, e)
            raise
        return self

    def gone(self) -> bool:
        """QEMU itself says the device is not in the guest (any doubt is False)."""
        if self.plugged or self.stuck:
            return False
        try:
            return self.device not in _qdev_ids(self.guest)
        except Exception as e:
            log.warning("%s: cannot confirm the unplug: %s", self.name, e)
            return False

    def _free_port(self) -> str:
        for p in free_ports(self.guest):
            return p
        raise RemoteError(f"no free hot-plug port in guest {self.guest.opts.name} "
                          f"({PORTS} buffers at most at once)")

    def _wait_in_guest(self, timeout: float) -> None:
        """Until the guest has enumerated the device with its BAR 2 below 4 GiB (ACPI
        hot-plug; a rescan after 5 s in case the guest missed the event). A BAR the guest's
        kernel found no room for fails the plug once that has held for a second (a second
        assignment pass may still place it); one above 4 GiB fails it at once."""
        t0 = time.monotonic()
        dev = shlex.quote(f"/sys/bus/pci/devices/{self.bdf}")
        # BAR 2's start once it is there; else, for a device that came without it, the
        # kernel's lines about this BDF. Each exec first waits in the guest until BAR 2
        # is there, for up to 2 s (0.5 s from the exec's start when the device is there
        # without it): the enumeration takes ~0.1 s after device_add, and a second exec
        # would cost another ~0.07 s.
        probe = (f"i=0; while [ $i -lt 100 ] && [ ! -e {dev}/resource2 ] && "
                 f"{{ [ ! -e {dev} ] || [ $i -lt 25 ]; }}; do sleep 0.02; i=$((i+1)); done; "
                 f"if [ -e {dev}/resource2 ]; then echo present $(sed -n 3p {dev}/resource); "
                 f"elif [ -e {dev} ]; then dmesg | grep -F {shlex.quote(self.bdf + ': ')}; fi")
        rescanned = False
        no_room_since = None
        while True:
            t_probe = time.monotonic()
            _, out, _ = self.guest.run(probe, timeout=20, check=False)
            what, detail = probe_verdict(out)
            if what == "present":
                if detail >= 1 << 32:
                    raise RemoteError(
                        f"{self.name}: BAR 2 of {self.bdf} landed at {detail:#x}, above 4 GiB, "
                        f"where a boot-time BAR would not (the PCI hole's root-port windows "
                        f"did not fit: vmlab/hotplug.py)")
                return
            now = time.monotonic()
            if what == "no_room":
                no_room_since = no_room_since or now
                if now - no_room_since >= 1.0:
                    raise RemoteError(
                        f"{self.name}: the guest found no room for BAR 2 of {self.bdf} "
                        f"({detail[-160:]}); a root port's reserved window holds a BAR of "
                        f"at most {HOTPLUG_MAX_BAR >> 20} MiB (vmlab/hotplug.py)")
            else:
                no_room_since = None
            waited = now - t0
            if waited > timeout:
                raise WaitTimeout(f"{self.name}: the guest to enumerate {self.bdf} after device_add",
                                  timeout)
            if waited > 5 and not rescanned:
                self.guest.run("echo 1 > /sys/bus/pci/rescan", timeout=30, check=False)
                rescanned = True
            if time.monotonic() - t_probe < 0.2:
                time.sleep(0.05)    # a probe that did not wait in the guest (it failed)

    def close(self, timeout: float = 60) -> None:
        """device_del and wait until QEMU has finalized the device (its BAR, memslot and
        mapping of the buffer gone); then the chardev."""
        if self.plugged:
            try:
                try:
                    self.guest.cmd("device_del", id=self.device)
                except Exception as e:
                    if "not found" not in str(e).lower():   # never added: nothing to wait for
                        raise
                t0 = time.monotonic()
                while self.device in _qdev_ids(self.guest):
                    if time.monotonic() - t0 > timeout:
                        raise WaitTimeout(f"{self.name}: the guest to release {self.device} after "
                                          f"device_del", timeout)
                    time.sleep(0.05)    # a QMP query: cheap; the ejection takes ~0.1-0.3 s
            except BaseException:
                # not known gone: its port, chardev and pages stay taken, and the caller
                # must not hand this guest to anyone else
                self.stuck = True
                raise
            self.plugged = self.stuck = False   # QEMU let it go, whatever an earlier try said
        if self.chardev_added:
            self.chardev_added = False
            # the device leaves query-pci before QEMU finalizes it, and until then its
            # chardev is "busy": ask again for a few seconds
            deadline = time.monotonic() + 5
            while True:
                try:
                    self.guest.cmd("chardev-remove", id=self.chardev)
                    break
                except Exception as e:
                    if "busy" in str(e) and time.monotonic() < deadline:
                        time.sleep(0.1)
                        continue
                    log.warning("%s: chardev-remove: %s", self.name, e)
                    break


class HotBuffer:
    """One exported buffer, hot-plugged into ``guest``; ``move`` and ``read`` judge what
    the guest reads with the oracle, page by page."""

    def __init__(self, guest, agent, gagent, name: str, *, kind: str = "vmlab", size: int = 1 << 20,
                 caching: str = "WB", alloc: str = "ORDER0", mapping: str = "uc", timeout: float = 60):
        self.guest, self.agent, self.gagent, self.name = guest, agent, gagent, name
        self.mapping, self.size, self.kind = mapping, size, kind
        self.generation = 1
        self.page_gens = [1] * (size // 4096)
        self.history: list[dict] = []
        self.plug: HotPlug | None = None
        create = {"kind": kind, "size": size}
        if kind == "vmlab":
            create.update(caching=caching, alloc=alloc)
        self.buf = agent.request("create", **create)
        self.id = self.buf["id"]
        self.sock = f"{IVSHMEM_DIR}/{guest.opts.name}-{name}.sock"
        try:
            agent.request("serve_ivshmem", buf=self.buf["buf"], socket=self.sock)
            self.plug = HotPlug(guest, self.sock, name)
            self.plug.plug(timeout)
        except BaseException:
            try:
                self._close_export()
            except Exception as e:   # the first error is the one to see
                log.warning("%s: cleaning up after a failed plug: %s", name, e)
            raise

    @property
    def bdf(self) -> str | None:
        return self.plug.bdf if self.plug else None

    @property
    def stuck(self) -> bool:
        return bool(self.plug and self.plug.stuck)

    def _agent(self, cmd: str, timeout: float = 300) -> dict:
        rc, out, err = self.gagent.run(f"{cmd} --device {self.bdf} --caching {self.mapping}", timeout)
        if rc == 3:
            return {"guest_fault": json.loads(out or "{}")}
        if rc != 0:
            raise RemoteError(f"guest agent '{cmd}' on {self.bdf} exited {rc}: {err.strip() or out.strip()}")
        return json.loads(out)

    def read(self) -> dict:
        """The guest reads every page; the oracle's verdict against the current generation."""
        r = self._agent("read")
        if "guest_fault" in r:
            return {"verdict": "GUEST_FAULT", "pages": {}, "detail": r}
        j = oracle.judge(oracle.records(r), buffer_id=self.id, generation=list(self.page_gens),
                         npages=len(self.page_gens))
        j.update(generation=self.generation, memtype=r.get("memtype"))
        return j

    def move(self, mode: str, caching: str | None = None) -> dict:
        """The exporter moves the buffer (MIGRATE, MIGRATE_NO_ZAP, ZAP_ONLY...), then the
        guest reads it: {"verdict", "pages", "generation", ...}. A ZAP_ONLY keeps pages
        and generation, so its verdict also needs the exporter's counters (NOT_ZAPPED
        when they show no zap and no refault of every page)."""
        before = self.agent.request("info", buf=self.buf["buf"]) if mode == "ZAP_ONLY" else None
        m = self.agent.request("move", buf=self.buf["buf"], mode=mode, caching=caching or "KEEP")
        if m["generation"] != self.generation:
            self.page_gens = [m["generation"]] * len(self.page_gens)
        self.generation = m["generation"]
        out = dict(self.read(), mode=mode, exporter_note=m.get("what"))
        if before is not None and out["verdict"] == "REFAULTED":
            ev = oracle.zap_evidence(before, self.agent.request("info", buf=self.buf["buf"]),
                                     len(self.page_gens))
            out["zap_evidence"] = ev
            if not ev["ok"]:
                out.update(verdict="NOT_ZAPPED", detail=ev["detail"])
        if out["verdict"] == "REFAULTED" and self.generation > 1 and self.kind == "vmlab":
            # every page read at the new generation: the older sets may go (the exporter
            # answers EBUSY for one a host PTE may still map), so the quarantine stays small
            try:
                self.agent.request("release_quarantine", buf=self.buf["buf"],
                                   max_generation=self.generation - 1)
            except RemoteError as e:
                if "busy" not in str(e).lower():
                    raise
        self.history.append({k: out.get(k) for k in ("mode", "verdict", "pages", "generation")})
        return out

    def close(self, timeout: float = 60) -> None:
        """Unplug, then close the export. Quarantined pages stay (their owner frees them
        once the guest is gone)."""
        if self.plug is not None:
            self.plug.close(timeout)
        self._close_export()

    def _close_export(self) -> None:
        try:
            self.agent.request("close", buf=self.buf["buf"])
        except Exception as e:
            log.warning("%s: closing the export: %s", self.name, e)
