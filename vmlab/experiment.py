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
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from . import config as cfgmod
from . import oracle
from .errors import RemoteError, UserError, WaitTimeout
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
              f"cd {shlex.quote(str(repo_root()))} || exit 1\n"
              f"exec vmlab run \"$(dirname \"$0\")/config.yaml\" {' '.join(shlex.quote(a) for a in argv)} \"$@\"\n")
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
        self.mapping = exp.section("guest").get("mapping", "uc")

    # --- helpers ------------------------------------------------------------------------
    def save(self) -> None:
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(self.result, indent=2, sort_keys=True, default=str) + "\n")
        tmp.rename(self.out / "results.json")

    def guest_agent(self, cmd: str, timeout: float = 120) -> dict:
        """Run the guest agent; returns its JSON. Raises VMMDied when the guest's QEMU
        died or stopped, so the caller records VMM_FAULT instead of hanging."""
        g = self.stack.guest
        try:
            rc, out, err = g.run(f"{AGENT} {cmd}", timeout=timeout, check=False)
        except (WaitTimeout, OSError, EOFError, RemoteError) as e:
            self.check_vmm()
            raise RemoteError(f"guest agent '{cmd}' did not answer: {e}")
        if rc == 3:
            return {"guest_fault": json.loads(out or "{}"), "stderr": err.strip()}
        if rc != 0:
            self.check_vmm()
            raise RemoteError(f"guest agent '{cmd}' exited {rc}: {err.strip() or out.strip()}")
        return json.loads(out)

    def check_vmm(self) -> None:
        g = self.stack.guest
        alive = g.alive()
        status = None
        if alive:
            try:
                status = g.cmd("query-status").get("status")
            except Exception as e:  # a wedged QMP is itself a VMM problem
                status = f"qmp-error: {e}"
        if not alive or status in ("internal-error", "shutdown", "guest-panicked") or \
                (status and status.startswith("qmp-error")):
            _, qlog, _ = self.stack.lab.run(f"tail -n 20 {g.dir}/qemu.log", timeout=30, check=False)
            words = [ln for ln in qlog.splitlines() if ln.strip()]
            last = next((ln for ln in words if "kvm run failed" in ln.lower() or "KVM_RUN" in ln or
                         "error" in ln.lower()), words[-1] if words else "")
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
            self.baseline()
            self.moves()
        except VMMDied as e:
            self.progress(f"VMM fault: {e}")
            self.result["vmm_fault"] = str(e)
        finally:
            self.finish()
        return 0 if self.result["passed"] else 1

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
                rec.update(verdict="VMM_FAULT", pages={}, detail="not run: the VMM died earlier")
                continue
            try:
                if mv["guest_write"]:
                    tag = TAG_BASE | mv["n"]
                    w = self.guest_agent(f"write --tag {tag} --caching {self.mapping}")
                    rec["guest_write"] = {"tag": hex(tag), "readback_ok": w.get("readback_ok")}
                watch = None
                if mv["concurrent"]:
                    watch = self.stack.guest.session.open_exec(
                        f"{AGENT} watch --duration 5 --interval-us 200 --caching {self.mapping}")
                    time.sleep(0.5)
                if mv["inject"] == "kill-vmm":
                    self.stack.lab.run(f"kill -KILL {self.stack.guest.pid}", timeout=20, check=False)
                    rec["injected"] = "SIGKILL to the guest's QEMU before the move"
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
                if watch is not None:
                    rec["watch"] = self.collect_watch(watch, mres)
                self.check_vmm()
                j = self.read_and_judge(generation, tag)
                rec.update(j)
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

    def collect_watch(self, chan, mres: dict) -> dict:
        out = b""
        deadline = time.monotonic() + 30
        while not chan.exit_status_ready() and time.monotonic() < deadline:
            while chan.recv_ready():
                out += chan.recv(65536)
            time.sleep(0.1)
        while chan.recv_ready():
            out += chan.recv(65536)
        chan.close()
        events = [json.loads(ln) for ln in out.decode(errors="replace").splitlines() if ln.startswith("{")]
        changes = [e for e in events if "generation" in e]
        first_new = [e for e in changes if e.get("generation") == mres["generation"]]
        res = {"events": len(changes), "done": next((e for e in events if e.get("done")), None)}
        if first_new:
            # guest and lab share no clock: latency is bounded by the guest's own view
            res["first_new_generation_t_ns"] = min(e["t_ns"] for e in first_new)
        return res

    def finish(self) -> None:
        moves = self.result["moves"]
        self.result["passed"] = bool(moves) and all(m.get("passed") for m in moves) \
            and self.result.get("baseline", {}).get("verdict") == "REFAULTED"
        self.result["status"] = "finished"
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
    passthrough = [f"--accel={args.accel}"] if args.accel else []
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
