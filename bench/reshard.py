"""Weight-sync bandwidth on 8 simulated CPU devices, against a plain host memcpy.

    python bench/reshard.py [--reps 5] [--params 100e6]

Moves a ~100M-parameter Llama-style model from a 4-device FSDP layout (devices 0-3) to a
4-device tensor-parallel layout (devices 4-7), the trainer -> sampler split of the default job,
in fp32 and in bf16, and in the same run times `np.copy` of the same number of bytes. Every
repetition moves *fresh* source arrays (as after each training step): JAX caches a host copy on
an array the first time a naive device_put gathers it, so re-sending one array flatters it.

Methods: `naive` is one `jax.device_put(tree, target_shardings)` (what Tandem did first);
`host_copy` is `Resharder(method="auto")` on CPU; `staged` is `Resharder(method="device_put")`,
the TPU/GPU path (relayout on the source devices, then whole-shard copies), shown for reference.
Timings on a shared machine are noisy: the table reports the median of --reps runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from controller.topology import simulation_env

os.environ.update(simulation_env(8))

import jax
import jax.numpy as jnp
import numpy as np

from controller.config import JobConfig, ModelConfig
from controller.topology import build_meshes
from reshard.transfer import Resharder, tree_bytes
from trainer.model import ModelSpec, define_model


def model_config(target_params: float) -> ModelConfig:
    """A Llama-style shape of about `target_params` parameters (d=768, 12 heads, 4 kv heads)."""
    per_layer = 768 * 768 * 2 + 768 * 256 * 2 + 3 * 768 * 3072 + 2 * 768
    layers = max(1, round((target_params - 32000 * 768) / per_layer))
    return ModelConfig(hidden_size=768, num_layers=layers, num_heads=12, num_kv_heads=4,
                       mlp_dim=3072, vocab_size=32000, tie_embeddings=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--params", type=float, default=100e6)
    ap.add_argument("--naive", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the naive device_put (slow)")
    args = ap.parse_args()

    cfg = model_config(args.params)
    mdef = define_model(ModelSpec.from_config(cfg, cfg.vocab_size))
    meshes = build_meshes(JobConfig().topology)
    shapes = mdef.shapes()

    def shardings(sub, dtype):
        return jax.tree.map(lambda ax, s: sub.sharding(ax, s.shape), mdef.logical_axes, shapes,
                            is_leaf=lambda x: isinstance(x, tuple))

    src_sh, dst_sh = shardings(meshes.trainer, None), shardings(meshes.sampler, None)
    n_params = sum(s.size for s in jax.tree.leaves(shapes))

    @jax.jit
    def fresh(tree, k):
        # New arrays every rep (the trainer's params after an update), made on the trainer.
        return jax.tree.map(lambda x: x + k.astype(x.dtype), tree)

    def make(dtype):
        return jax.jit(lambda: jax.tree.map(lambda s: jnp.ones(s.shape, dtype), shapes),
                       out_shardings=src_sh)()

    print(f"model: {n_params / 1e6:.1f}M params, {len(jax.tree.leaves(shapes))} leaves, "
          f"{cfg.num_layers} layers d={cfg.hidden_size} | trainer {meshes.describe()}")
    print(f"host: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} (shared machine)")
    rows = []
    for dtype in ("float32", "bfloat16"):
        base = make(dtype)
        nbytes = tree_bytes(base)
        host = np.ones(nbytes // 4, np.float32)
        methods = {"host_copy": Resharder(), "staged": Resharder(method="device_put")}
        if args.naive:
            methods["naive"] = None
        times: dict[str, list[float]] = {"memcpy": [], **{m: [] for m in methods}}
        for rep in range(args.reps + 1):  # rep 0 warms up (compiles, first-touch of pools)
            t0 = time.perf_counter()
            copy = np.copy(host)  # fresh destination, as every transfer allocates its output
            t_copy = time.perf_counter() - t0
            del copy
            if rep:
                times["memcpy"].append(t_copy)
            for name, r in methods.items():
                src = fresh(base, jnp.float32(rep))
                jax.block_until_ready(src)
                t0 = time.perf_counter()
                if r is None:
                    out = jax.device_put(src, dst_sh)
                    jax.block_until_ready(out)
                else:
                    out, _ = r.transfer(src, dst_sh)
                dt = time.perf_counter() - t0
                if rep:
                    times[name].append(dt)
                if rep == 1:  # check once per method: placement and values
                    for a, b, want in zip(jax.tree.leaves(src), jax.tree.leaves(out),
                                          jax.tree.leaves(dst_sh), strict=True):
                        assert b.sharding == want and b.dtype == a.dtype
                    np.testing.assert_array_equal(np.asarray(out["embed"]),
                                                  np.asarray(src["embed"]))
                del out, src
        mem = statistics.median(times["memcpy"])
        for name in ["memcpy", *methods]:
            t = statistics.median(times[name])
            rows.append((dtype, name, nbytes, t, nbytes / t / 1e9, mem / t))
    print()
    print("| dtype | method | MB | median s | GB/s | x memcpy |")
    print("|---|---|---:|---:|---:|---:|")
    for dtype, name, nbytes, t, gbps, ratio in rows:
        print(f"| {dtype} | {name} | {nbytes / 1e6:.0f} | {t:.3f} | {gbps:.2f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
