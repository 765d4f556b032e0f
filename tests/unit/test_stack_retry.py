"""Stack.up_lab's one retry, against a fake lab (the real path runs in
tests/lab/test_lifecycle.py: a kernel that never comes up is booted twice, exit 125)."""
import pytest

from vmlab import stack
from vmlab.errors import BootFailure


class FakeLab:
    outcomes: list = []
    made = 0

    def __init__(self, workdir, opts):
        self.workdir = workdir
        FakeLab.made += 1

    def up(self, lab_image, guest_image, progress):
        (self.workdir / "lab-console.log").write_text(f"boot {FakeLab.made}\n")
        what = FakeLab.outcomes.pop(0)
        if what is not None:
            raise what


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(stack, "NestedLab", FakeLab)
    monkeypatch.setattr(stack, "lab_images", lambda *a, **k: (None, None))
    FakeLab.made = 0
    return FakeLab


def _stack(tmp_path, attempts=stack.LAB_BOOT_ATTEMPTS):
    return stack.Stack(tmp_path, lambda m: None, stack.LabOptions(), lab_boot_attempts=attempts)


def test_a_lab_that_panics_once_is_booted_again_and_the_first_console_kept(fake, tmp_path):
    fake.outcomes = [BootFailure("lab", "kernel panic: boom", str(tmp_path / "lab-console.log")), None]
    s = _stack(tmp_path)
    assert isinstance(s.up_lab(), FakeLab) and fake.made == 2
    assert s.boot_failures == [{"attempt": 1, "cause": "kernel panic: boom",
                                "logs": ["lab-console.attempt1.log"]}]
    assert (tmp_path / "lab-console.attempt1.log").read_text() == "boot 1\n"
    assert (tmp_path / "lab-console.log").read_text() == "boot 2\n"


def test_two_failures_raise_the_last_and_name_the_first(fake, tmp_path):
    fake.outcomes = [BootFailure("lab", "kernel panic: one"), BootFailure("lab", "no 'ready' within 9s")]
    s = _stack(tmp_path)
    with pytest.raises(BootFailure, match=r"within 9s.*attempt 1: kernel panic: one") as ei:
        s.up_lab()
    assert ei.value.exit_code == 125 and fake.made == 2 and s.lab is None


def test_a_qemu_that_refuses_to_start_is_not_retried(fake, tmp_path):
    fake.outcomes = [BootFailure("lab", "QEMU exited early: could not load kernel", retryable=False)]
    with pytest.raises(BootFailure):
        _stack(tmp_path).up_lab()
    assert fake.made == 1


def test_benches_that_count_flakes_boot_once(fake, tmp_path):
    fake.outcomes = [BootFailure("lab", "kernel panic: boom")]
    with pytest.raises(BootFailure):
        _stack(tmp_path, attempts=1).up_lab()
    assert fake.made == 1


class FakeGuest:
    outcomes: list = []
    made = 0

    def __init__(self, lab, opts, workdir):
        self.workdir, self.opts = workdir, opts
        FakeGuest.made += 1

    def up(self, progress):
        (self.workdir / f"{self.opts.name}-console.log").write_text(f"boot {FakeGuest.made}\n")
        what = FakeGuest.outcomes.pop(0)
        if what is not None:
            raise what


def test_a_guest_that_oopses_in_boot_is_booted_once_more_and_counted(monkeypatch, tmp_path):
    monkeypatch.setattr(stack, "Guest", FakeGuest)
    FakeGuest.made = 0
    FakeGuest.outcomes = [BootFailure("guest", "kernel oops during boot: kdevtmpfs exited with irqs disabled"), None]
    s = _stack(tmp_path)
    assert isinstance(s.up_guest(), FakeGuest) and FakeGuest.made == 2
    assert s.guest_boot_failures[0]["cause"].startswith("kernel oops during boot")
    assert (tmp_path / "guest-console.attempt1.log").read_text() == "boot 1\n"
    # a QEMU that would not start is not retried; the second failure is the answer
    FakeGuest.made = 0
    FakeGuest.outcomes = [BootFailure("guest", "QEMU in the lab exited early: x", retryable=False)]
    with pytest.raises(BootFailure, match="exited early"):
        _stack(tmp_path).up_guest()
    assert FakeGuest.made == 1
    FakeGuest.made = 0
    FakeGuest.outcomes = [BootFailure("guest", "one"), BootFailure("guest", "two")]
    s = _stack(tmp_path)
    with pytest.raises(BootFailure, match="two"):
        s.up_guest()
    assert FakeGuest.made == 2 and len(s.guest_boot_failures) == 1 and s.guest is None
    # where a second boot cannot work (virtio-shm's back-end serves one connection): one
    FakeGuest.made = 0
    FakeGuest.outcomes = [BootFailure("guest", "one")]
    s = stack.Stack(tmp_path, lambda m: None, stack.LabOptions(), guest_boot_attempts=1)
    with pytest.raises(BootFailure, match="one"):
        s.up_guest()
    assert FakeGuest.made == 1
