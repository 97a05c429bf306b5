"""Pathways initialization: the first thing the controller does on a Pathways cluster.

Under Pathways the controller's JAX talks to the cluster through the IFRT proxy
(`JAX_PLATFORMS=proxy`, `JAX_BACKEND_TARGET=grpc://...`). `pathwaysutils.initialize()` must run
before anything touches `jax.devices()`. On every other backend this does nothing.
"""

from __future__ import annotations

import os


def on_pathways() -> bool:
    return os.environ.get("JAX_PLATFORMS", "").strip() == "proxy"


def initialize_pathways() -> bool:
    """Initializes pathwaysutils when running under Pathways. Returns whether it did."""
    if not on_pathways():
        return False
    if not os.environ.get("JAX_BACKEND_TARGET"):
        raise RuntimeError(
            "JAX_PLATFORMS=proxy but JAX_BACKEND_TARGET is not set (fix: export "
            "JAX_BACKEND_TARGET=grpc://<pathways-proxy>:29000, as xpk create-pathways does)"
        )
    import pathwaysutils

    pathwaysutils.initialize()
    return True
