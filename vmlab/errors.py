"""The one error tree of vmlab.

    VmlabError                 anything vmlab reports as a failure
    ├── UserError              exit 2, one line, no traceback: the user can fix it
    │   ├── ConfigError        bad YAML/CLI input (names the file and key path)
    │   ├── ImageMissing       an image that is not built and may not be built now
    │   ├── QemuRefused        QEMU exited at once over how it was asked to run (an option,
    │   │                      /dev/kvm, memory), not over the kernel it was given
    │   └── NotRoot            an action needs root
    ├── CouldNotTest           exit 125, one line: what belongs to the kernel or QEMU under
    │   │                      test failed before an experiment could judge anything
    │   │                      (`git bisect run` reads 125 as "skip this commit")
    │   ├── BootFailure        a VM did not come up: names cause and console log
    │   └── NotApplicable      the lab kernel lacks what the experiment needs (udmabuf,
    │                          a dma-heap): a matrix cell with a reason, never a verdict
    └── InfraError             exit 1, with traceback in the log: vmlab or the machine broke
        ├── CommandFailed      a subprocess exited non-zero (argv, rc, output kept)
        ├── WaitTimeout        a bounded wait ran out (what was awaited, how long)
        └── RemoteError        a command on the lab host or guest failed

Only ``vmlab.cli.main`` turns these into exit codes.
"""
from __future__ import annotations


class VmlabError(Exception):
    exit_code = 1


class UserError(VmlabError):
    exit_code = 2


class ConfigError(UserError):
    def __init__(self, path: str, key: str, msg: str):
        self.path, self.key, self.msg = path, key, msg
        super().__init__(f"{path}: {key}: {msg}" if key else f"{path}: {msg}")


class ImageMissing(UserError):
    pass


class CouldNotTest(VmlabError):
    exit_code = 125


class BootFailure(CouldNotTest):
    """``retryable``: False when QEMU refused to start at all (its arguments; the same
    again), True when a started VM did not come up (a panic, a hang: TCG can flake)."""

    def __init__(self, what: str, cause: str, console: str | None = None, retryable: bool = True):
        self.what, self.cause, self.console, self.retryable = what, cause, console, retryable
        tail = f" (console log: {console})" if console else ""
        super().__init__(f"{what} failed to boot: {cause}{tail}")


class NotApplicable(CouldNotTest):
    """The experiment cannot run on this lab kernel at all (a missing device or feature);
    ``reason`` says which. Not a verdict: a matrix cell that is not applicable."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


class QemuRefused(UserError):
    pass


class NotRoot(UserError):
    pass


class InfraError(VmlabError):
    exit_code = 1


class CommandFailed(InfraError):
    def __init__(self, argv, returncode: int, stdout: str = "", stderr: str = ""):
        self.argv, self.returncode, self.stdout, self.stderr = argv, returncode, stdout, stderr
        last = (stderr or stdout).strip().splitlines()[-3:]
        cmd = argv if isinstance(argv, str) else " ".join(map(str, argv))
        super().__init__(f"command failed (exit {returncode}): {cmd}: {' | '.join(last)}")


class WaitTimeout(InfraError):
    def __init__(self, what: str, timeout: float, detail: str = ""):
        self.what, self.timeout = what, timeout
        super().__init__(f"timed out after {timeout:.0f}s waiting for {what}"
                         + (f": {detail}" if detail else ""))


class RemoteError(InfraError):
    pass
