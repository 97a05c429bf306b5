"""The code sandbox: time, process, filesystem, network and memory limits."""

import os
import time

import pytest

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
