"""Reshard plans: which device sends which bytes to which, over ICI or DCN, and how long it takes.

A plan is computed from index maps alone. For each leaf, each source device holds a box of the
array (`sharding.devices_indices_map(shape)`), and so does each target device. Every target box
is covered by intersecting it with the distinct source boxes; each piece is sent by one source
device that holds it (the same device if it can, else one in the same slice, else the least
loaded). A transfer between devices of one slice rides the inter-chip interconnect (ICI); one
between slices crosses the data-center network (DCN).

Nothing here needs real devices or real arrays: leaves may be `jax.ShapeDtypeStruct`s and
shardings may be `AbstractSharding`s over `DeviceRef`s, so a 70B model on a v5p-128 is planned on
a laptop. Time is an *estimate* from published bandwidth figures (`TPU_SPECS`), never a
measurement, and is labelled so wherever it is printed.

This module knows pytrees, shapes and shardings, nothing about models or jobs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

Box = tuple[tuple[int, int], ...]  # per dimension [start, stop)
LinkKind = Literal["local", "ici", "dcn"]


class PlanError(ValueError):
    """Inputs a reshard plan cannot be built from; the message names the leaf and the fix."""


# ---------------------------------------------------------------------------------------------
# Devices and shardings without hardware


@dataclass(frozen=True, order=True)
class DeviceRef:
    """Where a device sits: its id, its slice (ICI domain) and its host (DCN endpoint)."""

    id: int
    slice: int = 0
    host: int = 0


def device_ref(device: Any) -> DeviceRef:
    """A `DeviceRef` for a jax device (or a DeviceRef, returned as is).

    The slice comes from the device's `slice_index` attribute (TPU multi-slice), else 0; the
    host from `process_index`, else 0.
    """
    if isinstance(device, DeviceRef):
        return device
    return DeviceRef(int(device.id), int(getattr(device, "slice_index", 0) or 0),
                     int(getattr(device, "process_index", 0) or 0))


@dataclass(frozen=True)
class AbstractMesh:
    """A device grid with named axes, over `DeviceRef`s instead of real devices."""

    devices: np.ndarray  # object array of DeviceRef, shape == axis sizes
    axis_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.devices.ndim != len(self.axis_names):
            raise PlanError(
                f"AbstractMesh: devices grid has {self.devices.ndim} dims but "
                f"{len(self.axis_names)} axis names {self.axis_names}")

    @property
    def shape(self) -> dict[str, int]:
        return dict(zip(self.axis_names, self.devices.shape, strict=True))

    @property
    def size(self) -> int:
        return int(self.devices.size)

    def __hash__(self) -> int:
        return hash((self.axis_names, tuple(d.id for d in self.devices.flat)))

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, AbstractMesh) and self.axis_names == other.axis_names
                and self.devices.shape == other.devices.shape
                and all(a == b for a, b in zip(self.devices.flat, other.devices.flat,
                                               strict=True)))


@dataclass(frozen=True)
class AbstractSharding:
    """A NamedSharding over an `AbstractMesh`: `spec[i]` names the mesh axes dim i is split over.

    Its index map follows JAX's NamedSharding: dim i is cut into n = prod(axis sizes) equal
    blocks (n must divide dim, as JAX requires), and the device at mesh coordinate c gets block
    k = mixed-radix(c[axes]), major axis first.
    """

    mesh: AbstractMesh
    spec: tuple[Any, ...]

    def devices_indices_map(self, shape: Sequence[int]) -> dict[DeviceRef, tuple[slice, ...]]:
        if len(self.spec) > len(shape):
            raise PlanError(f"spec {self.spec} has more entries than shape {tuple(shape)}")
        sizes = self.mesh.shape
        names = self.mesh.axis_names
        out: dict[DeviceRef, tuple[slice, ...]] = {}
        for coord in np.ndindex(*self.mesh.devices.shape):
            at = dict(zip(names, coord, strict=True))
            slices = []
            for i, dim in enumerate(shape):
                entry = self.spec[i] if i < len(self.spec) else None
                axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
                n = math.prod(sizes[a] for a in axes)
                if dim % n:
                    raise PlanError(
                        f"spec {_spec_str(self.spec)} splits dim {i} of shape {tuple(shape)} "
                        f"{n} ways, which does not divide {dim} (fix: replicate that dim, as "
                        f"the topology rules do for sizes the mesh axis does not divide)")
                k = 0
                for a in axes:
                    k = k * sizes[a] + at[a]
                block = dim // n
                slices.append(slice(k * block, (k + 1) * block))
            out[self.mesh.devices[coord]] = tuple(slices)
        return out

    def describe(self) -> str:
        return f"{_mesh_str(self.mesh.shape)} {_spec_str(self.spec)}"


def _mesh_str(shape: Mapping[str, int]) -> str:
    return "mesh(" + ", ".join(f"{k}={v}" for k, v in shape.items()) + ")"


def _spec_str(spec: Sequence[Any]) -> str:
    return "P(" + ", ".join("None" if s is None else repr(s) for s in spec) + ")"


def describe_sharding(sharding: Any) -> str:
    """`mesh(fsdp=4) P('fsdp', None)` for NamedShardings and AbstractShardings."""
    if isinstance(sharding, AbstractSharding):
        return sharding.describe()
    mesh, spec = getattr(sharding, "mesh", None), getattr(sharding, "spec", None)
    if mesh is not None and spec is not None:
        return f"{_mesh_str(dict(mesh.shape))} {_spec_str(tuple(spec))}"
    return type(sharding).__name__


@functools.lru_cache(maxsize=4096)
def _boxes(sharding: Any, shape: tuple[int, ...]) -> list[tuple[Any, Box]]:
    """[(device, box)] for every device of the sharding, boxes as [start, stop) per dim."""
    out = []
    for dev, idx in sharding.devices_indices_map(tuple(shape)).items():
        box = tuple((s.indices(d)[0], s.indices(d)[1]) for s, d in zip(idx, shape, strict=True))
        out.append((dev, box))
    return out


def _box_size(box: Box) -> int:
    return math.prod(max(0, b - a) for a, b in box)


def _intersect(a: Box, b: Box) -> Box | None:
    out = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b, strict=True))
    return out if all(lo < hi for lo, hi in out) or not out else None


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class Transfer:
    """One piece of one leaf: `nbytes` from device `src` to device `dst`."""

    src: DeviceRef
    dst: DeviceRef
    nbytes: int
    kind: LinkKind


@dataclass(frozen=True)
class LeafPlan:
    path: str
    shape: tuple[int, ...]
    dtype: str  # the dtype moved (after any cast)
    src_layout: str
    dst_layout: str
    array_bytes: int  # size * itemsize of the moved dtype
    transfers: tuple[Transfer, ...]
    kind_bytes: Mapping[str, int] = field(default_factory=dict)  # from the transfers

    def bytes_by_kind(self, kind: LinkKind) -> int:
        return self.kind_bytes.get(kind, 0)

    @property
    def moved_bytes(self) -> int:
        """Bytes every target device receives, summed (replicated targets count each copy)."""
        return sum(self.kind_bytes.values())


@dataclass(frozen=True)
class ReshardPlan:
    """Every leaf's transfers plus the totals a user reads before running a job."""

    leaves: tuple[LeafPlan, ...]
    devices: tuple[DeviceRef, ...] = field(default=())

    @property
    def array_bytes(self) -> int:
        """Sum of the leaves' array sizes in bytes (in the dtype moved)."""
        return sum(p.array_bytes for p in self.leaves)

    @property
    def moved_bytes(self) -> int:
        return sum(p.moved_bytes for p in self.leaves)

    def bytes_by_kind(self, kind: LinkKind) -> int:
        return sum(p.bytes_by_kind(kind) for p in self.leaves)

    @property
    def ici_bytes(self) -> int:
        return self.bytes_by_kind("ici")

    @property
    def dcn_bytes(self) -> int:
        return self.bytes_by_kind("dcn")

    @property
    def local_bytes(self) -> int:
        return self.bytes_by_kind("local")

    @functools.cached_property
    def _unique(self) -> list[tuple[tuple[Transfer, ...], int]]:
        """(transfers, how many leaves share them): repeated layers are aggregated once."""
        seen: dict[int, list] = {}
        for p in self.leaves:
            entry = seen.setdefault(id(p.transfers), [p.transfers, 0])
            entry[1] += 1
        return [(t, n) for t, n in seen.values()]

    def link_bytes(self) -> dict[tuple[int, int], int]:
        """Bytes per (source device id, target device id) link, over all leaves."""
        out: dict[tuple[int, int], int] = defaultdict(int)
        for transfers, count in self._unique:
            for t in transfers:
                if t.kind != "local":
                    out[(t.src.id, t.dst.id)] += t.nbytes * count
        return dict(out)

    def busiest_link(self) -> tuple[tuple[int, int], int] | None:
        links = self.link_bytes()
        if not links:
            return None
        key = max(links, key=lambda k: (links[k], -k[0], -k[1]))
        return key, links[key]

    def endpoint_bytes(self) -> dict[str, dict[Any, int]]:
        """Per-endpoint load: chip ICI egress/ingress (by device id), host DCN egress/ingress.

        These are what the time estimate divides by bandwidth: a chip's ICI ports and a host's
        NICs are shared by every transfer that starts or ends there.
        """
        load: dict[str, dict[Any, int]] = {k: defaultdict(int) for k in (
            "ici_out", "ici_in", "dcn_out", "dcn_in")}
        for transfers, count in self._unique:
            for t in transfers:
                n = t.nbytes * count
                if t.kind == "ici":
                    load["ici_out"][t.src.id] += n
                    load["ici_in"][t.dst.id] += n
                elif t.kind == "dcn":
                    load["dcn_out"][(t.src.slice, t.src.host)] += n
                    load["dcn_in"][(t.dst.slice, t.dst.host)] += n
        return {k: dict(v) for k, v in load.items()}

    def per_device_bytes(self, side: Literal["src", "dst"]) -> dict[int, int]:
        """Bytes each device sends (src) or receives (dst), local copies included."""
        out: dict[int, int] = defaultdict(int)
        for transfers, count in self._unique:
            for t in transfers:
                out[(t.src if side == "src" else t.dst).id] += t.nbytes * count
        return dict(out)


def _kind(a: DeviceRef, b: DeviceRef) -> LinkKind:
    if a.id == b.id:
        return "local"
    return "ici" if a.slice == b.slice else "dcn"


def plan_leaf(path: str, shape: Sequence[int], dtype: Any, src: Any, dst: Any,
              *, refs: Callable[[Any], DeviceRef] = device_ref,
              load: dict[int, int] | None = None) -> LeafPlan:
    """The transfers that turn `src`'s placement of one array into `dst`'s.

    Each target box is cut into its intersections with the distinct source boxes; a piece is
    sent by a source device holding it, preferring (1) the target device itself, (2) a device
    in the target's slice (ICI over DCN), (3) the device that has sent the fewest bytes so far
    (`load`, shared across leaves, so replicated sources share the work).
    """
    shape = tuple(int(d) for d in shape)
    itemsize = as_dtype(dtype).itemsize
    load = {} if load is None else load
    by_box: dict[Box, list[DeviceRef]] = defaultdict(list)
    for dev, box in _boxes(src, shape):
        by_box[box].append(refs(dev))
    transfers = []
    covered = 0
    for dev, box in _boxes(dst, shape):
        d = refs(dev)
        for sbox, holders in by_box.items():
            piece = _intersect(box, sbox)
            if piece is None:
                continue
            nbytes = _box_size(piece) * itemsize
            s = min(holders, key=lambda h: (h.id != d.id, h.slice != d.slice,
                                            load.get(h.id, 0), h.id))
            load[s.id] = load.get(s.id, 0) + nbytes
            transfers.append(Transfer(s, d, nbytes, _kind(s, d)))
            covered += nbytes
    want = sum(_box_size(b) for _, b in _boxes(dst, shape)) * itemsize
    if covered != want:
        raise PlanError(
            f"{path}: the source boxes cover {covered} of the {want} bytes the target needs "
            f"(source {describe_sharding(src)}, target {describe_sharding(dst)}); the source "
            f"sharding does not hold the whole array")
    kinds: dict[str, int] = defaultdict(int)
    for t in transfers:
        kinds[t.kind] += t.nbytes
    return LeafPlan(path, shape, as_dtype(dtype).name, describe_sharding(src),
                    describe_sharding(dst), math.prod(shape) * itemsize, tuple(transfers),
                    dict(kinds))


def plan_reshard(tree: Any, src_shardings: Any, dst_shardings: Any, *, dtype: Any = None,
                 refs: Callable[[Any], DeviceRef] = device_ref) -> ReshardPlan:
    """Plans moving `tree` (arrays or ShapeDtypeStructs) from `src_shardings` to `dst_shardings`.

    Args:
      tree: a pytree whose leaves have `.shape` and `.dtype`.
      src_shardings, dst_shardings: pytrees of the same structure; leaves are
        `jax.sharding.Sharding`s or `AbstractSharding`s.
      dtype: the dtype moved for floating leaves (a cast before the move), or None to keep each
        leaf's dtype.
      refs: maps a sharding's device to a `DeviceRef` (slice and host); the default reads
        `slice_index` and `process_index` from jax devices.
    """
    import jax

    leaves = jax.tree_util.tree_leaves_with_path(tree)
    src = jax.tree.leaves(src_shardings, is_leaf=_is_sharding)
    dst = jax.tree.leaves(dst_shardings, is_leaf=_is_sharding)
    if not len(leaves) == len(src) == len(dst):
        raise PlanError(
            f"plan_reshard: the tree has {len(leaves)} leaves but the source shardings have "
            f"{len(src)} and the target shardings {len(dst)} (fix: pass sharding trees with the "
            f"params tree's structure)")
    load: dict[int, int] = {}
    # Repeated layers share shapes and layouts: each distinct leaf is planned once and its
    # transfers shared (a repeat adds the same bytes to the same senders' load).
    cache: dict[Any, tuple[LeafPlan, dict[int, int]]] = {}
    out = []
    for (path, leaf), s, d in zip(leaves, src, dst, strict=True):
        moved = cast_dtype(leaf.dtype, dtype)
        key = (tuple(leaf.shape), moved.name, s, d)
        name = jax.tree_util.keystr(path)
        if key not in cache:
            p = plan_leaf(name, leaf.shape, moved, s, d, refs=refs, load=load)
            sent: dict[int, int] = defaultdict(int)
            for t in p.transfers:
                sent[t.src.id] += t.nbytes
            cache[key] = (p, dict(sent))
            out.append(p)
            continue
        p, sent = cache[key]
        for i, n in sent.items():
            load[i] = load.get(i, 0) + n
        out.append(dataclasses.replace(p, path=name))
    devices = sorted({t.src for p, _ in cache.values() for t in p.transfers}
                     | {t.dst for p, _ in cache.values() for t in p.transfers})
    return ReshardPlan(tuple(out), tuple(devices))


def _is_sharding(x: Any) -> bool:
    return isinstance(x, AbstractSharding) or hasattr(x, "devices_indices_map")


def as_dtype(dtype: Any) -> np.dtype:
    """np.dtype that also knows "bfloat16" (via jax's ml_dtypes)."""
    import jax.numpy as jnp

    return np.dtype(jnp.dtype(dtype))


def cast_dtype(dtype: Any, target: Any) -> np.dtype:
    """The dtype a leaf is moved in: `target` for floating leaves when given, else its own."""
    import jax.numpy as jnp

    dtype = as_dtype(dtype)
    if target is None or not jnp.issubdtype(dtype, jnp.floating):
        return dtype
    return as_dtype(target)


# ---------------------------------------------------------------------------------------------
# Named TPU topologies and the time estimate


@dataclass(frozen=True)
class TpuSpec:
    """Published per-chip and per-host figures for one TPU generation."""

    name: str
    ici_gbytes_s: float  # bidirectional ICI bandwidth per chip, GB/s
    dcn_gbits_s_per_host: float  # DCN (NIC) bandwidth per host, Gbit/s
    chips_per_host: int
    hbm_gib: float  # HBM per chip
    cores_per_chip_in_name: int  # "v5p-64" counts TensorCores (2 per chip); v5e/v6e count chips
    source: str

    @property
    def ici_out_gbytes_s(self) -> float:
        """One direction of a chip's ICI: half the bidirectional figure."""
        return self.ici_gbytes_s / 2

    @property
    def dcn_gbytes_s_per_host(self) -> float:
        return self.dcn_gbits_s_per_host / 8


TPU_SPECS: dict[str, TpuSpec] = {
    "v5e": TpuSpec("v5e", ici_gbytes_s=400.0, dcn_gbits_s_per_host=200.0, chips_per_host=8,
                   hbm_gib=16.0, cores_per_chip_in_name=1,
                   source="cloud.google.com/tpu/docs/v5e (ICI 400 GB/s bidirectional per chip; "
                          "2 x 100 Gbps NIC per 8-chip host)"),
    "v5p": TpuSpec("v5p", ici_gbytes_s=1200.0, dcn_gbits_s_per_host=200.0, chips_per_host=4,
                   hbm_gib=95.0, cores_per_chip_in_name=2,
                   source="cloud.google.com/tpu/docs/v5p (ICI 1200 GB/s bidirectional per chip; "
                          "DCN 50 Gbps per chip x 4 chips per host)"),
    "v6e": TpuSpec("v6e", ici_gbytes_s=800.0, dcn_gbits_s_per_host=800.0, chips_per_host=8,
                   hbm_gib=32.0, cores_per_chip_in_name=1,
                   source="cloud.google.com/tpu/docs/v6e (ICI 800 GB/s bidirectional per chip; "
                          "4 x 200 Gbps NIC per 8-chip host)"),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "trillium": "v6e"}


@dataclass(frozen=True)
class TpuTopology:
    """A named TPU topology (`v5p-64`), possibly several slices joined over DCN."""

    spec: TpuSpec
    name: str
    chips_per_slice: int
    num_slices: int = 1

    @property
    def num_chips(self) -> int:
        return self.chips_per_slice * self.num_slices

    @property
    def hosts_per_slice(self) -> int:
        return -(-self.chips_per_slice // self.spec.chips_per_host)

    def devices(self) -> list[DeviceRef]:
        """One DeviceRef per chip, slice-major then host-major (how JAX orders TPU devices)."""
        per_host = min(self.spec.chips_per_host, self.chips_per_slice)
        out = []
        for i in range(self.num_chips):
            s, local = divmod(i, self.chips_per_slice)
            out.append(DeviceRef(i, s, s * self.hosts_per_slice + local // per_host))
        return out

    def describe(self) -> str:
        slices = f"{self.num_slices} x " if self.num_slices > 1 else ""
        return (f"{slices}{self.name}: {self.num_chips} chips, "
                f"{self.hosts_per_slice * self.num_slices} hosts "
                f"({min(self.spec.chips_per_host, self.chips_per_slice)} chips/host)")


def parse_topology(name: str, num_slices: int = 1) -> TpuTopology:
    """`v5p-64`, `v5e-16` / `v5litepod-16`, `v6e-256` -> TpuTopology (chips per slice)."""
    m = re.fullmatch(r"([a-z0-9]+?)-(\d+)", name.strip().lower())
    gen = m and _ALIASES.get(m.group(1), m.group(1))
    if not m or gen not in TPU_SPECS:
        raise PlanError(
            f"--topology={name!r}: expected <generation>-<size> with generation one of "
            f"{sorted(TPU_SPECS)} (fix: e.g. --topology v5p-64)")
    if num_slices < 1:
        raise PlanError(f"--num-slices={num_slices}: must be >= 1 (fix: --num-slices 1)")
    spec = TPU_SPECS[gen]
    size = int(m.group(2))
    if size % spec.cores_per_chip_in_name or size == 0:
        raise PlanError(
            f"--topology={name!r}: {gen} sizes count TensorCores, {spec.cores_per_chip_in_name} "
            f"per chip, so the size must be a positive multiple of "
            f"{spec.cores_per_chip_in_name} (fix: e.g. --topology {gen}-64)")
    return TpuTopology(spec, f"{gen}-{size}", size // spec.cores_per_chip_in_name, num_slices)


@dataclass(frozen=True)
class Estimate:
    """An *estimated* sync time: bytes over the busiest endpoint divided by its bandwidth.

    Model: every chip's ICI traffic is spread over all its ICI ports with no multi-hop
    contention, so a chip sends (and receives) at most half its bidirectional ICI figure; every
    host's DCN traffic shares its NICs. ICI and DCN transfers overlap, so
    t = max(max_chip(ici_out, ici_in) / B_ici_dir, max_host(dcn_out, dcn_in) / B_dcn_host).
    A lower bound: real transfers add latency, hops and software overhead.
    """

    seconds: float
    ici_seconds: float
    dcn_seconds: float
    bottleneck: str
    ici_gbytes_s_per_chip_dir: float
    dcn_gbytes_s_per_host: float
    source: str


def estimate_time(plan: ReshardPlan, *, ici_gbytes_s_per_chip_dir: float,
                  dcn_gbytes_s_per_host: float, source: str = "user-supplied") -> Estimate:
    """Estimated seconds for `plan` at these bandwidths (monotone: more bandwidth, less time)."""
    if ici_gbytes_s_per_chip_dir <= 0 or dcn_gbytes_s_per_host <= 0:
        raise PlanError(
            f"estimate_time: bandwidths must be > 0, got ICI {ici_gbytes_s_per_chip_dir} GB/s, "
            f"DCN {dcn_gbytes_s_per_host} GB/s")
    load = plan.endpoint_bytes()
    ici_key, ici_max = _worst(load["ici_out"], load["ici_in"])
    dcn_key, dcn_max = _worst(load["dcn_out"], load["dcn_in"])
    ici_s = ici_max / (ici_gbytes_s_per_chip_dir * 1e9)
    dcn_s = dcn_max / (dcn_gbytes_s_per_host * 1e9)
    if dcn_s >= ici_s and dcn_max:
        (direction, (slice_, host)) = dcn_key
        bottleneck = f"DCN {direction} of host {host} in slice {slice_}: {dcn_max / 1e9:.2f} GB"
    elif ici_max:
        bottleneck = f"ICI {ici_key[0]} of chip {ici_key[1]}: {ici_max / 1e9:.2f} GB"
    else:
        bottleneck = "none (all local)"
    return Estimate(max(ici_s, dcn_s), ici_s, dcn_s, bottleneck, ici_gbytes_s_per_chip_dir,
                    dcn_gbytes_s_per_host, source)


def estimate_on(plan: ReshardPlan, topo: TpuTopology) -> Estimate:
    """`estimate_time` with the published figures of the topology's TPU generation."""
    s = topo.spec
    return estimate_time(plan, ici_gbytes_s_per_chip_dir=s.ici_out_gbytes_s,
                         dcn_gbytes_s_per_host=s.dcn_gbytes_s_per_host, source=s.source)


def _worst(out: Mapping[Any, int], inn: Mapping[Any, int]) -> tuple[tuple[str, Any], int]:
    best: tuple[tuple[str, Any], int] = (("-", None), 0)
    for direction, table in (("egress", out), ("ingress", inn)):
        for k, v in table.items():
            if v > best[1]:
                best = ((direction, k), v)
    return best


def per_device_bytes(tree: Any, shardings: Any, *, dtype: Any = None) -> dict[int, int]:
    """Bytes of `tree` each device holds under `shardings` (in the moved dtype), by device id."""
    import jax

    out: dict[int, int] = defaultdict(int)
    for leaf, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings, is_leaf=_is_sharding),
                        strict=True):
        itemsize = cast_dtype(leaf.dtype, dtype).itemsize
        for dev, box in _boxes(sh, tuple(int(d) for d in leaf.shape)):
            out[dev.id] += _box_size(box) * itemsize
    return dict(out)
