"""Logs of a VM set aside before the next VM of that name writes its own (a retried boot,
a saved guest replaced, a matrix lab booted again)."""
from vmlab.paths import set_aside


def test_existing_logs_get_the_tag_before_log_and_missing_ones_are_skipped(tmp_path):
    (tmp_path / "lab-console.log").write_text("boot 1")
    (tmp_path / "lab.qemu.log").write_text("qemu 1")
    kept = set_aside(tmp_path, ("lab-console.log", "lab.qemu.log", "lab-dmesg.log"), "attempt1")
    assert kept == ["lab-console.attempt1.log", "lab.qemu.attempt1.log"]
    assert (tmp_path / "lab-console.attempt1.log").read_text() == "boot 1"
    assert not (tmp_path / "lab-console.log").exists() and not (tmp_path / "lab-dmesg.attempt1.log").exists()
