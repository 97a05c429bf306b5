"""The sandbox's first stage (see rewards/sandbox.py): isolate, limit, guard, then run main.py.

Runs as `python -I _sandbox_boot.py '<limits json>'` with the work directory as cwd. Standard
library only; nothing here may be imported by the controller.
"""

import contextlib
import ctypes
import json
import os
import resource
import sys

_LIMITS = json.loads(sys.argv[1])
_ROOT = os.path.realpath(_LIMITS["dir"])
_layers = []

# PARENT DEATH: if whoever started us dies (a reward worker killed at its timeout), so do we.
_PR_SET_PDEATHSIG = 1
with contextlib.suppress(OSError, AttributeError):
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, 9)  # SIGKILL
if os.getppid() != _LIMITS["parent_pid"]:  # it died before prctl took effect
    os._exit(137)

# NETWORK: a new network namespace has no interfaces but a downed loopback. Root may create one
# directly; an ordinary user needs a user namespace with it (not every kernel allows that).
_CLONE_NEWNET, _CLONE_NEWUSER = 0x40000000, 0x10000000
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _flags = _CLONE_NEWNET if os.geteuid() == 0 else _CLONE_NEWNET | _CLONE_NEWUSER
    if _libc.unshare(_flags) == 0:
        _layers.append("netns")
except (OSError, AttributeError):
    pass

# LIMITS: memory, CPU seconds, file size, open files, no core files, no new processes.
for _res, _value in (
    (resource.RLIMIT_AS, _LIMITS["memory_bytes"]),
    (resource.RLIMIT_CPU, _LIMITS["cpu_s"]),
    (resource.RLIMIT_FSIZE, _LIMITS["fsize_bytes"]),
    (resource.RLIMIT_NOFILE, _LIMITS["nofile"]),
    (resource.RLIMIT_CORE, 0),
    (resource.RLIMIT_NPROC, 0),  # binds for non-root users only (root is exempt)
):
    try:
        resource.setrlimit(_res, (_value, _value))
    except (ValueError, OSError):
        continue
    if _res == resource.RLIMIT_NPROC and os.geteuid() != 0:
        _layers.append("nproc")

sys.stderr.write("\x00tandem-isolation:" + ",".join(_layers) + "\n")
sys.stderr.flush()

with open("main.py") as _f:
    _SOURCE = _f.read()

# GUARD: an audit hook (PEP 578) refuses what sandboxed code must not do. Hooks cannot be
# removed once added.
_DENY = {
    "os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.spawn", "os.system",
    "os.kill", "os.killpg", "signal.pthread_kill", "subprocess.Popen", "pty.spawn",
    "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo",
    "socket.gethostbyname", "socket.gethostbyaddr", "socket.sendto",
    "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function",
    "resource.setrlimit", "resource.prlimit", "sys.addaudithook", "os.setuid", "os.setgid",
}
_DENY_IMPORTS = {"ctypes", "_ctypes", "_posixsubprocess", "cffi", "_multiprocessing"}
_PATH_EVENTS = {  # event -> indices of its path arguments
    "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1),
    "os.link": (0, 1), "os.symlink": (0, 1), "os.truncate": (0,), "os.chmod": (0,),
    "os.chown": (0,), "os.utime": (0,), "os.chflags": (0,), "os.lchflags": (0,),
    "os.mkfifo": (0,), "os.mknod": (0,), "shutil.rmtree": (0,), "os.setxattr": (0,),
    "os.removexattr": (0,),
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_realpath, _join, _getcwd, _fspath = os.path.realpath, os.path.join, os.getcwd, os.fspath


def _inside(path):
    if isinstance(path, int):  # an already-open fd
        return True
    p = _fspath(path)
    if isinstance(p, bytes):
        p = p.decode(errors="replace")
    real = _realpath(_join(_getcwd(), p))
    return real == _ROOT or real.startswith(_ROOT + os.sep)


def _hook(event, args):
    if event in _DENY:
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "import" and args[0].partition(".")[0] in _DENY_IMPORTS:
        raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
    if event == "open":
        path, mode, flags = args
        writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (
            mode is None and isinstance(flags, int) and flags & _WRITE_FLAGS)
        if writing and path is not None and not _inside(path):
            raise PermissionError(f"sandbox: writing {path!r} outside the sandbox directory")
    elif event in _PATH_EVENTS:
        for i in _PATH_EVENTS[event]:
            if i < len(args) and args[i] is not None and not _inside(args[i]):
                raise PermissionError(f"sandbox: {event} on {args[i]!r} outside the sandbox "
                                      f"directory")


sys.addaudithook(_hook)
del ctypes, _libc  # the boot's own ctypes handle is not left to the code

_code = compile(_SOURCE, "main.py", "exec")
exec(_code, {"__name__": "__main__", "__file__": "main.py", "__builtins__": __builtins__})
