"""Pathways initialization: the first thing the controller does on a Pathways cluster.

Under Pathways the controller's JAX talks to the cluster through the IFRT proxy that runs beside
it in the head pod: `JAX_PLATFORMS=proxy` selects the proxy backend and `JAX_BACKEND_TARGET`
(`grpc://host:port`, 127.0.0.1:29000 in a pod made by `xpk workload create-pathways`) says where
the proxy listens. `pathwaysutils.initialize()` registers that backend with JAX, so it must run
before anything touches `jax.devices()`: a backend started first is a CPU/TPU backend, and the
job would silently run on the head pod's CPU. `ENABLE_PATHWAYS_PERSISTENCE=1` makes
`pathwaysutils` install its orbax array handler, so checkpoints are written by the Pathways
workers straight to storage (GCS) instead of through the controller; `0` or unset leaves orbax
as it is.

On every other backend (`JAX_PLATFORMS` unset, `cpu`, `tpu`, ...) nothing here does anything.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from controller.config import ConfigError

# The proxy address a pod made by `xpk workload create-pathways` listens on (its sidecar).
DEFAULT_BACKEND_TARGET = "grpc://127.0.0.1:29000"
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
            "deploy.pathways.initialize_pathways(), before any JAX operation)"
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
