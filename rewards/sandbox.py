"""Run untrusted Python (a model's completion) in a subprocess that cannot do harm.

Layers, each useful alone (`SandboxResult.isolation` lists those that were active). The OS
layers (netns, mount-ns, landlock, nocaps, seccomp) bind for root too and cannot be lifted
from inside; the audit hook is an extra layer that explains refusals in Python's terms:

- **time** ("session"): the process runs in its own session; at `timeout_s` (or as soon as it
  exits) the whole process group is SIGKILLed, so nothing it started survives. RLIMIT_CPU backs
  this up, and it is SIGKILLed if its parent (e.g. a reward worker killed at its own timeout)
  dies.
- **memory and files** ("rlimits"): RLIMIT_AS (`memory_mb`), RLIMIT_FSIZE, RLIMIT_NOFILE, no
  core dumps.
- **filesystem**: the working directory is a fresh temporary directory, deleted afterwards,
  and the only place it can change. "landlock": a Landlock ruleset (Linux 5.13+) allows
  reading and executing anywhere and every change only beneath it, whatever the route (dir_fd,
  symlinks, rename, link, C libraries that open files themselves). "mount-ns": a private
  mount namespace in which every mount is read-only but the working directory (root, or a
  user namespace). Reading stays allowed everywhere: imports need it. Landlock leaves file
  metadata alone: seccomp refuses chown and xattrs, but chmod and utime of files it owns
  outside are refused only by the mount namespace (so, without one, root can still do them).
- **processes**: "seccomp": a BPF filter refuses fork, vfork, clone without CLONE_THREAD (so
  threads still work) and exec, signals to other processes, plus sockets, namespaces, mounts,
  ptrace, chown, xattrs and the kernel-wide calls. "nocaps": root keeps uid 0 but drops every
  capability (so it cannot raise its limits, leave its namespaces, or pass file permissions).
  "nproc": RLIMIT_NPROC=0, which binds for non-root users only. Landlock (ABI 6) also keeps
  signals inside.
- **network**: "netns": a fresh network namespace with no interfaces up; seccomp refuses
  socket(); Landlock (ABI 4) refuses TCP bind and connect.
- **audit hook** ("audit", PEP 578): refuses `os.fork`, `subprocess`, `os.system`, `exec`,
  `posix_spawn`, signals, sockets, `ctypes` and `_posixsubprocess`, and writes to paths that
  resolve outside the working directory. Code can subvert the hook (it sees only Python-level
  calls and trusts the stdlib), which is why the OS layers are the ones that bind.

With `strict=True`, `run_python` raises `SandboxUnavailableError` instead of running the code
when the OS enforces no filesystem layer (landlock, mount-ns) or no process layer (seccomp,
nproc). Without it, the code runs with the layers there are, and the first run in a process
logs them (a warning when the filesystem rules rest on the audit hook alone). For a
determined attacker, run the reward workers in a container or VM as well.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

_BOOT = Path(__file__).with_name("_sandbox_boot.py")
_MARKER = "\x00tandem-boot:"  # the boot's report, the first line of the child's stderr
_FS_LAYERS = ("landlock", "mount-ns")
# How to get the OS layers where they are missing (for SandboxUnavailableError).
STRICT_FIX = ("run on Linux 5.13+ with Landlock enabled (`landlock` in the kernel's lsm= list; "
              "in a container, a seccomp profile that allows the landlock_* calls), or where "
              "unshare(CLONE_NEWNS) is allowed (root, or unprivileged user namespaces)")
# Layers the boot leaves out; tests set this to check the others alone. Never set otherwise.
_TEST_SKIP_LAYERS: frozenset[str] = frozenset()
_logger = logging.getLogger(__name__)
_reported: set[tuple[str, ...]] = set()


class SandboxUnavailableError(RuntimeError):
    """strict=True, but the OS does not enforce the sandbox's filesystem or process rules."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason  # what is missing, and why the OS refused it


def _unavailable(reason: str) -> SandboxUnavailableError:
    return SandboxUnavailableError(f"run_python(strict=True): {reason} (fix: {STRICT_FIX}; or "
                                   f"pass strict=False to run with the layers there are)", reason)


@dataclass(frozen=True)
class SandboxResult:
    returncode: int | None  # None when killed at the timeout; negative: killed by that signal
    stdout: str
    stderr: str
    timed_out: bool
    elapsed_s: float
    isolation: tuple[str, ...]  # the layers that were active, e.g. ("landlock", "seccomp")

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def run_python(code: str, *, stdin: str = "", timeout_s: float = 5.0, memory_mb: int = 512,
               max_output_bytes: int = 1 << 20, python: str | None = None,
               strict: bool = False) -> SandboxResult:
    """Runs `code` as `__main__` in a sandboxed interpreter; see the module docstring.

    Args:
      code: Python source.
      stdin: text fed to its standard input.
      timeout_s: wall-clock limit; the process group is killed at it.
      memory_mb: address-space limit (RLIMIT_AS).
      max_output_bytes: stdout/stderr beyond this are cut (RLIMIT_FSIZE on the capture files).
      python: the interpreter (default: this one).
      strict: raise `SandboxUnavailableError` instead of running the code when the OS enforces
        no filesystem layer (landlock, mount-ns) or no process layer (seccomp, nproc).
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
            "strict": bool(strict),
            "skip": sorted(_TEST_SKIP_LAYERS),
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
    # The boot reports the layers it got before the code runs, so the first marker is its own.
    boot = None
    if _MARKER in stderr:
        head, _, tail = stderr.partition(_MARKER)
        line, _, rest = tail.partition("\n")
        with contextlib.suppress(ValueError):
            boot = json.loads(line)
        stderr = head + rest
    if boot is None:  # it failed (or was killed) before it could report
        if strict and not timed_out:
            raise _unavailable(f"the sandbox did not start: {stderr[-500:]!r}")
        boot = {"layers": [], "missing": {}, "refused": None}
    elif boot["refused"]:
        raise _unavailable(boot["refused"])
    else:
        _report(("session", "rlimits", *boot["layers"]), boot["missing"])
    isolation = ("session", "rlimits", *boot["layers"])
    return SandboxResult(None if timed_out else proc.returncode, stdout, stderr, timed_out,
                         elapsed, isolation)


def _report(isolation: tuple[str, ...], missing: dict[str, str]) -> None:
    """Logs the layers once per process (and again if they change)."""
    if isolation in _reported:
        return
    _reported.add(isolation)
    _logger.info("code sandbox layers: %s", ", ".join(isolation))
    if not set(_FS_LAYERS) & set(isolation):
        _logger.warning(
            "code sandbox: the OS enforces no filesystem layer here (%s), so writes outside "
            "the sandbox's directory are stopped by the audit hook alone; to require one, set "
            "strict (rewards.kwargs.code.strict=true for the code reward). Fix: %s",
            "; ".join(f"{k}: {missing.get(k, '?')}" for k in _FS_LAYERS), STRICT_FIX)
