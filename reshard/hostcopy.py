"""host_copy: a weight sync on the CPU backend, where every device's memory is host memory.

A transfer from one layout to another is then a set of block copies in host memory (FSDP rows
-> TP columns is a transpose of contiguous runs a few hundred bytes long). Four costs dominate
such a copy, and each has a fix here:

1. **Page faults.** Writing into fresh memory faults every page in (measured on the 2-core dev
   box: np.copy of 410 MB into fresh memory 0.12 s, into touched memory 0.04 s). The target
   buffers are recycled: each plan keeps a few sets of them, and a set is refilled only when
   no array references it any more (the sampler dropped the weights it held), as an
   accelerator's allocator reuses HBM. JAX's CPU client adopts each (64-byte aligned) buffer
   without copying, so the output arrays *are* the filled buffers.
2. **Python per piece.** The copy plan (which bytes of which source shard go where in which
   target buffer, merged into as few 2-D blocks as the layouts allow) is computed once per
   (shapes, dtypes, source shardings, target shardings) and cached; a sync only reads the
   source buffers' addresses and runs the blocks.
3. **Read-for-ownership.** Ordinary stores read each destination cache line from DRAM before
   writing it, so a block copy moves 1.5x the bytes of a large memcpy, which streams
   (non-temporal stores). Measured: contiguous copies in 1-64 MB pieces ran at 0.6x of one
   410 MB memcpy; numpy's strided block copies at 0.35x. The blocks run in a small C kernel
   (`_hostcopy.c`, compiled once with the system C compiler and cached) that writes whole
   destination lines with streaming stores. Without a C compiler the same plan runs with
   numpy (correct, slower); `native_status()` says which.
4. **Per-shard JAX objects.** Reading each source shard's address and wrapping each filled
   buffer into an array cost ~1.5 ms each per sync for a 100M-parameter model (hundreds of
   shards). With copy threads, the copy runs in stages (whole leaves) cut into ~1 MB chunks;
   the threads wait for each stage's go-ahead inside one native call and take chunks from a
   shared counter, while the calling thread reads the next stage's addresses and then wraps
   the buffers (JAX does not read a buffer to adopt it; a buffer set JAX once copied instead
   of adopting is wrapped only after the copy). Then the calling thread joins the copy and
   takes its share of the chunks left, so no thread idles while bytes remain.

Nothing here is used on TPU/GPU or Pathways (see reshard/transfer.py).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

ALIGN = 64  # bytes: JAX's CPU client adopts buffers this aligned instead of copying them
# Streaming stores bypass the cache; worth it when the sync is much larger than a core's L2
# (glibc makes the same call for memcpy, at ~3/4 of the L3 size). Smaller syncs keep their
# lines in cache for the sampler's next read.
STREAM_MIN_BYTES = 8 << 20

_SOURCE = Path(__file__).with_name("_hostcopy.c")


# ---------------------------------------------------------------------------------------------
# The native kernel: built once per machine with the system C compiler, cached


class _Native:
    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        lib.tandem_stream_level.restype = ctypes.c_int
        lib.tandem_copy_shared.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                           ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                           ctypes.c_int]
        lib.tandem_copy_shared.restype = ctypes.c_int64
        lib.tandem_publish.argtypes = [ctypes.c_void_p, ctypes.c_int64]
        lib.tandem_publish.restype = None
        self.stream_level = int(lib.tandem_stream_level())

    def copy_shared(self, blocks_Nx8: np.ndarray, chunks: Chunks, ready_S: np.ndarray,
                    next_S: np.ndarray, streaming: bool) -> int:
        """Copies stage s's chunks once ready[s] is published, taking each next chunk from the
        shared counter next[s]: any number of threads may run this at once on the same
        arguments, joining at any time. Returns the stages gone through (fewer when one was
        published as cancelled). ctypes releases the GIL for the call."""
        _check_blocks(blocks_Nx8)
        n = len(chunks.stage_chunks) - 1
        assert ready_S.dtype == next_S.dtype == np.int64 and len(ready_S) == len(next_S) == n
        assert ready_S.flags.c_contiguous and next_S.flags.c_contiguous
        assert chunks.bounds[0] >= 0 and chunks.bounds[-1] <= len(blocks_Nx8)
        return int(self.lib.tandem_copy_shared(
            blocks_Nx8.ctypes.data, chunks.bounds.ctypes.data, chunks.stage_chunks.ctypes.data,
            n, ready_S.ctypes.data, next_S.ctypes.data, int(streaming)))

    def publish(self, ready_S: np.ndarray, stage: int, value: int) -> None:
        """ready[stage] = value, after every earlier store of this thread (release order)."""
        self.lib.tandem_publish(ready_S.ctypes.data + 8 * stage, value)


def _check_blocks(blocks: np.ndarray) -> None:
    assert blocks.dtype == np.int64 and blocks.shape[1:] == (8,) and blocks.flags.c_contiguous


_native_lock = threading.Lock()
_native: _Native | None = None
_native_error: str | None = None


def _cache_dir() -> Path:
    root = os.environ.get("TANDEM_CACHE_DIR") or os.environ.get("XDG_CACHE_HOME")
    return Path(root) / "tandem" if root else Path.home() / ".cache" / "tandem"


def _build(cc: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        subprocess.run([cc, "-O2", "-std=gnu11", "-shared", "-fPIC", str(_SOURCE), "-o", tmp],
                       check=True, capture_output=True, timeout=120)
        os.replace(tmp, out)  # atomic: concurrent builders never load a half-written file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def native_kernel() -> _Native | None:
    """The compiled block-copy kernel, or None (then `native_status()` says why).

    Built on first use from `_hostcopy.c` with `$CC` (else cc, gcc or clang) into
    `$TANDEM_CACHE_DIR/tandem` (else `$XDG_CACHE_HOME/tandem`, else ~/.cache/tandem), keyed by
    a hash of the source, the compiler and the machine, then loaded from there. Setting
    `TANDEM_HOSTCOPY_NATIVE=0` skips it (numpy copies instead).
    """
    global _native, _native_error
    with _native_lock:
        if _native is not None or _native_error is not None:
            return _native
        if os.environ.get("TANDEM_HOSTCOPY_NATIVE", "1") == "0":
            _native_error = "disabled by TANDEM_HOSTCOPY_NATIVE=0"
            return None
        cc = os.environ.get("CC") or next(
            (c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
        if cc is None:
            _native_error = "no C compiler found (set CC, or install gcc/clang)"
            return None
        tag = hashlib.sha256(_SOURCE.read_bytes() + f"{cc}|{platform.machine()}|{sys.platform}"
                             .encode()).hexdigest()[:16]
        for d in (_cache_dir(), Path(tempfile.gettempdir()) / f"tandem-{os.getuid()}"):
            so = d / f"hostcopy-{tag}.so"
            try:
                if not so.exists():
                    _build(cc, so)
                _native = _Native(ctypes.CDLL(str(so)))
                return _native
            except (OSError, subprocess.SubprocessError) as e:
                err = getattr(e, "stderr", b"") or b""
                _native_error = f"building {so} with {cc} failed: {e} {err.decode()[-500:]}"
        return None


def native_status() -> str:
    """One line: which copy kernel host_copy uses, and why."""
    k = native_kernel()
    if k is None:
        return f"numpy block copies ({_native_error})"
    level = {3: "avx512", 2: "avx", 1: "sse2", 0: "memcpy (no streaming stores here)"}
    return f"native block copies, streaming stores: {level.get(k.stream_level, '?')}"


# ---------------------------------------------------------------------------------------------
# Plans: which bytes go where, computed once per layout pair


def _box(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    return tuple(s.indices(d)[:2] for s, d in zip(index, shape, strict=True))


def _c_strides(shape: tuple[int, ...], itemsize: int) -> list[int]:
    out, acc = [], itemsize
    for n in reversed(shape):
        out.append(acc)
        acc *= n
    return out[::-1]


def box_blocks(extent: tuple[int, ...], dst_strides: list[int], src_strides: list[int],
               itemsize: int) -> list[tuple[int, int, int, int, int, int]]:
    """A box copy between two row-major arrays as few 2-D blocks as possible.

    Returns (dst_offset, src_offset, rows, row_bytes, dst_stride, src_stride) per block,
    offsets relative to the box's first element. Inner dimensions whose strides equal the run
    so far on both sides merge into one contiguous run; the next dimension (and any outer one
    that continues it evenly on both sides) is the rows; dimensions beyond that are unrolled
    into separate blocks.
    """
    dims = [(n, ds, ss) for n, ds, ss in zip(extent, dst_strides, src_strides, strict=True)
            if n != 1]
    if any(n == 0 for n, _, _ in dims):
        return []
    run = itemsize
    while dims and dims[-1][1] == run and dims[-1][2] == run:
        run *= dims.pop()[0]
    rows, rds, rss = 1, run, run
    if dims:
        rows, rds, rss = dims.pop()
        while dims and dims[-1][1] == rows * rds and dims[-1][2] == rows * rss:
            rows *= dims.pop()[0]
    blocks = [(0, 0)]
    for n, ds, ss in dims:  # outer dims that cannot merge: one block per index
        blocks = [(d + i * ds, s + i * ss) for d, s in blocks for i in range(n)]
    return [(d, s, rows, run, rds, rss) for d, s in blocks]


# Blocks that share a strided buffer advance together (see `copy_order`): "lockstep" (one row
# of each in turn, in the C kernel), "tiles" (TILE_BYTES of each in turn) or "off".
INTERLEAVE = {"dst": "lockstep", "src": "tiles"}
TILE_BYTES = 32 << 10
STAGES = 4  # pipeline stages per sync (whole leaves each): bookkeeping overlaps the copy
# A copy thread's unit of work (bytes). Small enough that the threads finish together, large
# enough that taking one (an atomic add) costs nothing next to copying it.
CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class Chunks:
    """Plan.chunks(): chunk c is blocks[bounds[c]:bounds[c + 1]]; stage s is chunks
    stage_chunks[s] .. stage_chunks[s + 1] - 1 (the last bound is the block count)."""

    bounds: np.ndarray  # int64 [C + 1]
    stage_chunks: np.ndarray  # int64 [S + 1]


def copy_order(blocks: list[tuple[int, ...]], keys: list[tuple[str, int]]
               ) -> list[tuple[int, int, int, int]]:
    """The blocks as (block, first row, rows, lockstep) pieces, in copy order.

    A transpose has one strided side per block: FSDP columns -> TP rows writes runs from every
    source into each destination row (key ("dst", buffer)); FSDP rows -> TP columns reads each
    source row into every destination (key ("src", buffer)). Copying one whole block after
    another walks the strided buffer once per block, a fraction of each row per pass;
    interleaving the blocks that share it walks it once, in order. Measured per leaf kind on
    the dev box: destination rows assembled one row of each block at a time ran 8-20% faster;
    sources read in 32 KB tiles of each block slightly faster than whole blocks.
    """
    groups: dict[Any, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    out: list[tuple[int, int, int, int]] = []
    for (side, _), members in groups.items():
        how = INTERLEAVE.get(side, "off") if len(members) > 1 else "off"
        if how == "lockstep":
            out += [(i, 0, blocks[i][2], len(members) if n == 0 else 0)
                    for n, i in enumerate(members)]
        elif how == "tiles":
            step = {i: max(1, TILE_BYTES // blocks[i][3]) for i in members}
            start = dict.fromkeys(members, 0)
            live = members
            while live:
                for i in live:
                    n = min(step[i], blocks[i][2] - start[i])
                    out.append((i, start[i], n, 0))
                    start[i] += n
                live = [i for i in live if start[i] < blocks[i][2]]
        else:
            out += [(i, 0, blocks[i][2], 0) for i in members]
    return out


@dataclass
class _Leaf:
    shape: tuple[int, ...]
    dtype: np.dtype
    sharding: Any  # target
    aval: Any  # the target array's aval (JAX's make_array_from_callback recipe)
    devices: list[Any]  # target devices, in the order JAX builds the array from
    buffers: list[int]  # their buffer numbers in the plan
    src_data: list[int]  # per distinct source box: the addressable_data index that holds it


@dataclass
class Plan:
    """Where every byte goes, for one (shapes, dtypes, layouts, source, target shardings)."""

    leaves: list[_Leaf]
    sizes: list[int]  # bytes of each target buffer
    offsets: list[int]  # each buffer's offset in its set's allocation (ALIGN-aligned)
    shapes: list[tuple[tuple[int, ...], np.dtype]]  # each buffer's shape and dtype
    total: int  # bytes of one buffer set
    # The C kernel's form: one row per block with the destination offset from the set's base
    # and the source offset from its buffer's start; a sync adds the addresses.
    blocks_Nx8: np.ndarray  # int64 [dst_off, src_off, rows, row_bytes, dst_stride,
    #                         src_stride, lockstep, 0] (the C struct)
    block_src: np.ndarray  # int64 source buffer number (over all leaves' distinct boxes)
    stages: list[tuple[int, int, int, int]]  # (leaf lo, leaf hi, block lo, block hi)
    # numpy's form: (buffer, dst slices, source buffer, src slices, dtype to copy as)
    pieces: list[tuple[int, tuple[slice, ...], int, tuple[slice, ...], np.dtype]]
    src_shapes: list[tuple[int, ...]]  # per source buffer
    nbytes: int  # bytes written per sync
    _chunks: Chunks | None = None  # chunks() cache

    @staticmethod
    def build(xs: list[Any], dsts: list[Any]) -> Plan:
        from jax._src import core

        leaves, sizes, shapes, src_shapes, pieces = [], [], [], [], []
        rows_: list[tuple[int, ...]] = []  # (dst_off, src_off, rows, run, dst_st, src_st)
        srcs_: list[int] = []
        bufs_: list[int] = []
        stages, stage_bytes, leaf_lo, block_lo = [], 0, 0, 0
        total_bytes = sum(x.size * np.dtype(x.dtype).itemsize for x in xs)
        for li, (x, sharding) in enumerate(zip(xs, dsts, strict=True)):
            _check_row_major(x)
            shape, dtype = tuple(x.shape), np.dtype(x.dtype)
            item = dtype.itemsize
            src_boxes: dict[Any, int] = {}  # distinct source box -> source buffer number
            src_data = []
            for j, shard in enumerate(x.addressable_shards):
                box = _box(shard.index, shape)
                if box not in src_boxes:
                    src_boxes[box] = len(src_shapes)
                    src_shapes.append(tuple(b - a for a, b in box))
                    src_data.append(j)
            index_map = sharding.addressable_devices_indices_map(shape)
            leaf = _Leaf(shape, dtype, sharding,
                         core.update_aval_with_sharding(core.ShapedArray(shape, dtype),
                                                        sharding),
                         list(index_map), [], src_data)
            # numpy copies as unsigned ints of the same width: bit-exact, and on numpy's fast
            # loops (bfloat16 is an ml_dtypes type, whose element copies take a slow path).
            as_int = np.dtype(f"u{item}") if item in (1, 2, 4, 8) else dtype
            blocks, keys, bufs, srcs = [], [], [], []
            targets = list(index_map.values())
            if sharding.is_fully_replicated:
                # JAX builds a fully replicated array from the first device's buffer alone
                # (every CPU device then shares it), so only that one is filled.
                targets = targets[:1]
            for index in targets:
                dbox = _box(index, shape)
                dshape = tuple(b - a for a, b in dbox)
                buf = len(sizes)
                leaf.buffers.append(buf)
                sizes.append(int(np.prod(dshape)) * item)
                shapes.append((dshape, dtype))
                dstr = _c_strides(dshape, item)
                for sbox, src in src_boxes.items():
                    inter = [(max(a0, b0), min(a1, b1)) for (a0, a1), (b0, b1) in
                             zip(dbox, sbox, strict=True)]
                    if any(lo >= hi for lo, hi in inter):
                        continue
                    sstr = _c_strides(src_shapes[src], item)
                    dsl = tuple(slice(lo - a, hi - a) for (lo, hi), (a, _) in
                                zip(inter, dbox, strict=True))
                    ssl = tuple(slice(lo - a, hi - a) for (lo, hi), (a, _) in
                                zip(inter, sbox, strict=True))
                    pieces.append((buf, dsl, src, ssl, as_int))
                    d0 = sum(s.start * st for s, st in zip(dsl, dstr, strict=True))
                    s0 = sum(s.start * st for s, st in zip(ssl, sstr, strict=True))
                    extent = tuple(hi - lo for lo, hi in inter)
                    for bd, bs, rows, run, dst_st, src_st in box_blocks(extent, dstr, sstr,
                                                                          item):
                        blocks.append((d0 + bd, s0 + bs, rows, run, dst_st, src_st))
                        # The strided side decides which blocks advance together.
                        keys.append(("dst", buf) if dst_st != run and rows > 1 else
                                    ("src", src) if src_st != run and rows > 1 else
                                    ("own", len(keys)))
                        bufs.append(buf)
                        srcs.append(src)
            for i, r0, n, lockstep in copy_order(blocks, keys):
                d, s_, _, run, dst_st, src_st = blocks[i]
                rows_.append((d + r0 * dst_st, s_ + r0 * src_st, n, run, dst_st, src_st,
                              lockstep, 0))
                srcs_.append(srcs[i])
                bufs_.append(bufs[i])
            if sharding.is_fully_replicated:
                leaf.buffers *= len(leaf.devices)
            leaves.append(leaf)
            stage_bytes += x.size * item
            if stage_bytes * STAGES >= total_bytes or li == len(xs) - 1:
                stages.append((leaf_lo, li + 1, block_lo, len(rows_)))
                leaf_lo, block_lo, stage_bytes = li + 1, len(rows_), 0
        offsets, total = [], 0
        for n in sizes:
            offsets.append(total)
            total += -(-max(n, 1) // ALIGN) * ALIGN
        arr = np.array(rows_, np.int64).reshape(-1, 8)
        buf_idx = np.asarray(bufs_, np.int64)
        if len(arr):
            arr[:, 0] += np.asarray(offsets, np.int64)[buf_idx]
        plan = Plan(leaves, sizes, offsets, shapes, total, arr, np.asarray(srcs_, np.int64),
                    stages, pieces, src_shapes, sum(sizes))
        plan._check_bounds(buf_idx)
        return plan

    def chunks(self) -> Chunks:
        """The copy's work units: each stage cut into runs of blocks of about CHUNK_BYTES,
        never inside a lockstep group; copy threads take them in turn (see copy_shared)."""
        if self._chunks is not None:
            return self._chunks
        b = self.blocks_Nx8
        starts = np.zeros(len(b) + 1, bool)  # where a group (or a lone block) starts
        i = 0
        while i < len(b):
            starts[i] = True
            i += max(1, int(b[i, 6]))
        starts[len(b)] = True
        cum = np.concatenate([[0], np.cumsum(b[:, 2] * b[:, 3])]) if len(b) else np.zeros(1)
        bounds, stage_chunks = [], [0]
        for _, _, lo, hi in self.stages:
            j = lo
            while j < hi:
                bounds.append(j)
                # The furthest group start within budget; one group alone may exceed it.
                k = min(hi, int(np.searchsorted(cum, cum[j] + CHUNK_BYTES, "right")) - 1)
                while k > j and not starts[k]:
                    k -= 1
                if k <= j:
                    k = j + 1
                    while k < hi and not starts[k]:
                        k += 1
                j = k
            stage_chunks.append(len(bounds))
        bounds.append(len(b))
        self._chunks = Chunks(np.asarray(bounds, np.int64), np.asarray(stage_chunks, np.int64))
        return self._chunks

    def _check_bounds(self, buf_idx: np.ndarray) -> None:
        """Every block lies inside its target and source buffers (the C kernel trusts them)."""
        if not len(self.blocks_Nx8):
            return
        b = self.blocks_Nx8
        span_d = (b[:, 2] - 1) * b[:, 4] + b[:, 3]  # bytes from a block's first byte to its last
        span_s = (b[:, 2] - 1) * b[:, 5] + b[:, 3]
        lo = np.asarray(self.offsets, np.int64)[buf_idx]
        hi = lo + np.asarray(self.sizes, np.int64)[buf_idx]
        item = np.array([self.shapes[i][1].itemsize for i in buf_idx], np.int64)
        src_hi = np.array([int(np.prod(s)) for s in self.src_shapes], np.int64)[
            self.block_src] * item
        ok = ((b[:, 2] > 0) & (b[:, 3] > 0) & (b[:, 4] >= 0) & (b[:, 5] >= 0)
              & (b[:, 0] >= lo) & (b[:, 0] + span_d <= hi)
              & (b[:, 1] >= 0) & (b[:, 1] + span_s <= src_hi))
        if not ok.all():
            raise AssertionError(f"host_copy plan: block {int(np.argmin(ok))} out of bounds")


def _check_row_major(x: Any) -> None:
    """The plan reads source shards as dense row-major buffers; refuse anything else."""
    layout = getattr(x.format, "layout", None)
    if layout is not None and (tuple(layout.major_to_minor) != tuple(range(x.ndim))
                               or tuple(layout.tiling)):
        raise ValueError(f"host_copy: a source leaf of shape {tuple(x.shape)} has layout "
                         f"{layout}, not dense row-major (fix: reshard.method=device_put)")


def _layout_key(x: Any) -> Any:
    """Cheap identity of a leaf's memory layout, for the plan cache (0.6 us vs 4 us)."""
    try:
        return x._pjrt_layout
    except Exception:  # other JAX versions
        return x.format.layout


# ---------------------------------------------------------------------------------------------
# Recycled target buffers


class _BufferSet:
    """One aligned allocation carved into a plan's target buffers (numpy views, made once)."""

    def __init__(self, plan: Plan):
        raw = np.empty(plan.total + ALIGN, np.uint8)
        base = (-raw.ctypes.data) % ALIGN
        self.raw = raw
        self.address = raw.ctypes.data + base
        self.views = [raw[base + off:base + off + n].view(dt).reshape(shape)
                      for off, n, (shape, dt) in zip(plan.offsets, plan.sizes, plan.shapes,
                                                     strict=True)]
        self.addresses = [self.address + off for off in plan.offsets]
        self.leaf_views = [[self.views[i] for i in leaf.buffers] for leaf in plan.leaves]
        # The C kernel's blocks with this set's destination addresses; a sync fills in the
        # source addresses (in place: no allocation per sync).
        self.blocks = plan.blocks_Nx8.copy()
        self.blocks[:, 0] += self.address
        self.adopted: bool | None = None  # whether JAX's arrays alias these buffers
        # Each view's reference count when nothing outside this object holds it (counted the
        # way in_use counts: from inside a comprehension over the views).
        self._idle_refs = [sys.getrefcount(v) for v in self.views]

    def in_use(self) -> bool:
        """Whether anything outside this set still references one of its buffers.

        JAX's CPU client holds a reference to each numpy buffer it adopted until the device
        buffer is freed, i.e. until no array and no pending computation uses it.
        """
        refs = [sys.getrefcount(v) for v in self.views]
        return any(r > n for r, n in zip(refs, self._idle_refs, strict=True))


try:  # JAX's make_array_from_callback recipe, minus its per-shard checks and callbacks.
    from jax._src.interpreters.pxla import batched_device_put as _batched_device_put
except ImportError:  # pragma: no cover - other JAX versions
    _batched_device_put = None


def _adopt(leaf: _Leaf, bufs: list[np.ndarray]) -> Any:
    """An array with the leaf's target sharding whose shards are `bufs` (zero-copy on CPU)."""
    if _batched_device_put is not None:
        return _batched_device_put(leaf.aval, leaf.sharding, bufs, leaf.devices)
    by_device = dict(zip(leaf.devices, bufs, strict=True))
    arrays = [jax.device_put(by_device[d], d) for d in leaf.devices]
    return jax.make_array_from_single_device_arrays(leaf.shape, leaf.sharding, arrays)


class HostCopier:
    """Runs host_copy transfers; keeps the plans and the target buffers between syncs.

    Args:
      threads: copy threads. With the C kernel and threads >= 1, the calling thread reads the
        next leaves' source addresses and wraps the finished buffers into arrays while the
        copy threads copy (ctypes releases the GIL), then copies beside them (threads + 1 copy
        in all); 0 does everything on the calling thread.
      keep: buffer sets kept per plan for reuse; a sync that finds all of them in use
        allocates a fresh set. 2 covers a sampler that holds the previous weights while the
        next ones are made; at rest, one set's memory is held idle.
      native: use the C kernel (None: when it builds; False: numpy copies).
    """

    def __init__(self, threads: int = 1, keep: int = 2, native: bool | None = None):
        self.threads = max(0, threads)
        self.keep = keep
        self.native = native
        self._plans: dict[Any, Plan] = {}
        self._sets: dict[int, list[_BufferSet]] = {}
        self._executor: ThreadPoolExecutor | None = None
        self.last: dict[str, Any] = {}  # what the last run did (kernel, buffers reused)
        self._lock = threading.Lock()  # one run at a time: runs share plans and buffers

    def plan(self, xs: list[Any], dsts: list[Any]) -> Plan:
        key = tuple((tuple(x.shape), x.dtype, _layout_key(x), x.sharding, d)
                    for x, d in zip(xs, dsts, strict=True))
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = Plan.build(xs, dsts)
        return plan

    def _buffers(self, plan: Plan) -> tuple[_BufferSet, bool]:
        sets = self._sets.setdefault(id(plan), [])
        for s in sets:
            if not s.in_use():
                return s, True
        s = _BufferSet(plan)
        sets.append(s)
        if len(sets) > self.keep:
            sets.pop(0)  # all are in use: forget the oldest; its memory goes with its arrays
        return s, False

    def run(self, xs: list[Any], dsts: list[Any]) -> list[Any]:
        """Copies each leaf into its target layout; returns arrays with the target shardings."""
        with self._lock:
            return self._run(xs, dsts)

    def _run(self, xs: list[Any], dsts: list[Any]) -> list[Any]:
        kernel = native_kernel() if self.native is not False else None
        if self.native and kernel is None:
            raise RuntimeError(f"host_copy native=True, but {native_status()}")
        plan = self.plan(xs, dsts)
        # HOST SYNC: the sources must be computed before their bytes are read.
        jax.block_until_ready(xs)
        bufset, reused = self._buffers(plan)
        streaming = kernel is not None and plan.nbytes >= STREAM_MIN_BYTES
        self.last = {"kernel": "native" if kernel is not None else "numpy", "reused": reused,
                     "streaming": streaming}
        if kernel is None:
            self._run_numpy(plan, xs, bufset)
            return self._wrap(plan, bufset)
        # Once JAX has been seen to adopt this set's buffers (same address), the arrays are
        # made while the copy threads still fill them: JAX does not read them to adopt them.
        overlap = self.threads > 0 and bufset.adopted is True
        ptrs = np.empty(len(plan.src_shapes), np.int64)
        chunks = plan.chunks()
        ready = np.zeros(len(plan.stages), np.int64)
        taken = np.zeros(len(plan.stages), np.int64)  # per stage: chunks handed out so far
        # The copy threads wait for each stage's go-ahead inside one native call each, so they
        # never need the GIL between stages; this thread joins them once its bookkeeping is
        # done, and takes its share of what is left.
        pending = [self._pool().submit(kernel.copy_shared, bufset.blocks, chunks, ready, taken,
                                       streaming)
                   for _ in range(self.threads)]
        published, k, out = 0, 0, None
        try:
            for s, (leaf_lo, leaf_hi, lo, hi) in enumerate(plan.stages):
                # Read this stage's source addresses while the previous stage is copied.
                for x, leaf in zip(xs[leaf_lo:leaf_hi], plan.leaves[leaf_lo:leaf_hi],
                                   strict=True):
                    for j in leaf.src_data:
                        ptrs[k] = x.addressable_data(j).unsafe_buffer_pointer()
                        k += 1
                b = bufset.blocks[lo:hi]
                np.add(plan.blocks_Nx8[lo:hi, 1], ptrs[plan.block_src[lo:hi]], out=b[:, 1])
                kernel.publish(ready, s, 1)
                published += 1
            out = self._wrap(plan, bufset) if overlap else None
            kernel.copy_shared(bufset.blocks, chunks, ready, taken, streaming)
        finally:
            if published < len(plan.stages):
                kernel.publish(ready, published, -1)  # cancel: the threads stop there
            for f in pending:
                f.result()
        if out is None:
            out = self._wrap(plan, bufset)
            if bufset.adopted is None:  # first use of this set: did JAX adopt or copy?
                bufset.adopted = _aliases(out, plan, bufset)
        self.last["overlapped"] = overlap
        return out

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="host_copy")
        return self._executor

    def _run_numpy(self, plan: Plan, xs: list[Any], bufset: _BufferSet) -> None:
        views = [np.asarray(x.addressable_data(j)) for x, leaf in  # zero-copy on CPU
                 zip(xs, plan.leaves, strict=True) for j in leaf.src_data]
        out = bufset.views
        for buf, dsl, src, ssl, as_int in plan.pieces:
            out[buf].view(as_int)[dsl] = views[src].view(as_int)[ssl]

    @staticmethod
    def _wrap(plan: Plan, bufset: _BufferSet) -> list[Any]:
        """The filled buffers as arrays with the target shardings, without copying them."""
        return [_adopt(leaf, views) for leaf, views in zip(plan.leaves, bufset.leaf_views,
                                                            strict=True)]


def _aliases(out: list[Any], plan: Plan, bufset: _BufferSet) -> bool:
    """Whether every shard of `out` is the plan's buffer for it (same address)."""
    for y, leaf in zip(out, plan.leaves, strict=True):
        for shard, i in zip(y._arrays if hasattr(y, "_arrays") else
                            [s.data for s in y.addressable_shards], leaf.buffers, strict=True):
            if shard.unsafe_buffer_pointer() != bufset.addresses[i]:
                return False
    return True
