"""XLA:CPU heap settings for the trainer's programs.

XLA:CPU puts all of a program's temporaries in one block per device and call. glibc serves a
block over its mmap threshold with a fresh mmap and unmaps it on free, so a program with a
large block of temporaries faults all of it in again on every call. Split into heaps of at most
`CPU_HEAP_LIMIT_BYTES`, the temporaries come as blocks glibc keeps and hands out again (its
mmap threshold rises to the largest block freed, up to 32 MB). The heaps only move buffers:
every value the program computes is the same.
"""

from __future__ import annotations

import warnings
from typing import Any

# The largest heap of temporaries a trainer program gets on CPU. It trades page faults for
# cacheability: a smaller heap is reused by malloc instead of mapped and faulted in on every
# call, but XLA cannot write a program with several heaps to the persistent compile cache.
# 16 MB is below glibc's 32 MB ceiling, so every heap is reusable, and above the temporaries of
# a small model's update, which therefore keeps one heap and stays cached; only a large
# monolithic update is split. The layered update (trainer/layered.py) does not split its
# per-block programs: past a heap's size, heaps stop buffers from sharing memory.
CPU_HEAP_LIMIT_BYTES = 16 << 20


def cpu_heap_options(submesh: Any) -> dict[str, Any]:
    """XLA compiler options for the trainer's programs on `submesh` (CPU only; see above)."""
    from jax.sharding import Mesh

    mesh = submesh.mesh  # an AbstractMesh (`tandem plan`) has no devices and compiles nothing
    if not isinstance(mesh, Mesh) or mesh.devices.flat[0].platform != "cpu":
        return {}
    return {"xla_multiheap_size_constraint_per_heap": CPU_HEAP_LIMIT_BYTES}


def ignore_cache_write_warnings() -> None:
    """Silences JAX's warning for each program that cannot be written to the persistent
    compile cache because it has several heaps: the user cannot act on it."""
    warnings.filterwarnings(
        "ignore", message=r"Error writing persistent compilation cache entry .*"
        r"Multiple temp buffer allocations found", category=UserWarning)
