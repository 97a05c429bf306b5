"""Pathways initialization: env checks, no-op elsewhere, and init before jax.devices()."""

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import jax
import pytest

from controller.config import JobConfig
from controller.startup import PathwaysInitError, initialize_pathways, read_pathways_env

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def fake_pathwaysutils(monkeypatch):
    """A pathwaysutils whose initialize() only records that it was called."""
    calls = []
    mod = types.ModuleType("pathwaysutils")
    mod.initialize = lambda: calls.append("initialize")
    monkeypatch.setitem(sys.modules, "pathwaysutils", mod)
    return calls


def test_env_is_read_and_checked():
    env = read_pathways_env({"JAX_PLATFORMS": "proxy",
                             "JAX_BACKEND_TARGET": "grpc://127.0.0.1:29000",
                             "ENABLE_PATHWAYS_PERSISTENCE": "1"})
    assert env.backend_target == "grpc://127.0.0.1:29000" and env.persistence
    env = read_pathways_env({"JAX_PLATFORMS": "proxy",
                             "JAX_BACKEND_TARGET": "grpc://pathways-head.ns.svc:29000"})
    assert not env.persistence  # unset means off
    assert read_pathways_env({"JAX_PLATFORMS": "cpu"}) is None
    assert read_pathways_env({}) is None


@pytest.mark.parametrize("env, needle", [
    ({"JAX_PLATFORMS": "proxy"}, "JAX_BACKEND_TARGET is not set"),
    ({"JAX_PLATFORMS": "proxy", "JAX_BACKEND_TARGET": "127.0.0.1:29000"}, "grpc://host:port"),
    ({"JAX_PLATFORMS": "proxy", "JAX_BACKEND_TARGET": "grpc://h:1",
      "ENABLE_PATHWAYS_PERSISTENCE": "yes"}, "ENABLE_PATHWAYS_PERSISTENCE='yes'"),
])
def test_bad_env_names_the_variable_and_fix(env, needle):
    with pytest.raises(PathwaysInitError, match="fix") as e:
        read_pathways_env(env)
    assert needle in str(e.value)


def test_other_backends_do_nothing(monkeypatch, fake_pathwaysutils):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert initialize_pathways("native") is None
    monkeypatch.delenv("JAX_PLATFORMS")
    assert initialize_pathways() is None
    assert fake_pathwaysutils == []


def test_proxy_with_cpu_sim_config_is_refused(monkeypatch, fake_pathwaysutils):
    # The cpu-sim backend would switch JAX to the head pod's CPU and ignore the cluster.
    monkeypatch.setenv("JAX_PLATFORMS", "proxy")
    monkeypatch.setenv("JAX_BACKEND_TARGET", "grpc://127.0.0.1:29000")
    from controller.api import Job

    with pytest.raises(PathwaysInitError, match="topology.backend=native"):
        Job(JobConfig())
    assert fake_pathwaysutils == []


def test_backend_started_first_is_an_error(monkeypatch, fake_pathwaysutils):
    # In this test process the CPU backend is already up (conftest asked for jax.devices()),
    # which is exactly the mistake the check exists for.
    monkeypatch.setenv("JAX_PLATFORMS", "proxy")
    monkeypatch.setenv("JAX_BACKEND_TARGET", "grpc://127.0.0.1:29000")
    before = jax.config.jax_platforms
    with pytest.raises(PathwaysInitError, match=r"before any JAX operation"):
        initialize_pathways("native")
    assert fake_pathwaysutils == []
    assert jax.config.jax_platforms == before  # nothing was changed


ORDER_SCRIPT = textwrap.dedent("""
    import json, os, sys, types
    calls = []

    def initialize():
        import jax
        calls.append(["pathwaysutils.initialize", jax.config.jax_platforms,
                      jax.config.read("jax_backend_target")])

    fake = types.ModuleType("pathwaysutils")
    fake.initialize = initialize
    sys.modules["pathwaysutils"] = fake

    import jax
    from jax._src import xla_bridge

    class Reached(Exception):
        pass

    def spy(name, real):
        def f(*a, **k):
            calls.append([name])
            raise Reached(name)  # stop here: there is no Pathways proxy to talk to
        return f

    for name in ("devices", "local_devices", "device_count", "local_device_count"):
        setattr(jax, name, spy("jax." + name, getattr(jax, name)))
    # Anything that starts a backend goes through xla_bridge.backends().
    xla_bridge.backends = spy("xla_bridge.backends", xla_bridge.backends)

    from controller.cli import main
    try:
        main(["run", "topology.backend=native", "run.progress=false"])
    except Reached:
        pass
    print("CALLS=" + json.dumps(calls))
""")


def test_pathways_init_happens_before_anything_touches_devices():
    """`tandem run` under JAX_PLATFORMS=proxy, in a fresh process as on a cluster: the first
    recorded event is pathwaysutils.initialize (with JAX pointed at the proxy), and only then
    does anything ask JAX for devices."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    env.update(JAX_PLATFORMS="proxy", JAX_BACKEND_TARGET="grpc://10.0.0.7:29000",
               ENABLE_PATHWAYS_PERSISTENCE="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", ORDER_SCRIPT], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("CALLS="))
    calls = json.loads(line.removeprefix("CALLS="))
    assert calls[0] == ["pathwaysutils.initialize", "proxy", "grpc://10.0.0.7:29000"], calls
    assert len(calls) >= 2 and calls[1][0] in ("jax.devices", "xla_bridge.backends"), calls


CACHE_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    from jax._src import xla_bridge

    seen = {}

    class Reached(Exception):
        pass

    def at_first_device_access(*a, **k):
        import pathwaysutils._initialize as init
        seen.update(enabled=jax.config.jax_enable_compilation_cache,
                    directory=jax.config.jax_compilation_cache_dir,
                    initialized=init._initialization_count)
        raise Reached  # there is no Pathways proxy to talk to

    for name in ("devices", "local_devices", "device_count", "local_device_count"):
        setattr(jax, name, at_first_device_access)
    xla_bridge.backends = at_first_device_access

    from controller.cli import main
    try:
        main(["run", "topology.backend=native", "run.progress=false",
              "run.compile_cache_dir=" + sys.argv[1]])
    except Reached:
        pass
    print("SEEN=" + json.dumps(seen))
""")


def test_compile_cache_is_on_at_first_device_access_after_real_pathways_init(tmp_path):
    """`tandem run` under JAX_PLATFORMS=proxy with the real pathwaysutils, which switches JAX's
    compilation cache off in initialize(): a job given a shared cache directory has the cache
    on, pointed at that directory, when it first asks JAX for devices."""
    cache = tmp_path / "xla-cache"
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
    env.update(JAX_PLATFORMS="proxy", JAX_BACKEND_TARGET="grpc://10.0.0.7:29000",
               PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", CACHE_SCRIPT, str(cache)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("SEEN="))
    seen = json.loads(line.removeprefix("SEEN="))
    assert seen == {"enabled": True, "directory": str(cache), "initialized": 1}, seen


def test_compile_cache_reported_off_when_jax_has_it_switched_off(tmp_path):
    """With run.compile_cache_dir=null JAX's settings are left alone, and the directory
    reported (the CLI prints it) is None while JAX's cache is switched off, even though a
    directory is set; a directory given turns it back on."""
    import jax

    from controller.startup import configure_compile_cache

    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache)
    try:
        jax.config.update("jax_compilation_cache_dir", str(tmp_path))
        jax.config.update("jax_enable_compilation_cache", False)  # as pathwaysutils leaves it
        assert configure_compile_cache(None) is None
        assert jax.config.jax_enable_compilation_cache is False  # null: left alone
        assert configure_compile_cache(str(tmp_path / "other")) == str(tmp_path)
        assert jax.config.jax_enable_compilation_cache is True
    finally:
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_enable_compilation_cache", before[1])
