"""Sampler throughput: the JAX KV-cache sampler against a naive no-cache sampler, same weights.

    python -m bench.sampler                      # batch 16, 128 new tokens, Qwen2-style model
    python -m bench.sampler --batch 32 --new-tokens 64 --repeats 5

Model: Qwen2 layout (GQA, q/k/v biases, tied embeddings), hidden 256, 4 layers, 4 query / 2 kv
heads, MLP 688, vocab 1024, float32, random weights. Prompts: random ids, lengths drawn from
[prompt_len / 2, prompt_len], left-padded. No stop tokens, so every row generates exactly
--new-tokens tokens and tokens/s = batch * new_tokens / seconds.

Rows:
- jax sampler (1 device): `JaxSampler` on a one-device sampler mesh.
- jax sampler, top-k 50 + top-p 0.9: the same, with truncated sampling (sorting per step).
- jax sampler (tp=4 simulated): on the default sampler sub-mesh, 4 simulated CPU devices with
  tensor-parallel heads / MLP / vocab. On one CPU the "devices" share the same cores, so this
  measures the cost of the partitioned program and its collectives, not a speed-up.
- naive (1 device): the same weights and sampling, jitted, but every new token runs a full
  forward over the whole [P + T] sequence (no KV cache), inside one compiled loop.
- hf generate (torch CPU): the same weights written with `trainer.hf.save_hf_model` and loaded
  by `transformers.AutoModelForCausalLM.from_pretrained` (float32, default attention), the same
  left-padded prompts with their attention mask, `generate(do_sample=True, temperature=1,
  top_k=0, top_p=1, min_new_tokens=max_new_tokens=T)`: pure sampling like the first row, and EOS
  suppressed so every row runs T steps. torch keeps its default thread count (printed).
  "compile s" for it is the first call minus a steady call (warm-up, no compilation).

"compile s" is the first call minus a steady-state call (tracing + XLA compilation);
"steady s" is the median of --repeats calls after it. "ms/step" = steady / new tokens.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from controller.config import JobConfig, ModelConfig, SamplingConfig  # noqa: E402
from controller.topology import SubMesh, build_meshes  # noqa: E402
from sampler.jax_sampler import JaxSampler  # noqa: E402
from sampler.sampling import sample_tokens  # noqa: E402
from trainer.model import (  # noqa: E402
    ModelDef,
    ModelSpec,
    apply_model,
    causal_mask,
    define_model,
    init_params,
    param_count,
    positions_from_mask,
)

PAD_ID = 0


@dataclass
class Row:
    name: str
    compile_s: float
    steady_s: float
    tokens: int  # tokens generated per call (batch x new tokens)
    steps: int  # new tokens per row: decode steps per call

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.steady_s


def qwen2_style_model() -> tuple[ModelDef, dict]:
    cfg = ModelConfig(vocab_size=1024, hidden_size=256, num_layers=4, num_heads=4,
                      num_kv_heads=2, mlp_dim=688, qkv_bias=True, tie_embeddings=True)
    spec = ModelSpec.from_config(cfg, 1024)
    return define_model(spec), init_params(spec, seed=0)


def make_prompts(batch: int, prompt_len: int, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(prompt_len // 2, prompt_len + 1, size=batch)
    tokens = np.full((batch, prompt_len), PAD_ID, np.int32)
    mask = np.zeros((batch, prompt_len), bool)
    for i, n in enumerate(lengths):
        tokens[i, prompt_len - n:] = rng.integers(2, vocab, size=n)
        mask[i, prompt_len - n:] = True
    return tokens, mask


def one_device_mesh() -> SubMesh:
    from jax.sharding import Mesh

    rules = dict(JobConfig().topology.sampler_rules)
    return SubMesh("sampler", Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("dp", "tp")),
                   rules)


def time_calls(fn, repeats: int) -> tuple[float, float]:
    """(compile seconds, steady seconds): first call minus the median of the next ones."""
    start = time.perf_counter()
    jax.block_until_ready(fn(0))  # HOST SYNC: wait for the first call, compile included
    first = time.perf_counter() - start
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(i + 1))
        times.append(time.perf_counter() - start)
    steady = statistics.median(times)
    return max(first - steady, 0.0), steady


def bench_jax(name, mdef, params, submesh, cfg, tokens, mask, repeats) -> Row:
    sampler = JaxSampler(mdef, submesh, cfg, pad_id=PAD_ID, stop_ids=())
    sampler.load_weights(jax.device_put(params, sampler.shardings))

    def call(i):
        out = sampler.generate(tokens, mask, jax.random.key(i))
        return out.tokens_BxT

    compile_s, steady_s = time_calls(call, repeats)
    n = int(np.asarray(sampler.generate(tokens, mask, jax.random.key(0)).mask_BxT).sum())
    assert n == tokens.shape[0] * cfg.max_new_tokens, n  # no early stop: fixed work
    assert sampler.metrics()["sampler/compiles"] == 1  # new keys never recompiled
    return Row(name, compile_s, steady_s, n, cfg.max_new_tokens)


def profile_jax(mdef, params, submesh, cfg, tokens, mask) -> None:
    """Prints what XLA made of the sampler program (jax.stages): cost analysis and copies.

    XLA's cost analysis counts a while-loop body once, so the numbers are prefill + one decode
    step, not the whole generation. Copies of cache-sized arrays inside the loop are per-step
    layout changes (the attention einsum wants the cache as [B, K, Dh, S]).
    """
    import re

    sampler = JaxSampler(mdef, submesh, cfg, pad_id=PAD_ID, stop_ids=())
    sampler.load_weights(jax.device_put(params, sampler.shardings))
    cache = sampler._take_cache(tokens.shape[0], tokens.shape[1] + cfg.max_new_tokens - 1)
    start = time.perf_counter()
    lowered = sampler._generate.lower(sampler.params, tokens, mask, jax.random.key(0), cache)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis() or {}
    hlo = compiled.as_text()
    s = tokens.shape[1] + cfg.max_new_tokens - 1
    cache_copies = sum(bool(re.search(rf"[\[,]{s}[\],]", line.split(" copy(")[0]))
                       for line in hlo.splitlines() if " copy(" in line)
    print(f"profile (jax.stages): trace+lower {lower_s:.2f}s, XLA compile {compile_s:.2f}s, "
          f"prefill + 1 decode step: {cost.get('flops', 0) / 1e9:.2f} GFLOP, "
          f"{cost.get('bytes accessed', 0) / 1e6:.0f} MB accessed; "
          f"{cache_copies} copies of cache-length arrays in the program")


def naive_generate(mdef: ModelDef, cfg: SamplingConfig):
    """No KV cache: every step runs the model over the whole [B, P + T] buffer."""
    n_new = cfg.max_new_tokens

    @jax.jit
    def generate(params, prompt_BxP, pmask_BxP, rng):
        b, p = prompt_BxP.shape
        tokens_BxL = jnp.concatenate(
            [prompt_BxP, jnp.full((b, n_new), PAD_ID, jnp.int32)], axis=1)
        valid_BxL = jnp.concatenate([pmask_BxP, jnp.zeros((b, n_new), bool)], axis=1)
        length = p + n_new

        def step(t, carry):
            tokens_BxL, valid_BxL, logps_BxT = carry
            logits_BxLxV, _ = apply_model(mdef, params, tokens_BxL, positions_from_mask(valid_BxL),
                                          causal_mask(valid_BxL, 0, length))
            last_BxV = jax.lax.dynamic_index_in_dim(logits_BxLxV, p + t - 1, 1, keepdims=False)
            tok_B, lp_B, _ = sample_tokens(last_BxV, jax.random.fold_in(rng, t), cfg.temperature,
                                           cfg.top_k, cfg.top_p)
            tokens_BxL = jax.lax.dynamic_update_slice_in_dim(tokens_BxL, tok_B[:, None], p + t, 1)
            valid_BxL = jax.lax.dynamic_update_slice_in_dim(
                valid_BxL, jnp.ones((b, 1), bool), p + t, 1)
            logps_BxT = jax.lax.dynamic_update_slice_in_dim(logps_BxT, lp_B[:, None], t, 1)
            return tokens_BxL, valid_BxL, logps_BxT

        init = (tokens_BxL, valid_BxL, jnp.zeros((b, n_new), jnp.float32))
        tokens_BxL, _, logps_BxT = jax.lax.fori_loop(0, n_new, step, init)
        return tokens_BxL[:, p:], logps_BxT

    return generate


def bench_naive(name, mdef, params, cfg, tokens, mask, repeats) -> Row:
    gen = naive_generate(mdef, cfg)
    dev = jax.devices()[0]
    params = jax.device_put(params, dev)
    tokens, mask = jax.device_put(tokens, dev), jax.device_put(mask, dev)
    compile_s, steady_s = time_calls(lambda i: gen(params, tokens, mask, jax.random.key(i))[0],
                                     repeats)
    return Row(name, compile_s, steady_s, tokens.shape[0] * cfg.max_new_tokens,
               cfg.max_new_tokens)


def _torch_threads(skip: bool) -> str:
    if skip:
        return ""
    import torch

    return f" | torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}"


def bench_hf(name, mdef, params, tokens, mask, cfg, repeats) -> Row:
    """transformers `generate` on the same weights (exported to a HF directory), torch CPU."""
    import tempfile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.hf import save_hf_model

    n_new = cfg.max_new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        path = save_hf_model(f"{tmp}/model", mdef.spec, params)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.from_numpy(tokens.astype(np.int64))
    attn = torch.from_numpy(mask.astype(np.int64))
    eos = PAD_ID + 1  # an EOS for min_new_tokens to suppress; the JAX rows have no stop ids

    def call(i):
        torch.manual_seed(i)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=attn, do_sample=True,
                                 temperature=cfg.temperature, top_k=0, top_p=1.0,
                                 max_new_tokens=n_new, min_new_tokens=n_new,
                                 eos_token_id=eos, pad_token_id=PAD_ID)
        assert out.shape == (ids.shape[0], ids.shape[1] + n_new), out.shape  # fixed work
        # torch is eager: generate has returned when the tokens exist.

    compile_s, steady_s = time_calls(call, repeats)
    return Row(f"{name}, {torch.get_num_threads()} threads", compile_s, steady_s,
               tokens.shape[0] * n_new, n_new)


def main(argv: list[str] | None = None) -> list[Row]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-tp", action="store_true", help="skip the simulated tp=4 row")
    ap.add_argument("--skip-naive", action="store_true", help="skip the no-cache baseline")
    ap.add_argument("--skip-hf", action="store_true",
                    help="skip the Hugging Face generate baseline (needs torch + transformers)")
    ap.add_argument("--profile", action="store_true",
                    help="also print XLA cost analysis and copy counts of the sampler program")
    args = ap.parse_args(argv)

    mdef, params = qwen2_style_model()
    tokens, mask = make_prompts(args.batch, args.prompt_len, mdef.spec.vocab_size)
    base = SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0)
    trunc = base.model_copy(update={"top_k": 50, "top_p": 0.9})
    one = one_device_mesh()
    print(f"model: Qwen2-style, {param_count(params):,} params, hidden 256, 4 layers, 4/2 heads, "
          f"MLP 688, vocab 1024 | batch {args.batch}, prompts <= {args.prompt_len} tokens "
          f"(left-padded), {args.new_tokens} new tokens | {jax.devices()[0].device_kind}, "
          f"{os.cpu_count()} CPU cores{_torch_threads(args.skip_hf)}")

    if args.profile:
        profile_jax(mdef, params, one, base, tokens, mask)
    rows = [bench_jax("jax sampler (1 device)", mdef, params, one, base, tokens, mask,
                      args.repeats),
            bench_jax("jax sampler, top-k 50 + top-p 0.9", mdef, params, one, trunc, tokens,
                      mask, args.repeats)]
    if not args.skip_tp:
        sampler_mesh = build_meshes(JobConfig().topology).sampler
        rows.append(bench_jax("jax sampler (tp=4 simulated)", mdef, params, sampler_mesh, base,
                              tokens, mask, args.repeats))
    if not args.skip_hf:
        rows.append(bench_hf("hf generate (torch CPU)", mdef, params, tokens, mask, base,
                             args.repeats))
    if not args.skip_naive:
        rows.append(bench_naive("naive: full forward per token, no cache", mdef, params, base,
                                tokens, mask, args.repeats))
    print_table(rows)
    return rows


def print_table(rows: list[Row]) -> None:
    ref = rows[0]
    print()
    print(f"| {'sampler':<42} | compile s | steady s | ms/step | tokens/s | vs jax (1 device) |")
    print(f"|{'-' * 44}|----------:|---------:|--------:|---------:|------------------:|")
    for r in rows:
        ms_step = 1000 * r.steady_s / r.steps
        print(f"| {r.name:<42} | {r.compile_s:9.2f} | {r.steady_s:8.3f} | {ms_step:7.2f} | "
              f"{r.tokens_per_s:8.0f} | {r.tokens_per_s / ref.tokens_per_s:16.2f}x |")
    hf = [r for r in rows if r.name.startswith("hf generate")]
    if hf:
        print(f"\nJAX sampler (1 device) vs Hugging Face generate: "
              f"{ref.tokens_per_s / hf[0].tokens_per_s:.2f}x tokens/s (target >= 2x)")
    naive = [r for r in rows if r.name.startswith("naive")]
    if naive:
        print(f"\nKV-cache sampler vs naive no-cache sampler: "
              f"{ref.tokens_per_s / naive[0].tokens_per_s:.1f}x tokens/s")


if __name__ == "__main__":
    main()
