"""Devices -> two disjoint sub-meshes (trainer, sampler), each with its own logical-axis rules.

On a real topology the controller sees every chip of the job; in CPU-proxy simulation it sees
`simulated_devices` fake CPU devices. Either way the split is the same: the first devices form
the trainer mesh, the rest the sampler mesh, and no device is in both.

Sharding is declared: a parameter carries logical axis names (`("embed", "mlp")`), and a mesh's
rules table maps each logical name to a mesh axis. A logical axis whose size the mesh axis does
not divide is replicated instead (and the choice is visible in `describe_shardings`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from controller.config import TopologyConfig, TopologyError


def configure_devices(cfg: TopologyConfig) -> None:
    """Makes the simulated CPU devices exist; call before JAX's backend starts.

    Sets `JAX_PLATFORMS=cpu` and the device count for the "cpu-sim" backend. If the backend is
    already running with a different count, the error says how to fix it.
    """
    if cfg.backend != "cpu-sim":
        return
    import jax

    n = cfg.simulated_devices
    try:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
        # The backend is already up (someone ran a JAX op first). Fine if it matches.
        devices = jax.devices()
        if devices[0].platform != "cpu" or len(devices) != n:
            raise TopologyError(
                f"topology.simulated_devices={n}, but JAX already started with "
                f"{len(devices)} {devices[0].platform} device(s). (fix: construct the Job "
                f"before any JAX operation, or set XLA_FLAGS="
                f"--xla_force_host_platform_device_count={n} and JAX_PLATFORMS=cpu before "
                f"starting Python)"
            ) from None


def simulation_env(n: int) -> dict[str, str]:
    """Environment for a subprocess that should see `n` simulated CPU devices."""
    flags = os.environ.get("XLA_FLAGS", "")
    flags = " ".join(f for f in flags.split() if "xla_force_host_platform_device_count" not in f)
    return {
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={n}".strip(),
    }


@dataclass(frozen=True)
class SubMesh:
    """One side of the split: a mesh and the rules that place logical axes on it."""

    name: str
    mesh: Any  # jax.sharding.Mesh
    rules: Mapping[str, str | None]

    @property
    def size(self) -> int:
        return self.mesh.devices.size

    def axis_size(self, axis: str | None) -> int:
        return 1 if axis is None else self.mesh.shape[axis]

    def spec(self, logical_axes: Sequence[str | None], shape: Sequence[int]) -> Any:
        """PartitionSpec for an array with these logical axes and this shape.

        Each logical axis maps to its rule's mesh axis unless that mesh axis is already used in
        this spec or does not divide the dimension; then the dimension is replicated.
        """
        from jax.sharding import PartitionSpec

        used: set[str] = set()
        out: list[str | None] = []
        for name, dim in zip(logical_axes, shape, strict=True):
            axis = self.rules.get(name) if name is not None else None
            if axis is None or axis in used or dim % self.axis_size(axis):
                out.append(None)
                continue
            used.add(axis)
            out.append(axis)
        return PartitionSpec(*out)

    def sharding(self, logical_axes: Sequence[str | None], shape: Sequence[int]) -> Any:
        from jax.sharding import NamedSharding

        return NamedSharding(self.mesh, self.spec(logical_axes, shape))

    def replicated(self) -> Any:
        from jax.sharding import NamedSharding, PartitionSpec

        return NamedSharding(self.mesh, PartitionSpec())

    def batch_sharding(self, batch_size: int, ndim: int) -> Any:
        """Rows over the mesh axis the "batch" rule names (replicated if it does not divide)."""
        return self.sharding(("batch",) + (None,) * (ndim - 1), (batch_size,) + (1,) * (ndim - 1))


@dataclass(frozen=True)
class Meshes:
    trainer: SubMesh
    sampler: SubMesh

    def describe(self) -> str:
        def one(m: SubMesh) -> str:
            ids = [d.id for d in m.mesh.devices.flat]
            shape = ", ".join(f"{k}={v}" for k, v in m.mesh.shape.items())
            return f"{m.name}: {m.size} devices {ids} mesh({shape})"

        return f"{one(self.trainer)} | {one(self.sampler)}"


def build_meshes(cfg: TopologyConfig, devices: Sequence[Any] | None = None, *,
                 colocated: bool = False) -> Meshes:
    """Splits `devices` (default: all of JAX's) into disjoint trainer and sampler meshes.

    colocated: one mesh of all devices (trainer_mesh's axes) serves both, with the trainer's
    rules, so trainer and sampler hold the same layout.
    """
    import jax
    import numpy as np
    from jax.sharding import Mesh

    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < 2:
        raise TopologyError(
            f"the job sees {len(devices)} device(s); a trainer/sampler split needs >= 2 "
            f"(fix: topology.backend=cpu-sim topology.simulated_devices=8)"
        )
    if colocated:
        shape = cfg.mesh_shape("trainer", len(devices))
        mesh = Mesh(np.array(devices).reshape(shape), tuple(cfg.trainer_mesh))
        rules = dict(cfg.trainer_rules)
        return Meshes(trainer=SubMesh("trainer", mesh, rules),
                      sampler=SubMesh("sampler", mesh, rules))
    n_train, n_samp = cfg.split_counts(len(devices))
    t_shape = cfg.mesh_shape("trainer", n_train)
    s_shape = cfg.mesh_shape("sampler", n_samp)
    t_dev = np.array(devices[:n_train]).reshape(t_shape)
    s_dev = np.array(devices[n_train:]).reshape(s_shape)
    return Meshes(
        trainer=SubMesh("trainer", Mesh(t_dev, tuple(cfg.trainer_mesh)), dict(cfg.trainer_rules)),
        sampler=SubMesh("sampler", Mesh(s_dev, tuple(cfg.sampler_mesh)), dict(cfg.sampler_rules)),
    )
