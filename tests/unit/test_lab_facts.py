"""The lab's facts as the host agent reads them (op lab_facts) against the facts script
they replace in a run: the same files of this machine, the same parsed facts."""
from __future__ import annotations

import subprocess

from vmlab import lab
from vmlab.exporter import AgentRequestFailed
from vmlab import hostagent   # after lab: it puts vmlab/ first on sys.path (its lab-side imports)

# kvm where it is loaded, two that every kernel has (one with write-only parameters
# that grep cannot read either), and one that is not there
MODULES = ("kvm", "kernel", "printk", "vmlab_no_such_module")


def _script_facts(cache, modules) -> dict:
    r = subprocess.run(["sh", "-c", f"cat {cache}\n" + lab._live_facts(modules)],
                       capture_output=True, text=True, timeout=60)
    return lab.parse_facts(r.stdout)


def test_the_agents_facts_are_the_scripts(tmp_path):
    cache = tmp_path / "lab-facts"
    cache.write_text("release=6.12.0-test\nqemu=QEMU emulator version 9.2.0 (Debian 1:9.2)\n"
                     "kernel_package=6.12.1-1\n")
    text = hostagent.Agent().op_lab_facts({"cache": str(cache), "modules": list(MODULES)})["text"]
    by_agent = lab.parse_facts(text)
    for _ in range(3):      # a parameter that changed between the two reads: both again
        by_script = _script_facts(cache, MODULES)
        if by_agent == by_script:
            break
        by_agent = lab.parse_facts(
            hostagent.Agent().op_lab_facts({"cache": str(cache), "modules": list(MODULES)})["text"])
    assert by_agent == by_script
    assert by_agent["release"] == "6.12.0-test" and by_agent["qemu"] == "9.2.0 (Debian 1:9.2)"
    assert by_agent["cmdline"] and by_agent["module_params"]["kernel"]
    assert "vmlab_no_such_module" not in by_agent["module_params"]


def test_nothing_cached_is_no_answer(tmp_path):
    agent = hostagent.Agent()
    assert agent.op_lab_facts({"cache": str(tmp_path / "none"), "modules": []})["text"] is None
    (tmp_path / "empty").write_text("\n")
    assert agent.op_lab_facts({"cache": str(tmp_path / "empty"), "modules": []})["text"] is None


class _Lab:
    kind = "nested"

    def __init__(self):
        self.scripts = []

    def run(self, script, **kw):
        self.scripts.append(script)
        return 0, "release=6.1.0\nqemu=QEMU emulator version 7.2.0\ncmdline=x\n", ""


class _Agent:
    def __init__(self, text, error=None):
        self.text, self.error = text, error

    def request(self, op, **kw):
        assert op == "lab_facts" and kw["cache"] == lab._CACHED
        if self.error:
            raise self.error
        return {"text": self.text}


def test_a_run_takes_the_agents_answer_and_else_runs_the_script():
    vm = _Lab()
    assert lab.lab_facts(vm, _Agent("release=6.12.0\ncmdline=y\n"))["release"] == "6.12.0"
    assert vm.scripts == []
    assert lab.lab_facts(vm, _Agent(None))["qemu"] == "7.2.0"
    assert vm.scripts == [lab._NESTED_FACTS]
    # an agent that cannot answer: the script says the same, slower
    failed = AgentRequestFailed("lab_facts", {"error": "unknown op", "errname": "EINVAL"})
    assert lab.lab_facts(vm, _Agent("release=never\n", error=failed))["release"] == "6.1.0"
    assert vm.scripts == [lab._NESTED_FACTS] * 2
    box = _Lab()
    box.kind = "ssh"     # a box's QEMU may change between runs: its script, every time
    lab.lab_facts(box, _Agent("release=never\n"))
    assert box.scripts == [lab._STATIC_FACTS + lab._LIVE_FACTS]
