"""Move a params pytree from one sharding tree to another (trainer layout -> sampler layout).

Three ways to move, chosen per backend (`Resharder(method="auto")`):

- **pathways**: under Pathways (`JAX_PLATFORMS=proxy`) when pathwaysutils reports IFRT reshard
  available, `pathwaysutils.reshard.reshard` moves every leaf device-to-device over ICI/DCN.
- **host_copy** (the CPU backend): every simulated CPU device's memory is host memory, so the
  wire is memcpy. Each target shard is filled straight from the source shards (one read and
  one write per byte) by a cached copy plan, with streaming stores, into recycled 64-byte
  aligned host buffers that JAX adopts without copying (reshard/hostcopy.py says why each of
  those matters).
- **device_put** (TPU/GPU without Pathways): `jax.device_put` of the whole tree at once. When
  the source and target layouts differ, each leaf is first relaid out *on the source devices*
  into the target's layout (one jitted identity, an all-to-all over ICI), so the cross-mesh
  `device_put` copies whole shards device-to-device. Without that, JAX gathers any leaf whose
  target shards match no source shard into one host numpy array (and caches it on the source
  array) before slicing and uploading it again: that is why a naive fp32 `device_put` from FSDP
  to TP on 8 CPU devices ran at ~0.25x of memcpy.

Options: a dtype cast (bf16 sampler weights from fp32 master weights) done on the trainer side
before the move; chunking by a byte budget, so the transfer's temporaries (cast copies, staged
relayouts) stay bounded, with the peak reported; donation of those temporaries where the
backend supports it and the caller asks (never on CPU: donated buffers that are touched again
crash JAX's CPU client). The caller's tree is never donated: the trainer keeps its params.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import jax
import numpy as np

from reshard.hostcopy import HostCopier
from reshard.plan import as_dtype, cast_dtype

Method = Literal["auto", "pathways", "device_put", "host_copy"]
METHODS: tuple[str, ...] = ("auto", "pathways", "device_put", "host_copy")


class TransferError(RuntimeError):
    """A transfer that cannot run as configured; the message names the option and the fix."""


@dataclass(frozen=True)
class TransferStats:
    bytes: int  # bytes of the moved tree (in the dtype moved)
    seconds: float  # wall time of the whole transfer, cast included, to completion
    method: str = "device_put"
    chunks: int = 1
    peak_extra_bytes: int = 0  # largest total of temporaries alive at once (cast / staging)
    cast_seconds: float = 0.0
    donated: bool = False  # whether temporaries were donated to the move

    @property
    def gbps(self) -> float:
        """Measured bandwidth in GB/s (1e9 bytes per second)."""
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")


def tree_bytes(tree: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def pathways_reshard_api() -> Callable[..., Any] | None:
    """pathwaysutils' reshard function when running on Pathways with IFRT reshard, else None.

    Pathways is `JAX_PLATFORMS=proxy` (pathwaysutils reads the same config);
    `pathwaysutils.jax.ifrt_reshard_available()` probes the proxy backend once.
    """
    if "proxy" not in _jax_platforms():
        return None
    try:
        import pathwaysutils.jax as pw_jax
        from pathwaysutils import reshard as pw_reshard
    except ImportError:
        return None
    return pw_reshard.reshard if pw_jax.ifrt_reshard_available() else None


def _jax_platforms() -> str:
    return jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")


def _is_sharding(x: Any) -> bool:
    return isinstance(x, jax.sharding.Sharding)


def _platforms(shardings: Sequence[Any]) -> set[str]:
    """The platforms of these shardings' devices. Runs on every sync: a params tree has a few
    meshes but a sharding object per leaf, so each mesh's devices are looked at once."""
    meshes: dict[int, Any] = {}
    for s in shardings:
        mesh = getattr(s, "mesh", None)
        devices = getattr(mesh, "devices", None)  # None for non-mesh shardings
        key = id(mesh) if devices is not None else id(s)
        if key not in meshes:
            meshes[key] = s.device_set if devices is None else np.asarray(devices).flat
    return {d.platform for devices in meshes.values() for d in devices}


class Resharder:
    """Moves trees to target shardings and reports bytes moved, time taken and peak temporaries.

    Args:
      dtype: cast floating leaves to this dtype on the source devices before moving (e.g.
        "bfloat16" for a bf16 sampler from fp32 master weights); None keeps each leaf's dtype.
      chunk_bytes: move at most about this many bytes at a time (whole leaves; a leaf larger
        than the budget is a chunk of its own), waiting for each chunk before the next, so the
        temporaries stay bounded; None moves the whole tree at once.
      donate: donate the transfer's own temporaries to the move where the backend supports it;
        ignored on CPU.
      method: "auto" (pathways if available, host_copy on CPU, device_put elsewhere) or one of
        them by name.
      copy_threads: threads that run host_copy's copies (default: half the CPUs, 1 to 8; the
        copy is memory-bound). While they copy, the calling thread reads the next leaves'
        source addresses and wraps the filled buffers into arrays, then copies beside them;
        0 does all of it on the calling thread.
      pathways_api: returns pathwaysutils' reshard function or None (a seam for tests).
    """

    def __init__(self, *, dtype: Any = None, chunk_bytes: int | None = None,
                 donate: bool = False, method: Method = "auto", copy_threads: int | None = None,
                 pathways_api: Callable[[], Callable[..., Any] | None] = pathways_reshard_api):
        if method not in METHODS:
            raise TransferError(f"reshard.method={method!r}: must be one of {METHODS}")
        if chunk_bytes is not None and chunk_bytes < 1:
            raise TransferError(f"reshard.chunk_bytes={chunk_bytes}: must be >= 1 (or null)")
        self.dtype = None if dtype is None else as_dtype(dtype)
        self.chunk_bytes = chunk_bytes
        self.donate = donate
        self.method = method
        if copy_threads is not None and copy_threads < 0:
            raise TransferError(f"copy_threads={copy_threads}: must be >= 0 (or None)")
        self.copy_threads = (max(1, min(8, (os.cpu_count() or 1) // 2))
                             if copy_threads is None else copy_threads)
        self._pathways_api = pathways_api
        self._host = HostCopier(threads=self.copy_threads)  # plans + recycled buffers

    # -- choosing the path -----------------------------------------------------------------

    def resolve_method(self, tree: Any, target_shardings: Any) -> str:
        """The method `transfer` will use for these arrays and targets."""
        return self._resolve([x.sharding for x in jax.tree.leaves(tree)],
                             jax.tree.leaves(target_shardings, is_leaf=_is_sharding))

    def _resolve(self, sources: list[Any], targets: list[Any]) -> str:
        api = self._pathways_api() if self.method in ("auto", "pathways") else None
        if self.method == "pathways" and api is None:
            raise TransferError(
                "reshard.method=pathways, but this is not a Pathways backend with IFRT reshard "
                "(fix: run with JAX_PLATFORMS=proxy on a Pathways cluster, or "
                "reshard.method=auto)")
        if api is not None:
            return "pathways"
        if self.method != "auto":
            return self.method
        return "host_copy" if _platforms([*sources, *targets]) == {"cpu"} else "device_put"

    # -- the move --------------------------------------------------------------------------

    def transfer(self, tree: Any, target_shardings: Any) -> tuple[Any, TransferStats]:
        """`tree` on `target_shardings` (a tree of the same structure), and its stats.

        target_shardings None: the receiver has no device layout (vLLM copies host arrays
        into its own engine), so the tree is handed over as it is, uncast; its bytes are what
        the receiver takes (method "handover").
        """
        start = time.perf_counter()
        if target_shardings is None:
            return tree, TransferStats(tree_bytes(tree), time.perf_counter() - start,
                                       method="handover")
        leaves, treedef = jax.tree.flatten(tree)
        targets = jax.tree.leaves(target_shardings, is_leaf=_is_sharding)
        if len(targets) != len(leaves):
            raise TransferError(
                f"transfer: the tree has {len(leaves)} leaves but target_shardings has "
                f"{len(targets)} (fix: pass a sharding tree with the params tree's structure)")
        if self.dtype is None and all(
                x.sharding == s for x, s in zip(leaves, targets, strict=True)):
            # Same layout on the same devices (colocated): hand the arrays over, copy nothing.
            return tree, TransferStats(0, time.perf_counter() - start, method="none")
        sources = [x.sharding for x in leaves]
        method = self._resolve(sources, targets)
        api = self._pathways_api() if method == "pathways" else None
        cpu = "cpu" in _platforms(sources)
        donate = self.donate and not cpu  # never on CPU (see the module docstring)
        out: list[Any] = [None] * len(leaves)
        peak = 0
        cast_s = 0.0
        chunks = self._chunks(leaves)
        for idx in chunks:
            xs = [leaves[i] for i in idx]
            dsts = [targets[i] for i in idx]
            extra = 0
            # CAST on the source devices, so fewer bytes cross the wire.
            t0 = time.perf_counter()
            xs, owned = self._cast(xs)  # owned[i]: xs[i] is our cast copy, free to donate
            cast_bytes = sum(x.size * x.dtype.itemsize for x, o in zip(xs, owned, strict=True)
                             if o)
            extra += cast_bytes
            if cast_bytes:
                jax.block_until_ready(xs)  # HOST SYNC: time the cast on its own
            cast_s += time.perf_counter() - t0
            # MOVE.
            if method == "pathways":
                moved = _split_by_donation(api, xs, dsts, owned if donate else None)
            elif method == "host_copy":
                moved = self._host.run(xs, dsts)
            else:
                moved, staged = _staged_device_put(xs, dsts, owned if donate else None)
                extra += staged
            # HOST SYNC: wait for the chunk, so its temporaries are freed before the next one
            # and the time measured is the transfer's. (host_copy returns when its copy is
            # done: its arrays are host buffers that are ready by construction.)
            if method != "host_copy":
                jax.block_until_ready(moved)
            peak = max(peak, extra)
            for i, y in zip(idx, moved, strict=True):
                out[i] = y
            del xs, moved
        result = jax.tree.unflatten(treedef, out)
        return result, TransferStats(
            bytes=tree_bytes(out), seconds=time.perf_counter() - start, method=method,
            chunks=len(chunks), peak_extra_bytes=peak, cast_seconds=cast_s, donated=donate)

    def _chunks(self, leaves: Sequence[Any]) -> list[list[int]]:
        """Consecutive leaf indices, each group's moved bytes within chunk_bytes when possible."""
        if self.chunk_bytes is None:
            return [list(range(len(leaves)))] if leaves else []
        groups: list[list[int]] = []
        size = 0
        for i, x in enumerate(leaves):
            n = x.size * cast_dtype(x.dtype, self.dtype).itemsize
            if groups and size + n <= self.chunk_bytes:
                groups[-1].append(i)
                size += n
            else:
                groups.append([i])
                size = n
        return groups

    def _cast(self, xs: list[Any]) -> tuple[list[Any], list[bool]]:
        """Casts the floating leaves that need it, on their own devices.

        Returns the leaves and, per leaf, whether it is a new cast copy (owned by the transfer).
        """
        owned = [False] * len(xs)
        if self.dtype is None:
            return xs, owned
        todo = [i for i, x in enumerate(xs) if cast_dtype(x.dtype, self.dtype) != x.dtype]
        if not todo:
            return xs, owned
        cast = _cast_fn([xs[i] for i in todo], self.dtype.name)
        out = list(xs)
        for i, y in zip(todo, cast, strict=True):
            out[i] = y
            owned[i] = True
        return out, owned


def _split_by_donation(move: Callable[..., Any], xs: list[Any], dsts: list[Any],
                       donate: list[bool] | None) -> list[Any]:
    """`move(xs, dsts, donate=...)` in at most two batched calls: donated leaves and the rest."""
    flags = donate or [False] * len(xs)
    out: list[Any] = [None] * len(xs)
    for flag in (True, False):
        idx = [i for i, f in enumerate(flags) if f == flag]
        if idx:
            for i, y in zip(idx, move([xs[i] for i in idx], [dsts[i] for i in idx],
                                      donate=flag), strict=True):
                out[i] = y
    return out


@functools.partial(jax.jit, static_argnums=1)
def _cast_fn(xs: list[Any], dtype: str) -> list[Any]:
    # Elementwise, so each output keeps its input's sharding: the cast stays on the trainer.
    return [x.astype(dtype) for x in xs]


# ---------------------------------------------------------------------------------------------
# device_put: relayout on the source devices, then whole-shard copies across meshes


def staging_sharding(src: Any, dst: Any) -> Any | None:
    """A sharding on `src`'s devices with `dst`'s index map (up to replication), or None.

    With the same device count, `dst`'s mesh shape filled with the source devices; with k times
    as many source devices, an extra leading axis of size k that replicates. Then every target
    shard has a source shard with the same index, and device_put copies shards directly.
    """
    from jax.sharding import Mesh, NamedSharding

    if not (isinstance(src, NamedSharding) and isinstance(dst, NamedSharding)):
        return None
    n_src, n_dst = src.mesh.devices.size, dst.mesh.devices.size
    if n_src % n_dst:
        return None
    devs = np.asarray(src.mesh.devices).reshape(-1)
    if n_src == n_dst:
        mesh = Mesh(devs.reshape(dst.mesh.devices.shape), dst.mesh.axis_names)
    else:
        mesh = Mesh(devs.reshape((n_src // n_dst, *dst.mesh.devices.shape)),
                    ("_stage", *dst.mesh.axis_names))
    return NamedSharding(mesh, dst.spec)


@functools.lru_cache(maxsize=64)
def _relayout_fn(out_shardings: tuple[Any, ...]) -> Callable[..., Any]:
    return jax.jit(lambda xs: list(xs), out_shardings=list(out_shardings))


def _staged_device_put(xs: list[Any], dsts: list[Any], donate: list[bool] | None
                       ) -> tuple[list[Any], int]:
    """Returns (moved leaves, bytes of staging temporaries).

    `donate[i]` (None: donate nothing) says xs[i] is a temporary of ours; staged copies are too.
    """
    stage_idx, stage_sh = [], []
    for i, (x, d) in enumerate(zip(xs, dsts, strict=True)):
        s = staging_sharding(x.sharding, d)
        if s is not None and not x.sharding.is_equivalent_to(s, x.ndim):
            stage_idx.append(i)
            stage_sh.append(s)
    staged_bytes = 0
    xs = list(xs)
    if stage_idx:
        # The relayout runs on the trainer's devices (ICI all-to-all on a TPU slice).
        staged = _relayout_fn(tuple(stage_sh))([xs[i] for i in stage_idx])
        for i, y in zip(stage_idx, staged, strict=True):
            xs[i] = y
        staged_bytes = sum(y.size * y.dtype.itemsize for y in staged)
    flags = None
    if donate is not None:  # staged copies are ours to donate too; the caller's arrays never
        flags = [f or i in stage_idx for i, f in enumerate(donate)]
    # One batched device_put per donation flag for the whole chunk.
    return _split_by_donation(
        lambda a, b, donate: jax.device_put(a, b, donate=donate), xs, dsts, flags), staged_bytes
