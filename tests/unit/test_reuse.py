"""vmlab/reuse.py: when a command may run in the lab that `vmlab lab up` left running
(the lab test in tests/lab/test_cli_lifecycle.py runs two experiments in one)."""
from __future__ import annotations

from vmlab import reuse

HAVE = {"kernel": "trixie", "qemu": "default", "kernel_image": None, "memory_mb": 3072,
        "extra_qemu_args": [], "hwtrace_plugin": None, "accel": "tcg",
        "image": "/c/lab-trixie-aa", "guest_image": "/c/guest-trixie-bb"}


def want(**kw):
    return {**HAVE, "accel": "auto", **kw}


def test_same_shape_is_reused_and_auto_takes_the_labs_accel():
    assert reuse.shape_mismatch(HAVE, want()) is None
    assert reuse.shape_mismatch(HAVE, want(accel="tcg")) is None


def test_each_difference_is_named():
    assert "kvm" in reuse.shape_mismatch(HAVE, want(accel="kvm"))
    assert "kernel is 'trixie'" in reuse.shape_mismatch(HAVE, want(kernel="trixie-backports"))
    assert "memory_mb" in reuse.shape_mismatch(HAVE, want(memory_mb=2048))
    assert "extra_qemu_args" in reuse.shape_mismatch(HAVE, want(extra_qemu_args=["-d", "int"]))
    assert "hwtrace_plugin" in reuse.shape_mismatch(HAVE, want(hwtrace_plugin="x.so"))
    # a rebuilt exporter or agent is a new image key: the running lab has the old one
    assert "image" in reuse.shape_mismatch(HAVE, want(image="/c/lab-trixie-cc"))
    assert "not built yet" in reuse.shape_mismatch(HAVE, want(guest_image=None))
    assert "no shape" in reuse.shape_mismatch(None, want())
