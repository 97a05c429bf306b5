"""JAX's persistent compilation cache for Tandem jobs (`run.compile_cache_dir`).

A job's first step is mostly XLA compilation (on the issue-12 standard job, 9.5 of its ~14 s:
the update 7.4 s, the sampler 2.1 s). JAX can keep every compiled program on disk, keyed by
the program, the devices, the XLA flags and the JAX version, and load it the next time the
same program is built: a job restarted with the same config (after a preemption, a crash, a
reward-function edit) skips those seconds. Any change that changes the program (model shape,
batch, mesh, dtype) is a different key, so a stale entry is never used.

On CPU, a trainer program whose temporaries exceed `trainer.CPU_HEAP_LIMIT_BYTES` is compiled
with them split into several heaps (steps ~10% faster on the issue-12 job), and XLA cannot
serialise such a program: it is compiled afresh each time (the trainer silences JAX's warning
about the failed write).

JAX's cache settings are process-wide. A directory the user already gave JAX
(`JAX_COMPILATION_CACHE_DIR` or `jax.config`) is left alone; `run.compile_cache_dir: null`
leaves every JAX setting alone.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

DEFAULT_DIR = "~/.cache/tandem/xla"  # run.compile_cache_dir's default

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

    Leaves JAX alone when `cache_dir` is None or when JAX already has a cache directory. A
    local directory that cannot be created turns the cache off with a warning: a job never
    fails for want of a cache.
    """
    import jax

    global _listening
    with _lock:
        if not _listening:
            jax.monitoring.register_event_listener(_on_event)
            _listening = True
    current = jax.config.jax_compilation_cache_dir
    if current or not cache_dir:
        return current or None
    path = cache_dir
    if "://" not in cache_dir:  # a remote store (gs://...) is JAX's to create
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
    if jax.config.jax_persistent_cache_min_compile_time_secs == _JAX_DEFAULT_MIN_COMPILE_S:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_S)
    return path
