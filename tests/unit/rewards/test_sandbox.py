"""The code sandbox: time, process, filesystem, network and memory limits."""

import contextlib
import ctypes
import json
import os
import platform
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from rewards import sandbox
from rewards.builtin import code_reward
from rewards.sandbox import run_python


def test_sandbox_runs_code_in_its_own_directory():
    r = run_python("import os\nopen('out.txt', 'w').write('hi')\n"
                   "print(open('out.txt').read(), os.getcwd().split('/')[-1])")
    assert r.ok and r.stdout.split() == ["hi", "work"], r
    assert {"session", "rlimits", "audit"} <= set(r.isolation)


def test_sandbox_kills_an_infinite_loop_at_its_timeout():
    t0 = time.monotonic()
    r = run_python("while True:\n    pass\n", timeout_s=1.0)
    assert r.timed_out and not r.ok and r.returncode is None
    assert 1.0 <= r.elapsed_s < 10 and time.monotonic() - t0 < 15


@pytest.mark.parametrize("bomb", [
    "import os\nwhile True:\n    os.fork()\n",
    "import subprocess\nsubprocess.Popen(['sh', '-c', ':(){ :|:& };:'])\n",
    "import os\nos.system(':(){ :|:& };:')\n",
    "import multiprocessing as mp\nwhile True:\n    mp.Process(target=print).start()\n",
])
def test_sandbox_stops_fork_bombs(bomb):
    t0 = time.monotonic()
    r = run_python(bomb, timeout_s=5.0)
    assert not r.ok and not r.timed_out, r  # refused at once, not left to run
    assert "PermissionError: sandbox" in r.stderr
    assert time.monotonic() - t0 < 10


def test_sandbox_cannot_write_outside_its_directory(tmp_path):
    target = tmp_path / "escaped.txt"
    attempts = [
        f"open({str(target)!r}, 'w').write('x')",
        f"import os\nos.close(os.open({str(target)!r}, os.O_CREAT | os.O_WRONLY))",
        f"import os\nos.symlink({str(tmp_path)!r}, 'link')\nopen('link/escaped.txt', 'w')",
        f"import shutil\nshutil.copy('main.py', {str(target)!r})",
        "open('../escaped.txt', 'w').write('x')",
        f"import os\nos.remove({str(tmp_path / 'keep.txt')!r})",
    ]
    (tmp_path / "keep.txt").write_text("keep")
    for code in attempts:
        r = run_python(code, timeout_s=5.0)
        assert not r.ok and "PermissionError: sandbox" in r.stderr, (code, r)
    assert not target.exists()
    assert (tmp_path / "keep.txt").read_text() == "keep"


def test_sandbox_has_no_network_and_limited_memory():
    r = run_python("import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)")
    assert not r.ok and "socket" in r.stderr
    r = run_python("x = bytearray(1 << 30)\nprint('allocated')", memory_mb=256)
    assert not r.ok and "MemoryError" in r.stderr and "allocated" not in r.stdout


@pytest.mark.skipif(os.geteuid() == 0, reason="RLIMIT_NPROC does not bind for root")
def test_sandbox_nproc_limit_binds_for_non_root():
    r = run_python("print('ok')")
    assert r.ok and "nproc" in r.isolation


# ---------------------------------------------------------------------------------------------
# Escapes past the audit hook. Each program runs in one of these modes, and the OS layers must
# refuse in every one of them:
#   "hook":     the hook as is (the routes it does not see: dir_fd, C libraries, ...);
#   "tampered": the program first empties the hook's deny lists and path check wherever the
#               `__main__` module exposes them (a hook that keeps them as globals falls to it);
#   "no-hook":  the hook left out, so only the OS layers stand;
#   "<layer>-only": the hook and the other filesystem and process layers left out.
# Each test checks that the effect did not happen (nothing outside changed, no child ran, no
# connection arrived, the other process lives), not that some error was printed. Where it
# happened and the OS offers none of the layers that would stop it, the test skips.

_TAMPER = """\
import sys
try:
    _g = vars(sys.modules['__main__'])
    for _k in ('_DENY', '_DENY_IMPORTS', '_PATH_EVENTS'):
        _g[_k].clear()
    _g['_WRITE_FLAGS'] = 0
    _g['_inside'] = lambda path: True
except Exception:
    pass
"""
_MODES = ["hook", "tampered", "no-hook"]
_SKIP = {"hook": set(), "tampered": set(), "no-hook": {"audit"},
         "landlock-only": {"audit", "mount-ns", "seccomp"},
         "mount-ns-only": {"audit", "landlock", "seccomp"},
         "seccomp-only": {"audit", "landlock", "mount-ns"}}


def _escape(mode, code, monkeypatch, **kw):
    """Runs `code` in `mode`; it prints "attempting" just before the escape itself."""
    if _SKIP[mode]:
        monkeypatch.setattr(sandbox, "_TEST_SKIP_LAYERS", frozenset(_SKIP[mode]))
    prelude = (_TAMPER if mode == "tampered" else "") + "import os\n"
    r = run_python(prelude + "print('attempting', flush=True)\n" + code, timeout_s=10.0, **kw)
    assert "attempting" in r.stdout, r  # it got as far as the escape
    return r


def _landlock_abi():
    """The kernel's Landlock ABI version (0: none), asked here, not of the sandbox."""
    if sys.platform != "linux":
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return max(0, libc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1)))


def _seccomp_filters():
    """Whether this machine's kernel takes seccomp filters the sandbox can install."""
    libc = ctypes.CDLL(None, use_errno=True)
    return (sys.platform == "linux" and platform.machine() in ("x86_64", "aarch64")
            and libc.prctl(21, 0, 0, 0, 0) >= 0)  # PR_GET_SECCOMP


def _holds(held, r, layers):
    """Asserts `held`; where it failed and the OS offers none of `layers`, skips instead.
    Landlock and seccomp are asked of the kernel here; the others of the sandbox's report."""
    offered = set(r.isolation)
    offered |= {"landlock"} if _landlock_abi() >= 1 else set()
    offered |= {"seccomp"} if _seccomp_filters() else set()
    if not held and not offered & set(layers):
        pytest.skip(f"this OS offers none of {layers}: {r.isolation}")
    assert held, r


_WRITES = {  # each tries to create OUT/escaped
    "open": "open(OUT + '/escaped', 'w').write('x')",
    "relative": "open(os.path.relpath(OUT + '/escaped'), 'w').write('x')",
    "dir_fd": "os.open('escaped', os.O_CREAT | os.O_WRONLY, dir_fd=os.open(OUT, os.O_RDONLY))",
    "relative_dir_fd": "os.open(OUT.lstrip('/') + '/escaped', os.O_CREAT | os.O_WRONLY, "
                       "dir_fd=os.open('/', os.O_RDONLY))",
    "mkdir_dir_fd": "os.mkdir('escaped', dir_fd=os.open(OUT, os.O_RDONLY))",
    "sqlite": "import sqlite3\ndb = sqlite3.connect(OUT + '/escaped')\n"
              "db.execute('create table t (x)')\ndb.commit()",
    "symlink": "os.symlink(OUT, 'link')\nopen('link/escaped', 'w').write('x')",
    "rename_dir_fd": "open('f', 'w').write('x')\n"
                     "os.rename('f', 'escaped', dst_dir_fd=os.open(OUT, os.O_RDONLY))",
    "replace": "open('f', 'w').write('x')\nos.replace('f', OUT + '/escaped')",
    "link_dir_fd": "os.link('main.py', 'escaped', dst_dir_fd=os.open(OUT, os.O_RDONLY))",
    "link": "os.link('main.py', OUT + '/escaped')",
    "copy": "import shutil\nshutil.copy('main.py', OUT + '/escaped')",
}
_CHANGES = {  # each tries to change OUT/keep, which exists
    "remove": "os.remove(OUT + '/keep')",
    "truncate": "os.truncate(OUT + '/keep', 0)",
    "append_dir_fd": "os.write(os.open('keep', os.O_WRONLY | os.O_APPEND, "
                     "dir_fd=os.open(OUT, os.O_RDONLY)), b'x')",
    "rename_away": "os.rename(OUT + '/keep', 'stolen')",
    "link_in": "os.link(OUT + '/keep', 'k')\nopen('k', 'a').write('x')",
}
_METADATA = {  # Landlock does not cover these (seccomp and the mount namespace do)
    "chmod": "os.chmod(OUT + '/keep', 0o777)",
    "chown": "os.chown(OUT + '/keep', 1234, 1234)",
    "utime": "os.utime(OUT + '/keep', (0, 0))",
    "setxattr": "os.setxattr(OUT + '/keep', 'user.escaped', b'x')",
}


def _outside(tmp_path):
    out = tmp_path / "outside"
    out.mkdir()
    (out / "keep").write_text("keep")
    return out


def _state(out):
    """Each name under `out` with its content and metadata: what an escape could change."""
    state = {}
    for p in sorted(out.iterdir()):
        st = p.lstat()
        xattrs = []
        with contextlib.suppress(OSError):
            xattrs = sorted(os.listxattr(p, follow_symlinks=False))
        data = p.read_bytes() if p.is_file() and not p.is_symlink() else None
        state[p.name] = (data, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, xattrs)
    return state


@pytest.mark.parametrize("mode", _MODES)
@pytest.mark.parametrize("route", [*_WRITES, *_CHANGES, *_METADATA])
def test_sandbox_writes_nothing_outside_its_directory(route, mode, tmp_path, monkeypatch):
    out = _outside(tmp_path)
    before = _state(out)
    code = {**_WRITES, **_CHANGES, **_METADATA}[route]
    r = _escape(mode, f"OUT = {str(out)!r}\n" + code, monkeypatch)
    _holds(not r.ok and _state(out) == before, r, ("landlock", "mount-ns"))


@pytest.mark.parametrize("mode", ["landlock-only", "mount-ns-only"])
def test_each_filesystem_layer_alone_refuses_every_write(mode, tmp_path, monkeypatch):
    # One program tries every route (each in its own try), so one layer costs one run. Landlock
    # leaves metadata to the other layers, so only the mount namespace is tried on it.
    out = _outside(tmp_path)
    before = _state(out)
    code = f"OUT = {str(out)!r}\n"
    routes = {**_WRITES, **_CHANGES, **(_METADATA if mode == "mount-ns-only" else {})}
    for name, route in routes.items():
        body = route.replace("'escaped'", f"'{name}'").replace("/escaped'", f"/{name}'")
        body = body.replace("'f'", f"'f_{name}'").replace("'link", f"'link_{name}")
        code += "try:\n" + "".join(f"    {line}\n" for line in body.splitlines())
        code += f"    print('done {name}')\nexcept Exception as e:\n    print('refused', e)\n"
    r = _escape(mode, code, monkeypatch)
    layer = mode.removesuffix("-only")
    if layer not in r.isolation:
        pytest.skip(f"this OS offers no {layer} layer: {r.isolation}")
    assert _state(out) == before, r
    assert "done" not in r.stdout, r.stdout


_SPAWNS = {  # each would print CHILD from a new process (or a new program)
    "os.fork": "pid = os.fork()\nif pid == 0:\n    os.write(1, b'CHILD\\n')\n    os._exit(0)\n"
               "os.waitpid(pid, 0)",
    "subprocess": "import subprocess\nsubprocess.run(['/bin/echo', 'CHILD'], timeout=5)",
    "posix_spawn": "os.waitpid(os.posix_spawn('/bin/echo', ['echo', 'CHILD'], {}), 0)",
    "os.system": "raise SystemExit(os.system('echo CHILD') != 0)",
    "execv": "os.execv('/bin/echo', ['echo', 'CHILD'])",
    "ctypes_fork": "import ctypes\npid = ctypes.CDLL(None).fork()\n"
                   "if pid == 0:\n    os.write(1, b'CHILD\\n')\n    os._exit(0)\n"
                   "os.waitpid(pid, 0)",
}


@pytest.mark.parametrize("mode", ["tampered", "no-hook"])
@pytest.mark.parametrize("spawn", _SPAWNS)
def test_sandbox_starts_no_process(spawn, mode, monkeypatch):
    r = _escape(mode, _SPAWNS[spawn], monkeypatch)
    _holds("CHILD" not in r.stdout and not r.ok, r, ("seccomp", "nproc"))


def test_sandbox_code_may_use_threads_and_its_directory():
    code = ("import os, signal, sqlite3, tempfile, threading\n"
            "t = threading.Thread(target=print, args=('thread',))\nt.start()\nt.join()\n"
            "signal.signal(signal.SIGUSR1, lambda *_: print('signal'))\n"
            "signal.raise_signal(signal.SIGUSR1)\n"
            "os.makedirs('a/b')\nos.symlink('a', 'l')\nopen('l/f', 'w').write('x')\n"
            "os.rename('l/f', 'a/b/g')\nos.link('a/b/g', 'h')\nos.remove('h')\n"
            "db = sqlite3.connect('x.db')\ndb.execute('create table t (x)')\ndb.commit()\n"
            "with tempfile.NamedTemporaryFile() as f:\n    f.write(b'x')\n"
            "print(open('a/b/g').read(), os.listdir('/')[:1] != [])")
    r = run_python(code)
    assert r.ok and r.stdout.split() == ["thread", "signal", "x", "True"], r


def _escape_netns():
    """Code that returns to the test's network namespace if it can (root, with ctypes)."""
    return ("try:\n    import ctypes\n"
            f"    ctypes.CDLL(None).setns(os.open('/proc/{os.getpid()}/ns/net', os.O_RDONLY), "
            "0x40000000)\nexcept Exception:\n    pass\n")


@pytest.mark.parametrize("mode", ["tampered", "no-hook"])
@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_sandbox_connects_to_nothing(family, mode, tmp_path, monkeypatch):
    if family == "tcp":
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        address = srv.getsockname()
        connect = f"import socket\nsocket.create_connection({address!r}, timeout=1)"
    else:
        srv = socket.socket(socket.AF_UNIX)
        address = str(tmp_path / "s")
        srv.bind(address)
        connect = ("import socket\ns = socket.socket(socket.AF_UNIX)\ns.settimeout(1)\n"
                   f"s.connect({address!r})")
    with srv:
        srv.listen(1)
        r = _escape(mode, _escape_netns() + connect, monkeypatch)
        pending, _, _ = select.select([srv], [], [], 0.1)  # a connection that arrived waits
        layers = ("seccomp", "landlock") if family == "tcp" else ("seccomp",)
        _holds(pending == [] and not r.ok, r, layers)


@pytest.mark.parametrize("mode", ["tampered", "no-hook", "landlock-only", "seccomp-only"])
def test_sandbox_cannot_signal_other_processes(mode, monkeypatch):
    victim = subprocess.Popen(["sleep", "30"])
    try:
        r = _escape(mode, f"os.kill({victim.pid}, 9)", monkeypatch)
        with contextlib.suppress(subprocess.TimeoutExpired):
            victim.wait(timeout=0.1)
        killed = victim.returncode is not None
    finally:
        victim.kill()
        victim.wait()
    layer = mode.removesuffix("-only")
    if layer in ("landlock", "seccomp") and (layer not in r.isolation or (
            layer == "landlock" and _landlock_abi() < 6)):  # Landlock scopes signals from ABI 6
        pytest.skip(f"this OS offers no {layer} layer that scopes signals: {r.isolation}")
    assert not killed and not r.ok, r


def test_sandbox_reports_the_os_layers_it_got():
    r = run_python("print('ok')")
    assert r.ok, r
    if sys.platform == "linux" and platform.machine() in ("x86_64", "aarch64"):
        assert "seccomp" in r.isolation, r.isolation
    if sys.platform == "linux" and _landlock_abi() >= 1:
        assert "landlock" in r.isolation, r.isolation


def test_strict_refuses_to_run_without_a_filesystem_layer(tmp_path, monkeypatch):
    out = _outside(tmp_path)
    before = _state(out)
    ran = f"open({str(out / 'ran')!r}, 'w').write('x')"
    assert run_python(ran, strict=True).isolation  # this OS offers the layers: it runs
    monkeypatch.setattr(sandbox, "_TEST_SKIP_LAYERS",
                        frozenset({"audit", "landlock", "mount-ns"}))
    with pytest.raises(sandbox.SandboxUnavailableError, match="strict=True.*filesystem"):
        run_python(ran, strict=True)
    with pytest.raises(sandbox.SandboxUnavailableError, match=r"rewards\.kwargs\.code\.strict"):
        code_reward("", ran, {"tests": ["pass"]}, strict=True)
    assert _state(out) == before  # the code never ran


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/bin/python3"),
                    reason="runs the sandbox as the user nobody; needs root to switch to it")
def test_sandbox_holds_for_a_non_root_caller():
    repo = Path(sandbox.__file__).resolve().parents[1]
    nobody = {"user": 65534, "group": 65534, "extra_groups": [], "timeout": 60,
              "capture_output": True, "text": True, "cwd": "/"}
    probe = subprocess.run(["/usr/bin/python3", "-c", "import rewards.sandbox"],
                           env={"PYTHONPATH": str(repo)}, **nobody)
    if probe.returncode != 0:
        pytest.skip(f"nobody cannot import the sandbox from {repo}: {probe.stderr[-200:]}")
    out = Path(tempfile.mkdtemp(prefix="tandem-sandbox-test-"))
    try:
        out.chmod(0o777)  # nobody could write here, but for the sandbox
        (out / "keep").write_text("keep")
        (out / "keep").chmod(0o666)
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(str(out / "s"))
        os.chmod(out / "s", 0o777)
        programs = [f"OUT = {str(out)!r}\n" + _WRITES[k] for k in ("dir_fd", "sqlite")]
        programs += [_TAMPER + "import os\n" + _SPAWNS[k] for k in ("os.fork", "ctypes_fork")]
        programs.append(f"import os\nOUT = {str(out)!r}\n" + _CHANGES["append_dir_fd"])
        programs.append(_TAMPER + "import socket\ns = socket.socket(socket.AF_UNIX)\n"
                        f"s.settimeout(1)\ns.connect({str(out / 's')!r})")
        driver = ("import json, sys\nfrom rewards.sandbox import run_python\n"
                  "rs = [run_python(c, timeout_s=10.0) for c in json.loads(sys.argv[1])]\n"
                  "print(json.dumps([[r.stdout, r.stderr, r.isolation] for r in rs]))")
        before = _state(out)
        with srv:
            srv.listen(1)
            res = subprocess.run(["/usr/bin/python3", "-c", driver, json.dumps(programs)],
                                 env={"PYTHONPATH": str(repo)}, **nobody)
            assert res.returncode == 0, res.stderr
            pending, _, _ = select.select([srv], [], [], 0.1)
        results = json.loads(res.stdout)
        if _landlock_abi() < 1 and "mount-ns" not in results[0][2]:
            pytest.skip(f"this OS offers no filesystem layer to nobody: {results[0][2]}")
        assert _state(out) == before, results
        assert not any("CHILD" in stdout for stdout, _, _ in results), results
        assert pending == [], results
    finally:
        shutil.rmtree(out, ignore_errors=True)
