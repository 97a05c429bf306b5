"""The matmul peak for bench/grpo_step.py's utilisation line: a jitted fp32 matmul on JAX's
default CPU device (which uses every core), best time of several runs, as GFLOP/s (2 n^3 / t).

Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp


def main(n: int = 2048, repeats: int = 10) -> None:
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.float32)
    b = jax.random.normal(kb, (n, n), jnp.float32)
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()  # compile
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    print(json.dumps({"n": n, "repeats": repeats, "seconds": best,
                      "gflops": 2 * n**3 / best / 1e9, "device": str(jax.devices()[0]),
                      "cpus": os.cpu_count(), "jax": jax.__version__}))


if __name__ == "__main__":
    main()
