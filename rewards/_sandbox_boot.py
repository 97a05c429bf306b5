"""The sandbox's first stage (see rewards/sandbox.py): isolate, limit, guard, then run main.py.

Runs as `python -I _sandbox_boot.py '<limits json>'` with the work directory as cwd. Standard
library only; nothing here may be imported by the controller. Before the code runs, its first
line on stderr reports the layers it got (sandbox.py reads and removes that line), and with
`strict` it exits there instead when the OS enforces no filesystem or no process layer.

The OS layers (namespaces, Landlock, seccomp) are set up with raw syscalls through ctypes and
bind for root too; once set they cannot be lifted by this process or anything it runs.
"""

import contextlib
import ctypes
import json
import os
import resource
import struct
import sys
import types

_LIMITS = json.loads(sys.argv[1])
_ROOT = os.path.realpath(_LIMITS["dir"])
_SKIP = frozenset(_LIMITS.get("skip", ()))  # layers left out (tests check one layer alone)
_layers = []
_missing = {}  # layer -> why the OS did not give it
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _check(ret, what):
    """Raises OSError for a libc call's -1, with the errno it set."""
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def _attempt(layer, setup):
    """Runs `setup`; its layer is reported when it succeeds, its error when it does not."""
    if layer in _SKIP:
        _missing[layer] = "left out"
        return
    try:
        setup()
    except Exception as e:  # a layer the OS refuses is reported, never fatal
        _missing[layer] = f"{type(e).__name__}: {e}"
    else:
        _layers.append(layer)
        _missing.pop(layer, None)


# PARENT DEATH: if whoever started us dies (a reward worker killed at its timeout), so do we.
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS = 1, 38
with contextlib.suppress(OSError, AttributeError):
    _libc.prctl(_PR_SET_PDEATHSIG, 9)  # SIGKILL
if os.getppid() != _LIMITS["parent_pid"]:  # it died before prctl took effect
    os._exit(137)
# No exec may gain privileges (setuid files); Landlock and seccomp require this of non-root.
_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)

# NAMESPACES: a new network namespace has no interfaces but a downed loopback; a new mount
# namespace gets every mount read-only but the work directory. Root may create them directly;
# an ordinary user needs a user namespace with them (not every kernel allows that), in which it
# keeps its own uid and gid.
_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
_MS_BIND, _MS_REC, _MS_PRIVATE = 0x1000, 0x4000, 0x40000
_AT_FDCWD, _AT_RECURSIVE, _MOUNT_ATTR_RDONLY, _SYS_MOUNT_SETATTR = -100, 0x8000, 0x1, 442


def _unshare(flags):
    _check(_libc.unshare(flags), f"unshare({flags:#x})")
    if flags & _CLONE_NEWUSER:
        uid, gid = os.getuid(), os.getgid()
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                           ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)


def _mount_setattr(path, flags, attr_set, attr_clr):
    attr = struct.pack("QQQQ", attr_set, attr_clr, 0, 0)  # struct mount_attr
    _check(_libc.syscall(_SYS_MOUNT_SETATTR, _AT_FDCWD, path.encode(), flags, attr, len(attr)),
           f"mount_setattr({path})")


def _read_only_but_work():
    """In this (new) mount namespace: everything read-only, the work directory writable."""
    root = _ROOT.encode()
    # Private first, so that nothing done here propagates to the mounts outside.
    _check(_libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "make / private")
    _check(_libc.mount(root, root, None, _MS_BIND, None), f"bind {_ROOT}")
    _mount_setattr("/", _AT_RECURSIVE, _MOUNT_ATTR_RDONLY, 0)
    _mount_setattr(_ROOT, 0, 0, _MOUNT_ATTR_RDONLY)
    os.chdir(_ROOT)  # the cwd still is the directory as it was before the bind: read-only


if os.geteuid() == 0:
    _attempt("netns", lambda: _unshare(_CLONE_NEWNET))
    _attempt("mount-ns", lambda: (_unshare(_CLONE_NEWNS), _read_only_but_work()))
else:
    try:
        _flags = _CLONE_NEWUSER | _CLONE_NEWNET
        _unshare(_flags | (0 if "mount-ns" in _SKIP else _CLONE_NEWNS))
    except OSError as e:
        _missing["netns"] = _missing["mount-ns"] = str(e)
        _attempt("netns", lambda: _unshare(_flags))
    else:
        _layers.append("netns")
        _attempt("mount-ns", _read_only_but_work)

# LANDLOCK: a ruleset the kernel enforces on this process and all it could start, root or
# not: read and execute anywhere, change files only under the work directory; no TCP bind or
# connect (ABI 4); no signals to processes outside, no abstract unix sockets (ABI 6).
_SYS_LANDLOCK = {"create_ruleset": 444, "add_rule": 445, "restrict_self": 446}
_LL_EXECUTE, _LL_READ_FILE, _LL_READ_DIR = 1 << 0, 1 << 2, 1 << 3
_LL_RULE_PATH_BENEATH, _LL_CREATE_RULESET_VERSION = 1, 1


class _PathBeneath(ctypes.Structure):  # struct landlock_path_beneath_attr
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _landlock():
    abi = _check(_libc.syscall(_SYS_LANDLOCK["create_ruleset"], None, ctypes.c_size_t(0),
                               ctypes.c_uint32(_LL_CREATE_RULESET_VERSION)), "landlock ABI")
    # Filesystem rights by ABI: 1 has bits 0-12 (execute ... make symlink), 2 adds refer
    # (link or rename across directories), 3 truncate, 5 device ioctls.
    fs = (1 << 13) - 1
    fs |= (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0)
    fs |= 1 << 15 if abi >= 5 else 0
    net = 0b11 if abi >= 4 else 0  # bind and connect TCP: handled, and no rule allows them
    scoped = 0b11 if abi >= 6 else 0  # abstract unix sockets and signals stay inside
    attr = struct.pack("QQQ", fs, net, scoped)[:8 if abi < 4 else 16 if abi < 6 else 24]
    ruleset = _check(_libc.syscall(_SYS_LANDLOCK["create_ruleset"], attr,
                                   ctypes.c_size_t(len(attr)), ctypes.c_uint32(0)),
                     "landlock_create_ruleset")
    try:
        for path, access in (("/", _LL_EXECUTE | _LL_READ_FILE | _LL_READ_DIR), (_ROOT, fs)):
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = _PathBeneath(access, fd)
                _check(_libc.syscall(_SYS_LANDLOCK["add_rule"], ruleset, _LL_RULE_PATH_BENEATH,
                                     ctypes.byref(rule), ctypes.c_uint32(0)),
                       f"landlock_add_rule({path})")
            finally:
                os.close(fd)
        _check(_libc.syscall(_SYS_LANDLOCK["restrict_self"], ruleset, ctypes.c_uint32(0)),
               "landlock_restrict_self")
    finally:
        os.close(ruleset)


_attempt("landlock", _landlock)

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
if "nproc" not in _layers:
    _missing["nproc"] = "RLIMIT_NPROC does not bind for root"

# CAPABILITIES: root (or the owner of a user namespace) keeps its uid but loses every
# capability, so it cannot raise the limits above, leave the namespaces, mount, load modules,
# or read and write past file permissions.
_PR_CAPBSET_DROP, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 24, 47, 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def _drop_capabilities():
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):  # needs CAP_SETPCAP, which only root (or the owner) has
        _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)
    _libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = struct.pack("Ii", _LINUX_CAPABILITY_VERSION_3, 0)
    _check(_libc.capset(header, bytes(24)), "capset")  # effective, permitted, inheritable: 0


_attempt("nocaps", _drop_capabilities)

# SECCOMP: a BPF filter on every syscall, which nothing can remove. It refuses creating
# processes (fork, vfork, clone without CLONE_THREAD, exec), sockets, namespaces, mounts,
# tracing, signals to other processes, chown and xattrs, and the kernel-wide calls (modules,
# kexec, reboot, bpf, clock). Threads stay: glibc makes them with clone(CLONE_THREAD),
# falling back to it when clone3 (whose flags a filter cannot read) says ENOSYS.
_DENIED_SYSCALLS = {  # name: (x86_64, aarch64); None where the architecture has no such call
    "fork": (57, None), "vfork": (58, None), "execve": (59, 221), "execveat": (322, 281),
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "socket": (41, 198), "unshare": (272, 97), "setns": (308, 268), "mount": (165, 40),
    "umount2": (166, 39), "pivot_root": (155, 41), "chroot": (161, 51),
    "mount_setattr": (442, 442), "move_mount": (429, 429), "open_tree": (428, 428),
    "fsopen": (430, 430), "fsconfig": (431, 431), "fsmount": (432, 432), "fspick": (433, 433),
    "kexec_load": (246, 104), "kexec_file_load": (320, 294), "init_module": (175, 105),
    "finit_module": (313, 273), "delete_module": (176, 106), "reboot": (169, 142),
    "bpf": (321, 280), "perf_event_open": (298, 241), "userfaultfd": (323, 282),
    "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218),
    "open_by_handle_at": (304, 265), "name_to_handle_at": (303, 264), "iopl": (172, None),
    "ioperm": (173, None), "swapon": (167, 224), "swapoff": (168, 225), "acct": (163, 89),
    "settimeofday": (164, 170), "clock_settime": (227, 112), "sethostname": (170, 161),
    "setdomainname": (171, 162), "quotactl": (179, 60), "io_uring_setup": (425, 425),
    "io_uring_enter": (426, 426), "io_uring_register": (427, 427), "tkill": (200, 130),
    "pidfd_send_signal": (424, 424), "pidfd_getfd": (438, 438), "process_madvise": (440, 440),
    # Owners and extended attributes, which Landlock does not cover (chmod and utime stay:
    # shutil.copy needs them; outside the work dir only the mount namespace refuses them).
    "chown": (92, None), "fchown": (93, 55), "lchown": (94, None), "fchownat": (260, 54),
    "setxattr": (188, 5), "lsetxattr": (189, 6), "fsetxattr": (190, 7),
    "removexattr": (197, 14), "lremovexattr": (198, 15), "fremovexattr": (199, 16),
    "setxattrat": (463, 463), "removexattrat": (466, 466),
}
# Signals: kill only this process or its group (0, pid, -pid); the others only this process.
_KILL_SYSCALLS = {"kill": (62, 129)}
_OWN_PID_SYSCALLS = {"tgkill": (234, 131), "rt_sigqueueinfo": (129, 138),
                     "rt_tgsigqueueinfo": (297, 240)}
_ARCHES = {"x86_64": (0, 0xC000003E, 56, 435), "aarch64": (1, 0xC00000B7, 220, 435)}
_CLONE_THREAD = 0x00010000
# NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET (clone's low byte is its signal).
_CLONE_NAMESPACES = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | (
    0x20000000 | 0x40000000)
_EPERM, _ENOSYS = 1, 38
_RET_ALLOW, _RET_ERRNO, _RET_KILL_PROCESS = 0x7FFF0000, 0x00050000, 0x80000000
_BPF_LD_ABS, _BPF_JEQ, _BPF_JGE, _BPF_JSET, _BPF_RET = 0x20, 0x15, 0x35, 0x45, 0x06


def _seccomp_program(machine, pid):
    """The filter as `struct sock_filter` bytes. seccomp_data: nr at 0, arch at 4, args at 16
    (the low half of args[0] at 16 on these little-endian machines; the kernel reads only that
    half of clone's flags and of a pid)."""
    col, audit_arch, nr_clone, nr_clone3 = _ARCHES[machine]
    # (label, code, jump if true, jump if false, k); a jump names a label, 0 is the next one.
    prog = [(None, _BPF_LD_ABS, 0, 0, 4),
            (None, _BPF_JEQ, 0, "other abi", audit_arch),  # e.g. i386 calls on x86_64
            (None, _BPF_LD_ABS, 0, 0, 0)]
    if machine == "x86_64":
        prog.append((None, _BPF_JGE, "eperm", 0, 0x40000000))  # the x32 ABI's numbers
    prog.append((None, _BPF_JEQ, "enosys", 0, nr_clone3))
    prog += [(None, _BPF_JEQ, "eperm", 0, nrs[col])
             for nrs in _DENIED_SYSCALLS.values() if nrs[col] is not None]
    prog += [(None, _BPF_JEQ, "kill", 0, nrs[col]) for nrs in _KILL_SYSCALLS.values()]
    prog += [(None, _BPF_JEQ, "own pid", 0, nrs[col]) for nrs in _OWN_PID_SYSCALLS.values()]
    prog += [(None, _BPF_JEQ, 0, "allow", nr_clone),  # BPF jumps only forward: clone last
             (None, _BPF_LD_ABS, 0, 0, 16),
             (None, _BPF_JSET, "eperm", 0, _CLONE_NAMESPACES),
             (None, _BPF_JSET, "allow", "eperm", _CLONE_THREAD),
             ("kill", _BPF_LD_ABS, 0, 0, 16),
             (None, _BPF_JEQ, "allow", 0, 0),
             (None, _BPF_JEQ, "allow", 0, -pid & 0xFFFFFFFF),
             ("own pid", _BPF_LD_ABS, 0, 0, 16),
             (None, _BPF_JEQ, "allow", "eperm", pid),
             ("allow", _BPF_RET, 0, 0, _RET_ALLOW),
             ("eperm", _BPF_RET, 0, 0, _RET_ERRNO | _EPERM),
             ("enosys", _BPF_RET, 0, 0, _RET_ERRNO | _ENOSYS),
             ("other abi", _BPF_RET, 0, 0, _RET_KILL_PROCESS)]
    where = {label: i for i, (label, *_) in enumerate(prog) if label}
    out = b""
    for i, (_, code, jt, jf, k) in enumerate(prog):
        jt, jf = (where[j] - i - 1 if j else 0 for j in (jt, jf))
        out += struct.pack("HBBI", code, jt, jf, k)
    return out


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]


def _seccomp():
    machine = os.uname().machine
    if machine not in _ARCHES:
        raise OSError(f"no seccomp filter for {machine}")
    program = _seccomp_program(machine, os.getpid())
    fprog = _SockFprog(len(program) // 8, program)
    _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2
    _check(_libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0),
           "seccomp filter")


_attempt("seccomp", _seccomp)


# GUARD: an audit hook (PEP 578) refuses what sandboxed code must not do, and says why in
# Python's terms. Hooks cannot be removed once added. Its state is bound as default arguments
# (frozensets), which the code cannot reach through `__main__`, and the hook refuses changes
# to its own code or defaults. It is an extra layer: code can still subvert the stdlib
# functions it calls (os.path), which is why the OS layers above are the ones that bind.
def _install_guard(root):
    deny = frozenset({
        "os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.spawn", "os.system",
        "os.kill", "os.killpg", "signal.pthread_kill", "subprocess.Popen", "pty.spawn",
        "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo",
        "socket.gethostbyname", "socket.gethostbyaddr", "socket.sendto",
        "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function",
        "resource.setrlimit", "resource.prlimit", "sys.addaudithook", "os.setuid", "os.setgid",
    })
    deny_imports = frozenset({"ctypes", "_ctypes", "_posixsubprocess", "cffi",
                              "_multiprocessing"})
    path_events = types.MappingProxyType({  # event -> indices of its path arguments
        "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1),
        "os.link": (0, 1), "os.symlink": (0, 1), "os.truncate": (0,), "os.chmod": (0,),
        "os.chown": (0,), "os.utime": (0,), "os.chflags": (0,), "os.lchflags": (0,),
        "os.mkfifo": (0,), "os.mknod": (0,), "shutil.rmtree": (0,), "os.setxattr": (0,),
        "os.removexattr": (0,),
    })
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def inside(path, _root=root, _sep=os.sep, _realpath=os.path.realpath,
               _join=os.path.join, _getcwd=os.getcwd, _fspath=os.fspath, _int=int,
               _bytes=bytes, _isinstance=isinstance):
        if _isinstance(path, _int):  # an already-open fd
            return True
        p = _fspath(path)
        if _isinstance(p, _bytes):
            p = p.decode(errors="replace")
        real = _realpath(_join(_getcwd(), p))
        return real == _root or real.startswith(_root + _sep)

    def hook(event, args, _deny=deny, _deny_imports=deny_imports, _path_events=path_events,
             _write_flags=write_flags, _inside=inside, _guarded=(), _error=PermissionError,
             _partition=str.partition, _str=str, _any=any, _len=len, _int=int,
             _isinstance=isinstance):
        if event in _deny:
            raise _error(f"sandbox: {event} is not allowed")
        if event == "import" and _partition(args[0], ".")[0] in _deny_imports:
            raise _error(f"sandbox: importing {args[0]} is not allowed")
        if event in ("object.__setattr__", "object.__delattr__") and _any(
                args[0] is g for g in _guarded):
            raise _error("sandbox: the audit hook cannot be changed")
        if event == "open":
            path, mode, flags = args
            writing = (mode is not None and _any(c in _str(mode) for c in "wax+")) or (
                mode is None and _isinstance(flags, _int) and flags & _write_flags)
            if writing and path is not None and not _inside(path):
                raise _error(f"sandbox: writing {path!r} outside the sandbox directory")
        elif event in _path_events:
            for i in _path_events[event]:
                if i < _len(args) and args[i] is not None and not _inside(args[i]):
                    raise _error(f"sandbox: {event} on {args[i]!r} outside the sandbox "
                                 f"directory")

    defaults = list(hook.__defaults__)
    defaults[hook.__code__.co_varnames.index("_guarded") - 2] = (hook, inside)
    hook.__defaults__ = tuple(defaults)  # set before the hook exists, so not refused
    sys.addaudithook(hook)


if "audit" not in _SKIP:
    _install_guard(_ROOT)
    _layers.append("audit")

# REPORT, then refuse (strict) or run.
_refused = None
if _LIMITS.get("strict"):
    _need = {"filesystem": ("landlock", "mount-ns"), "process": ("seccomp", "nproc")}
    _lacking = [f"no {kind} layer (" + "; ".join(f"{x}: {_missing.get(x, '?')}" for x in names)
                + ")" for kind, names in _need.items() if not set(names) & set(_layers)]
    _refused = " and ".join(_lacking) or None
sys.stderr.write("\x00tandem-boot:" + json.dumps(
    {"layers": _layers, "missing": _missing, "refused": _refused}) + "\n")
sys.stderr.flush()
if _refused:
    os._exit(2)

with open("main.py") as _f:
    _SOURCE = _f.read()

# Importing ctypes again is an audited import, not a lookup in sys.modules; what the code might
# reach of the boot's own (through frames) is refused by the hook at every call.
for _name in [m for m in sys.modules if m.partition(".")[0] in ("ctypes", "_ctypes")]:
    del sys.modules[_name]

# The code runs as a fresh `__main__` module: this one's globals are not its namespace.
_main = types.ModuleType("__main__")
_main.__file__ = "main.py"
_main.__builtins__ = __builtins__
sys.modules["__main__"] = _main
exec(compile(_SOURCE, "main.py", "exec"), vars(_main))
