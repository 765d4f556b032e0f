"""`vmlab run`: lab up -> guest up with the buffer as ivshmem BAR2 -> baseline read ->
for each move: move -> guest read -> per-page verdict -> summary, results directory.

The results directory is written before anything boots (config copy, reproduce.sh,
results.json with status "running") and completed whatever happens, so a crashed or
interrupted run still explains itself.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from . import config as cfgmod
from . import oracle
from .errors import RemoteError, WaitTimeout
from .exporter import AgentRequestFailed, HostAgent
from .guest import GuestOptions
from .lab import LabOptions
from .paths import repo_root
from .stack import Stack

log = logging.getLogger("vmlab.experiment")
DEFAULT_CONFIG = repo_root() / "configs" / "experiments" / "default.yaml"
IVSHMEM_SOCK = "/run/vmlab/ivshmem/buffer.sock"
AGENT = "vmlab-guest-agent"
TAG_BASE = 0x766D6C6100000000  # "vmla" << 32


class VMMDied(Exception):
    pass


def results_dir(exp: cfgmod.Experiment, out: str | None) -> Path:
    if out:
        d = Path(out)
    else:
        ts = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        d = Path.cwd() / "results" / f"{ts}-{exp.name}"
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    return d


def write_reproducer(d: Path, exp: cfgmod.Experiment, argv: list[str]) -> None:
    shutil.copyfile(exp.path, d / "config.yaml")
    script = ("#!/bin/sh\n# Re-run this experiment with the same config (copied beside this script).\n"
              "here=$(cd \"$(dirname \"$0\")\" && pwd) || exit 1\n"
              f"cd {shlex.quote(str(repo_root()))} || exit 1\n"
              "VMLAB=.venv/bin/vmlab; [ -x \"$VMLAB\" ] || VMLAB=vmlab\n"
              f"exec \"$VMLAB\" run \"$here/config.yaml\" {' '.join(shlex.quote(a) for a in argv)} \"$@\"\n")
    (d / "reproduce.sh").write_text(script)
    os.chmod(d / "reproduce.sh", 0o755)


class Run:
    def __init__(self, exp: cfgmod.Experiment, args, outdir: Path, progress):
        self.exp, self.args, self.out, self.progress = exp, args, outdir, progress
        self.result: dict = {"experiment": exp.name, "config": exp.raw, "status": "running",
                             "started": datetime.now(timezone.utc).isoformat(), "moves": [],
                             "passed": False}
        self.stack: Stack | None = None
        self.agent: HostAgent | None = None
        self.buf: dict = {}
        self.watch: Watch | None = None
        self.mapping = exp.section("guest").get("mapping", "uc")

    # --- helpers ------------------------------------------------------------------------
    def save(self) -> None:
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(self.result, indent=2, sort_keys=True, default=str) + "\n")
        tmp.rename(self.out / "results.json")

    def guest_agent(self, cmd: str, timeout: float = 120) -> dict:
        """Run the guest agent; returns its JSON. Raises VMMDied when the guest's QEMU
        died or stopped, so the caller records VMM_FAULT instead of hanging."""
        try:
            rc, out, err = self._guest_exec(f"{AGENT} {cmd}", timeout)
        except (WaitTimeout, OSError, EOFError, RemoteError) as e:
            self.check_vmm()
            raise RemoteError(f"guest agent '{cmd}' did not answer: {e}")
        if rc == 3:
            return {"guest_fault": json.loads(out or "{}"), "stderr": err.strip()}
        if rc != 0:
            self.check_vmm()
            raise RemoteError(f"guest agent '{cmd}' exited {rc}: {err.strip() or out.strip()}")
        return json.loads(out)

    def _guest_exec(self, command: str, timeout: float) -> tuple[int, str, str]:
        """Run in the guest while watching its VMM: a vCPU stopped by KVM_RUN failing
        would otherwise look like a slow guest until the timeout."""
        chan = self.stack.guest.session.open_exec(command)
        out, err = bytearray(), bytearray()
        deadline = time.monotonic() + timeout
        next_check = time.monotonic() + 3
        try:
            while True:
                while chan.recv_ready():
                    out += chan.recv(1 << 20)
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                    return chan.recv_exit_status(), out.decode(errors="replace"), err.decode(errors="replace")
                if time.monotonic() > next_check:
                    self.check_vmm()
                    next_check = time.monotonic() + 3
                if time.monotonic() > deadline:
                    raise WaitTimeout(f"guest: {command[:60]}", timeout)
                time.sleep(0.01)
        finally:
            chan.close()

    def check_vmm(self) -> None:
        g = self.stack.guest
        alive = g.alive()
        status = None
        if alive:
            try:
                status = g.cmd("query-status").get("status")
            except Exception as e:  # a wedged QMP is itself a VMM problem...
                status = f"qmp-error: {e}"
                time.sleep(1.0)      # ...unless QEMU is just dying: then say that
                alive = g.alive()
        if not alive or status in ("internal-error", "shutdown", "guest-panicked") or \
                (status and status.startswith("qmp-error")):
            _, qlog, _ = self.stack.lab.run(
                f"grep -i -m 3 -e 'error' -e 'failed' {g.dir}/qemu.log; tail -n 1 {g.dir}/qemu.log",
                timeout=30, check=False)
            words = [ln for ln in qlog.splitlines() if ln.strip()]
            last = words[0] if words else ""
            raise VMMDied(f"guest QEMU {'exited' if not alive else 'stopped: ' + str(status)}; "
                          f"last words: {last.strip()}")

    # --- phases ----------------------------------------------------------------------------
    def run(self) -> int:
        lab_cfg, guest_cfg, exp_cfg = (self.exp.section(k) for k in ("lab", "guest", "exporter"))
        a = self.args
        lab_opts = LabOptions(accel=a.accel or lab_cfg.get("accel", "auto"),
                              kernel=a.kernel or lab_cfg.get("kernel", "trixie"),
                              kernel_image=a.kernel_image,
                              memory_mb=lab_cfg.get("memory_mb", a.lab_memory),
                              boot_timeout=lab_cfg.get("boot_timeout", a.boot_timeout),
                              extra_qemu_args=tuple(a.lab_qemu_arg or ()))
        a.kernel = lab_opts.kernel
        size = self.exp.size
        gopts = GuestOptions(memory_mb=guest_cfg.get("memory_mb", 512),
                             gpu=guest_cfg.get("gpu", "blob"),
                             boot_timeout=guest_cfg.get("boot_timeout", 240),
                             extra_qemu_args=["-chardev", f"socket,path={IVSHMEM_SOCK},id=ivs0",
                                              "-device", "ivshmem-doorbell,chardev=ivs0,vectors=1"])
        self.stack = Stack(a, self.out, self.progress, gopts, lab_opts)
        try:
            lab = self.stack.up_lab()
            self.result["lab"] = {"kernel": lab.kernel_release(), "accel": lab.accel,
                                  "accel_reason": lab.accel_reason, "boot_seconds": lab.boot_seconds}
            self.save()
            self.agent = HostAgent(lab, self.out / "hostagent.log")
            self.result["lab"]["agent"] = self.agent.request("hello")
            self.buf = self.agent.request("create", kind=exp_cfg["kind"], size=size,
                                          caching=exp_cfg.get("caching", "WB"),
                                          alloc=exp_cfg.get("alloc", "ORDER0"))
            self.progress(f"{exp_cfg['kind']} buffer {self.buf['id']:#x} ({size} bytes) created; "
                          f"exported over ivshmem")
            self.agent.request("serve_ivshmem", buf=self.buf["buf"], socket=IVSHMEM_SOCK)
            guest = self.stack.up_guest()
            self.result["guest"] = {"kernel": guest.run("uname -r", timeout=30)[1].strip(),
                                    "query_kvm": guest.cmd("query-kvm"),
                                    "boot_seconds": guest.boot_seconds}
            self.result["caching_chain"] = self.caching_chain()
            self.save()
            if self.exp.raw.get("gpu_roundtrip"):
                self.gpu_roundtrip(gopts.gpu)
            try:
                self.baseline()
            except VMMDied as e:
                self.progress(f"VMM fault during the baseline read: {e}")
                self.result["vmm_fault"] = str(e)
                self.result["baseline"] = {"verdict": "VMM_FAULT", "detail": str(e)}
            self.moves()
        except VMMDied as e:
            self.progress(f"VMM fault: {e}")
            self.result["vmm_fault"] = str(e)
        finally:
            self.finish()
        return 0 if self.result["passed"] else 1

    def gpu_roundtrip(self, mode: str) -> None:
        from . import doctor, gpu_roundtrip
        probe = doctor.gpu_probe(self.stack.guest)
        if mode == "blob":
            res = gpu_roundtrip.blob(self.stack.guest)
        elif mode == "host-blob":
            res = gpu_roundtrip.host_blob(self.stack.guest, self.agent)
            self.result["caching_chain"]["virtio_gpu_map_info"] = res["map_info"]
        else:
            res = {"mode": mode, "passed": False, "error": "gpu_roundtrip needs guest.gpu blob or host-blob"}
        res["probe"] = probe
        self.result["virtio_gpu"] = res
        self.progress(f"virtio-gpu {mode} round trip: {'ok' if res['passed'] else 'FAILED'} "
                      f"{res.get('error', '')}")
        self.save()

    def caching_chain(self) -> dict:
        exp_cfg = self.exp.section("exporter")
        chain: dict = {"exporter": {"kind": exp_cfg["kind"], "requested": exp_cfg.get("caching", "WB")}}
        if exp_cfg["kind"] == "vmlab":
            info = self.agent.request("info", buf=self.buf["buf"])
            chain["exporter"].update(caching=info["caching"], vm_prot=info["vm_prot"])
            try:
                chain["lab_host_pte"] = self.agent.request("host_pte", buf=self.buf["buf"])
            except AgentRequestFailed as e:
                chain["lab_host_pte"] = {"error": str(e)}
        lab = self.stack.lab
        _, npt, _ = lab.run("cat /sys/module/kvm_amd/parameters/npt 2>/dev/null || echo -", timeout=20, check=False)
        chain["kvm"] = {"mmu": "NPT" if npt.strip() == "Y" else "EPT/other",
                        "memtype": "none: NPT leaves the guest PAT in charge (no IPAT on AMD)"
                        if npt.strip() == "Y" else "see EPT memtype/IPAT"}
        m = self.guest_agent(f"map --caching {self.mapping}")
        chain["guest"] = {"requested": self.mapping, "memtype": m.get("memtype"), "pat_line": m.get("pat_line")}
        want = {"wb": "write-back", "wc": "write-combining", "uc": "uncached-minus"}[self.mapping]
        host = chain.get("lab_host_pte", {}).get("memtype")
        chain["effective"] = chain["guest"]["memtype"]
        mism = []
        if chain["guest"]["memtype"] != want:
            mism.append(f"guest asked {self.mapping} but got {chain['guest']['memtype']}")
        exp_c = chain["exporter"].get("caching")
        if host and exp_c and {"WB": "WB", "WC": "WC", "UC": "UC-"}.get(exp_c) != host:
            mism.append(f"exporter says {exp_c} but the host PTE is {host}")
        if host and chain["guest"]["memtype"] and host != {"write-back": "WB", "write-combining": "WC",
                                                           "uncached-minus": "UC-", "uncached": "UC"}.get(chain["guest"]["memtype"]):
            mism.append(f"host mapping {host} vs guest mapping {chain['guest']['memtype']} (NPT does not carry host PAT)")
        chain["mismatches"] = mism
        return chain

    def read_and_judge(self, generation: int, expect_tag: int | None) -> dict:
        r = self.guest_agent(f"read --caching {self.mapping}", timeout=300)
        if "guest_fault" in r:
            return {"verdict": "GUEST_FAULT", "pages": {}, "detail": r}
        j = oracle.judge(r["records"], buffer_id=self.buf["id"], generation=generation, expect_tag=expect_tag)
        j["read_ns"] = r.get("read_ns")
        j["guest_memtype"] = r.get("memtype")
        return j

    def baseline(self) -> None:
        self.check_vmm()
        j = self.read_and_judge(1, None)
        self.result["baseline"] = j
        ok = j["verdict"] == "REFAULTED"
        self.progress(f"baseline read: {j['pages']} -> {'ok' if ok else j['verdict']}")
        if not ok:
            raise RemoteError(f"baseline read is not the buffer the exporter made: {j}")

    def moves(self) -> None:
        generation = 1
        for mv in self.exp.expanded_moves():
            rec = {"n": mv["n"], "mode": mv["mode"], "expected": mv["expect"], "caching": mv["caching"]}
            self.result["moves"].append(rec)
            tag = None
            if self.result.get("vmm_fault"):
                rec.update(verdict="VMM_FAULT", pages={}, detail="not run: the VMM died earlier",
                           passed="VMM_FAULT" in mv["expect"])
                continue
            try:
                if mv["guest_write"]:
                    tag = TAG_BASE | mv["n"]
                    w = self.guest_agent(f"write --tag {tag} --caching {self.mapping}")
                    rec["guest_write"] = {"tag": hex(tag), "readback_ok": w.get("readback_ok")}
                if mv["concurrent"] and self.watch is None:
                    self.watch = Watch(self.stack.guest, self.mapping)
                if mv["inject"] == "kill-vmm":
                    self.stack.lab.run(f"kill -KILL {self.stack.guest.pid}", timeout=20, check=False)
                    rec["injected"] = "SIGKILL to the guest's QEMU before the move"
                t_sent = time.monotonic()
                try:
                    mres = self.agent.request("move", buf=self.buf["buf"], mode=mv["mode"],
                                              caching=mv["caching"])
                except AgentRequestFailed as e:
                    if e.errname in ("EOPNOTSUPP", "ENOTSUP"):
                        rec.update(verdict="UNSUPPORTED", pages={}, detail=str(e))
                        continue
                    raise
                generation = mres["generation"]
                rec["generation"] = generation
                rec["exporter_note"] = mres.get("what")
                if mv["interval_ms"]:
                    time.sleep(mv["interval_ms"] / 1000)
                if mv["concurrent"]:
                    rec["watch"] = self.watch.wait_generation(generation, t_sent, timeout=30)
                self.check_vmm()
                j = self.read_and_judge(generation, tag)
                rec.update(j)
                rec["seconds"] = round(time.monotonic() - t_sent, 4)  # move + full verified read
                if self.exp.section("exporter")["kind"] == "vmlab":
                    rec["exporter_info"] = self.agent.request("info", buf=self.buf["buf"])
            except VMMDied as e:
                rec.update(verdict="VMM_FAULT", pages={}, detail=str(e))
                self.result["vmm_fault"] = str(e)
            finally:
                rec["passed"] = rec.get("verdict") in mv["expect"]
                self.progress(f"move {mv['n']:3} {mv['mode']:15} -> {rec.get('verdict', '?'):12} "
                              f"expected {'/'.join(mv['expect'])} {rec.get('pages', '')}")
                self.save()

    def finish(self) -> None:
        moves = self.result["moves"]
        base = self.result.get("baseline", {}).get("verdict")
        self.result["passed"] = bool(moves) and all(m.get("passed") for m in moves) and (
            base == "REFAULTED" or (base == "VMM_FAULT" and all("VMM_FAULT" in m["expected"] for m in moves)))
        if self.exp.raw.get("gpu_roundtrip"):
            self.result["passed"] = self.result["passed"] and bool(self.result.get("virtio_gpu", {}).get("passed"))
        self.result["status"] = "finished"
        if self.watch is not None:
            self.result["watch"] = self.watch.close()
            lat = sorted(m["watch"]["latency_s"] for m in moves
                         if m.get("watch", {}).get("latency_s") is not None)
            if lat:
                self.result["watch"]["move_to_guest_latency_s"] = {
                    "n": len(lat), "p50": lat[len(lat) // 2], "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
                    "note": "controller clock, from sending MOVE to receiving the guest's watch line "
                            "(an upper bound: includes SSH transport both ways)"}
        self.result["ended"] = datetime.now(timezone.utc).isoformat()
        try:
            if self.agent is not None and self.exp.section("exporter")["kind"] == "vmlab" and self.buf:
                try:
                    self.result["final_exporter_info"] = self.agent.request("info", buf=self.buf["buf"])
                except Exception as e:
                    self.result["final_exporter_info"] = {"error": str(e)}
        finally:
            try:
                if self.stack is not None:
                    if self.stack.guest is not None:
                        self.stack.guest.down()
                        self.stack.guest = None
                    if self.agent is not None:
                        self.agent.close()
                    self.stack.down()
            finally:
                self.save()
                write_junit(self.out / "junit.xml", self.result)
                # per-run secrets and the share are worthless once the VMs are gone
                (self.out / "id_ed25519").unlink(missing_ok=True)
                shutil.rmtree(self.out / "share", ignore_errors=True)


class Watch:
    """The guest agent in watch mode on pages 0 and last, read live over one SSH channel."""

    def __init__(self, guest, mapping: str):
        self.chan = guest.session.open_exec(
            f"{AGENT} watch --duration 3600 --interval-us 100 --caching {mapping}")
        self.buf = b""
        self.events: list[dict] = []
        self.seen_gen = 0
        self._pump(0.5)

    def _pump(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while True:
            while self.chan.recv_ready():
                self.buf += self.chan.recv(65536)
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                ev["rx"] = time.monotonic()
                self.events.append(ev)
                if "generation" in ev and ev.get("status") == "ok":
                    self.seen_gen = max(self.seen_gen, ev["generation"])
            if time.monotonic() >= end or self.chan.exit_status_ready():
                return
            time.sleep(0.002)

    def wait_generation(self, gen: int, t_sent: float, timeout: float) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            hit = next((e for e in self.events if e.get("generation") == gen and e.get("status") == "ok"
                        and e["rx"] >= t_sent), None)
            if hit:
                return {"seen": True, "latency_s": round(hit["rx"] - t_sent, 6)}
            if self.chan.exit_status_ready():
                break
            self._pump(0.05)
        return {"seen": False, "latency_s": None}

    def close(self) -> dict:
        try:
            self.chan.close()
        except Exception:
            pass
        changes = [e for e in self.events if "generation" in e]
        return {"events": len(changes), "stale_observations":
                sum(1 for e in changes if e.get("state") == 2)}


def write_junit(path: Path, res: dict) -> None:
    cases = []
    for m in res["moves"]:
        name = f"move{m['n']:03d}-{m['mode']}"
        body = ""
        if not m.get("passed"):
            msg = f"verdict {m.get('verdict')} expected {'/'.join(m['expected'])}"
            body = f"<failure message={quoteattr(msg)}>{escape(json.dumps(m, default=str)[:4000])}</failure>"
        cases.append(f'  <testcase classname={quoteattr("vmlab." + res["experiment"])} name={quoteattr(name)}>{body}</testcase>')
    fails = sum(1 for m in res["moves"] if not m.get("passed"))
    path.write_text(f'<?xml version="1.0" encoding="UTF-8"?>\n<testsuite name={quoteattr("vmlab." + res["experiment"])} '
                    f'tests="{len(res["moves"])}" failures="{fails}">\n' + "\n".join(cases) + "\n</testsuite>\n")


def table(res: dict) -> str:
    lines = [f"{'move':>4}  {'mode':15} {'verdict':12} {'expected':22} pages"]
    for m in res["moves"]:
        lines.append(f"{m['n']:>4}  {m['mode']:15} {m.get('verdict', '?'):12} {'/'.join(m['expected']):22} "
                     f"{json.dumps(m.get('pages', {}))}{'' if m.get('passed') else '   <-- MISMATCH'}")
    return "\n".join(lines)


def main(args, progress) -> int:
    path = args.config or str(DEFAULT_CONFIG)
    exp = cfgmod.load(path)  # ConfigError -> exit 2 before anything starts
    out = results_dir(exp, args.out)
    passthrough = [f"--{flag.replace('_', '-')}={getattr(args, flag)}"
                   for flag in ("accel", "kernel", "guest_kernel", "kernel_image")
                   if getattr(args, flag, None)]
    write_reproducer(out, exp, passthrough)
    fh = logging.FileHandler(out / "vmlab.log")
    fh.setLevel(logging.DEBUG)
    fh.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(fh)
    root.setLevel(logging.DEBUG)
    for h in root.handlers:
        if h is not fh and not args.verbose:
            h.setLevel(logging.WARNING)
    progress(f"experiment {exp.name}: results in {out}")
    r = Run(exp, args, out, progress)
    r.save()
    try:
        rc = r.run()
    finally:
        root.removeHandler(fh)
        fh.close()
    print(table(r.result))
    print(f"{'PASSED' if r.result['passed'] else 'FAILED'}: results in {out}")
    return rc
