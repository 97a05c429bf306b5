"""Run untrusted Python (a model's completion) in a subprocess that cannot do harm.

Layers, each useful alone (`SandboxResult.isolation` lists those that were active):

- **time**: the process runs in its own session; at `timeout_s` (or as soon as it exits) the
  whole process group is SIGKILLed, so nothing it started survives. RLIMIT_CPU backs this up,
  and it is SIGKILLed if its parent (e.g. a reward worker killed at its own timeout) dies.
- **memory and files**: RLIMIT_AS (`memory_mb`), RLIMIT_FSIZE, RLIMIT_NOFILE, no core dumps.
- **processes**: RLIMIT_NPROC=0 (binds for non-root users: any fork fails) and an audit hook
  that refuses `os.fork`, `subprocess`, `os.system`, `os.exec*`, `posix_spawn`, signals to
  other processes, `ctypes` and `_posixsubprocess` (the ways around the hook).
- **network**: a fresh network namespace when the kernel allows it (`unshare`), and the audit
  hook refuses socket creation, connect and name lookups in any case.
- **filesystem**: the working directory is a fresh temporary directory, deleted afterwards;
  the audit hook refuses opening for writing, creating, deleting, renaming or linking any path
  that resolves outside it. Reading is allowed (imports need it).

The audit hook (PEP 578) is a guard for model-written code, not against a determined
attacker who knows the layout; run the reward workers in a container for that.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

_BOOT = Path(__file__).with_name("_sandbox_boot.py")


@dataclass(frozen=True)
class SandboxResult:
    returncode: int | None  # None when killed at the timeout; negative: killed by that signal
    stdout: str
    stderr: str
    timed_out: bool
    elapsed_s: float
    isolation: tuple[str, ...]  # the layers that were active, e.g. ("rlimits", "audit", "netns")

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def run_python(code: str, *, stdin: str = "", timeout_s: float = 5.0, memory_mb: int = 512,
               max_output_bytes: int = 1 << 20, python: str | None = None) -> SandboxResult:
    """Runs `code` as `__main__` in a sandboxed interpreter; see the module docstring.

    Args:
      code: Python source.
      stdin: text fed to its standard input.
      timeout_s: wall-clock limit; the process group is killed at it.
      memory_mb: address-space limit (RLIMIT_AS).
      max_output_bytes: stdout/stderr beyond this are cut (RLIMIT_FSIZE on the capture files).
      python: the interpreter (default: this one).
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s={timeout_s}: must be > 0")
    with tempfile.TemporaryDirectory(prefix="tandem-sandbox-") as top:
        work = Path(top) / "work"
        work.mkdir()
        (work / "main.py").write_text(code)
        limits = {
            "dir": str(work),
            "memory_bytes": int(memory_mb) << 20,
            "cpu_s": int(timeout_s) + 1,
            "fsize_bytes": int(max_output_bytes),
            "nofile": 64,
            "parent_pid": os.getpid(),
        }
        # The capture files live outside the work dir: the code writes them through fds 1 and
        # 2 only. RLIMIT_FSIZE caps them, so an endless print cannot fill the disk.
        with open(Path(top) / "stdout", "w+b") as out, open(Path(top) / "stderr", "w+b") as err:
            t0 = time.monotonic()
            proc = subprocess.Popen(
                [python or sys.executable, "-I", str(_BOOT), json.dumps(limits)],
                cwd=work, stdin=subprocess.PIPE, stdout=out, stderr=err,
                env={"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work),
                     "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"},
                start_new_session=True, close_fds=True,
            )
            timed_out = False
            try:
                proc.communicate(stdin.encode(), timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            except BrokenPipeError:  # it exited without reading its stdin
                pass
            finally:
                # Kill the group whether or not the main process is still there: anything
                # it managed to start dies with it.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            elapsed = time.monotonic() - t0
            out.seek(0)
            err.seek(0)
            stdout = out.read(max_output_bytes).decode(errors="replace")
            stderr = err.read(max_output_bytes).decode(errors="replace")
    isolation = ("session", "rlimits", "audit")
    marker = "\x00tandem-isolation:"
    if marker in stderr:  # the boot script reports the extra layers it got, then erases itself
        head, _, tail = stderr.partition(marker)
        layers, _, rest = tail.partition("\n")
        isolation += tuple(x for x in layers.split(",") if x)
        stderr = head + rest
    return SandboxResult(None if timed_out else proc.returncode, stdout, stderr, timed_out,
                         elapsed, isolation)
