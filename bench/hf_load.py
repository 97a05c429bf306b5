"""Loading a HF checkpoint into the trainer sharding: per-device slices vs whole tensors.

    python bench/hf_load.py [--layers 8] [--hidden 512] [--vocab 32000] [--dtype bfloat16]

Writes a random Qwen2-shaped checkpoint (bf16 on disk, as on the Hub) with `save_hf_model`, then
loads it onto the 4-device FSDP trainer mesh of the default topology (8 simulated CPU devices)
two ways, in the same run:

- baseline: every tensor read whole into host memory, laid out, cast, then `jax.device_put`
  to its sharding (what a naive loader does);
- tandem: `load_hf_params`, where each device's callback reads only its slice of the
  memory-mapped file.

Prints load seconds (best of --repeats), bytes placed, and the ratio. CPU timings on a shared
machine are noisy; compare the two rows of one run, not runs with each other.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from controller.config import JobConfig
from controller.topology import build_meshes
from trainer.hf import (
    _read_safetensors,
    checkpoint_files,
    load_hf_params,
    param_map,
    save_hf_model,
)
from trainer.model import ModelSpec, define_model, init_params, param_shardings


def _set(tree: dict, path: tuple, value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def baseline_load(path: Path, mdef, shardings):
    """Whole tensors on the host, then device_put: the reference a sliced loader must beat."""
    dtype = np.dtype(mdef.spec.dtype)
    tensors = {}
    for f in checkpoint_files(path):
        tensors |= _read_safetensors(f)
    out: dict = {}
    for e in param_map(mdef.spec):
        host = np.array(e.to_tandem(np.array(tensors[e.hf_name]))).astype(dtype)
        sh = shardings
        for p in e.path:
            sh = sh[p]
        _set(out, e.path, jax.device_put(host, sh))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()

    meshes = build_meshes(JobConfig().topology)
    spec = ModelSpec(vocab_size=a.vocab, hidden_size=a.hidden, num_layers=a.layers,
                     num_heads=8, num_kv_heads=2, head_dim=a.hidden // 8, mlp_dim=4 * a.hidden,
                     rope_theta=1e6, norm_eps=1e-6, tie_embeddings=False, qkv_bias=True,
                     dtype=jnp.bfloat16, hf_model_type="qwen2")
    with tempfile.TemporaryDirectory() as tmp:
        path = save_hf_model(Path(tmp) / "ckpt", spec, init_params(spec, 0),
                             max_shard_bytes=64 * 1024**2)
        files = list(path.glob("*.safetensors"))
        disk = sum(f.stat().st_size for f in files)
        load_spec = ModelSpec(**{**spec.__dict__, "dtype": jnp.dtype(a.dtype)})
        mdef = define_model(load_spec)
        shardings = param_shardings(mdef, meshes.trainer)
        rows = []
        for name, fn in (("baseline (whole tensors + device_put)", baseline_load),
                         ("tandem load_hf_params (per-device slices)", load_hf_params)):
            best = float("inf")
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                params = fn(path, mdef, shardings=shardings) if fn is load_hf_params else fn(
                    path, mdef, shardings)
                jax.block_until_ready(params)  # HOST SYNC: time the placement to completion
                best = min(best, time.perf_counter() - t0)
            placed = sum(x.nbytes for x in jax.tree.leaves(params))
            rows.append((name, best, placed))
            del params
    print(f"checkpoint: {disk / 1e6:.1f} MB bf16 on disk in {len(files)} shards; loaded as "
          f"{a.dtype} onto {meshes.trainer.size} trainer devices (fsdp)")
    print(f"{'loader':<44}{'best s':>9}{'GB placed':>11}{'GB/s':>8}")
    for name, s, b in rows:
        print(f"{name:<44}{s:>9.3f}{b / 1e9:>11.3f}{b / 1e9 / s:>8.2f}")
    print(f"ratio baseline/tandem: {rows[0][1] / rows[1][1]:.2f}x")


if __name__ == "__main__":
    main()
