"""What runs before the job touches a device: Pathways initialization and the compile cache.

`Job` calls these in order, before `jax.devices()`:

1. `initialize_pathways` (`JAX_PLATFORMS=proxy` only). Under Pathways the controller's JAX
   talks to the cluster through the IFRT proxy that runs beside it in the head pod:
   `JAX_PLATFORMS=proxy` selects the proxy backend and `JAX_BACKEND_TARGET` (`grpc://host:port`,
   `deploy.xpk.DEFAULT_BACKEND_TARGET` in a pod made by `xpk workload create-pathways`) says
   where the proxy listens. `pathwaysutils.initialize()` registers that backend with JAX, so it
   must run before anything touches `jax.devices()`: a backend started first is a CPU/TPU
   backend, and the job would silently run on the head pod's CPU.
   `ENABLE_PATHWAYS_PERSISTENCE=1` makes `pathwaysutils` install its orbax array handler, so
   checkpoints are written by the Pathways workers straight to storage (GCS) instead of
   through the controller; `0` or unset leaves orbax as it is. On every other backend
   (`JAX_PLATFORMS` unset, `cpu`, `tpu`, ...) it does nothing.
2. `configure_compile_cache` (`run.compile_cache_dir`). A job's first step is mostly XLA
   compilation. JAX can keep every compiled program on disk, keyed by the program, the
   devices, the XLA flags and the JAX version, and load it the next time the same program is
   built: a job restarted with the same config (after a preemption, a crash, a reward-function
   edit) skips those seconds. Any change that changes the program (model shape, batch, mesh,
   dtype) is a different key, so a stale entry is never used. On CPU, a trainer program whose
   temporaries exceed `trainer.cpu_heap.CPU_HEAP_LIMIT_BYTES` is compiled with them split into
   several heaps, and XLA cannot serialise such a program: it is compiled afresh each time.
   JAX's cache settings are process-wide. A directory the user already gave JAX
   (`JAX_COMPILATION_CACHE_DIR` or `jax.config`) is left alone; `run.compile_cache_dir: null`
   leaves every JAX setting alone.
"""

from __future__ import annotations

import os
import re
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from controller.config import DEFAULT_COMPILE_CACHE_DIR, ConfigError, is_url
from deploy.xpk import DEFAULT_BACKEND_TARGET

DEFAULT_DIR = DEFAULT_COMPILE_CACHE_DIR  # run.compile_cache_dir's default

# Programs that compile faster than this are not written (JAX's default is 1 s, which leaves
# out the parameter initialisers and small helpers: ~1.7 s of a job's setup on 2 cores).
MIN_COMPILE_S = 0.2
_JAX_DEFAULT_MIN_COMPILE_S = 1.0

# The environment variables through which JAX takes a cache setting from outside the process.
JAX_CACHE_ENV = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")

_lock = threading.Lock()
_hits = 0
_listening = False


def _on_event(event: str, **_: object) -> None:
    global _hits
    if event == "/jax/compilation_cache/cache_hits":
        with _lock:
            _hits += 1


def cache_hits() -> int:
    """Programs this process loaded from the persistent cache instead of compiling them
    (counted from the first job that configured the cache on)."""
    with _lock:
        return _hits


def cache_dir_for(configured: str | None, on_pathways: bool) -> str | None:
    """The directory a job should use. On Pathways the default, a directory inside the
    controller's container, is dropped: it dies with the pod, so it would only cost writes; a
    shared location (`run.compile_cache_dir=gs://bucket/xla-cache`) is an explicit choice."""
    if on_pathways and configured == DEFAULT_DIR:
        return None
    return configured


def configure_compile_cache(cache_dir: str | None) -> str | None:
    """Points JAX's persistent compilation cache at `cache_dir`; returns the directory JAX
    uses (None: no persistent cache).

    Leaves JAX alone when `cache_dir` is None, and keeps a cache directory JAX already has.
    Either way the cache is switched on (`pathwaysutils.initialize()` switches it off), and
    what is returned is what JAX will use. A local directory that cannot be created turns the
    cache off with a warning: a job never fails for want of a cache.
    """
    import jax

    global _listening
    with _lock:
        if not _listening:
            jax.monitoring.register_event_listener(_on_event)
            _listening = True
    current = jax.config.jax_compilation_cache_dir
    if not cache_dir:  # JAX's settings are left as they are: say what they amount to
        return current if current and jax.config.jax_enable_compilation_cache else None
    # pathwaysutils.initialize() turns JAX's cache off (Pathways keeps its own cache of the
    # workers' executables); a directory given here turns the controller's cache back on.
    if current:
        jax.config.update("jax_enable_compilation_cache", True)
        return current
    if is_url(cache_dir):
        path = cache_dir  # a remote store (gs://...) is JAX's to create
    else:
        p = Path(cache_dir).expanduser()
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            warnings.warn(f"run.compile_cache_dir={cache_dir!r} cannot be created ({e}); "
                          f"compiling without a persistent cache (fix: point it at a "
                          f"writable directory, or null to silence this)", stacklevel=2)
            return None
        path = str(p)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_enable_compilation_cache", True)
    if jax.config.jax_persistent_cache_min_compile_time_secs == _JAX_DEFAULT_MIN_COMPILE_S:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_S)
    return path


# -- Pathways --------------------------------------------------------------------------------

_TARGET_RE = re.compile(r"^grpc://[^\s:/]+(:\d{1,5})$|^grpc://\[[0-9a-fA-F:]+\](:\d{1,5})$")


class PathwaysInitError(ConfigError):
    """The Pathways environment is inconsistent; the message names the variable and a fix."""


@dataclass(frozen=True)
class PathwaysEnv:
    """What the environment says about Pathways (only built when `JAX_PLATFORMS=proxy`)."""

    backend_target: str  # JAX_BACKEND_TARGET, e.g. grpc://127.0.0.1:29000
    persistence: bool  # ENABLE_PATHWAYS_PERSISTENCE=1

    def describe(self) -> str:
        return (f"pathways: proxy {self.backend_target}, persistence "
                f"{'on' if self.persistence else 'off'}")


def on_pathways(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return env.get("JAX_PLATFORMS", "").strip() == "proxy"


def read_pathways_env(environ: Mapping[str, str] | None = None) -> PathwaysEnv | None:
    """Reads and checks the Pathways variables; None when `JAX_PLATFORMS` is not `proxy`."""
    env = os.environ if environ is None else environ
    if not on_pathways(env):
        return None
    target = env.get("JAX_BACKEND_TARGET", "").strip()
    if not target:
        raise PathwaysInitError(
            "JAX_PLATFORMS=proxy but JAX_BACKEND_TARGET is not set (fix: export "
            f"JAX_BACKEND_TARGET={DEFAULT_BACKEND_TARGET}, the proxy address in a pod made by "
            "`xpk workload create-pathways`)"
        )
    if not _TARGET_RE.match(target):
        raise PathwaysInitError(
            f"JAX_BACKEND_TARGET={target!r}: the IFRT proxy address must look like "
            f"grpc://host:port (fix: e.g. JAX_BACKEND_TARGET={DEFAULT_BACKEND_TARGET})"
        )
    raw = env.get("ENABLE_PATHWAYS_PERSISTENCE")
    if raw is not None and raw.strip() not in ("0", "1"):
        # pathwaysutils would raise too, but only halfway through its initialization.
        raise PathwaysInitError(
            f"ENABLE_PATHWAYS_PERSISTENCE={raw!r}: must be 1, 0 or unset (fix: "
            "ENABLE_PATHWAYS_PERSISTENCE=1 to let Pathways workers write checkpoints directly)"
        )
    return PathwaysEnv(backend_target=target, persistence=(raw or "").strip() == "1")


def _jax_backends_started() -> bool:
    """Whether some JAX backend is already up (private JAX API; False if it moved)."""
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - JAX layout changed
        return False
    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started()) if callable(started) else False


def initialize_pathways(topology_backend: str | None = None) -> PathwaysEnv | None:
    """Initializes pathwaysutils when `JAX_PLATFORMS=proxy`; does nothing otherwise.

    Args:
      topology_backend: the job's `topology.backend`. On Pathways it must be "native": the
        "cpu-sim" backend would switch JAX to its CPU platform and ignore the cluster.

    Returns:
      The checked Pathways environment, or None when not on Pathways.

    Raises:
      PathwaysInitError: a missing or malformed variable, a cpu-sim config on Pathways, or a JAX
        backend that was started before this call (something touched `jax.devices()` first).
    """
    env = read_pathways_env()
    if env is None:
        return None
    if topology_backend == "cpu-sim":
        raise PathwaysInitError(
            "JAX_PLATFORMS=proxy (a Pathways job) but topology.backend=cpu-sim would run the "
            "job on the controller's CPU (fix: topology.backend=native)"
        )
    if _jax_backends_started():
        raise PathwaysInitError(
            "JAX_PLATFORMS=proxy but a JAX backend was started before Pathways was initialized "
            "(something called jax.devices() or ran a JAX op first); the job would not see the "
            "cluster (fix: construct controller.api.Job, or call "
            "controller.startup.initialize_pathways(), before any JAX operation)"
        )
    import jax
    import pathwaysutils

    # JAX read these variables when it was imported; make sure its config agrees with what was
    # checked above (pathwaysutils reads jax.config, not the environment).
    if jax.config.jax_platforms != "proxy":
        jax.config.update("jax_platforms", "proxy")
    if jax.config.read("jax_backend_target") != env.backend_target:
        jax.config.update("jax_backend_target", env.backend_target)
    # Registers the proxy backend factory, Pathways profiling hooks and, with persistence on,
    # the orbax handler that lets the workers write array shards directly.
    pathwaysutils.initialize()
    return env
