"""Multi-turn rollout throughput: continuing each row's KV cache across turns vs re-prefilling
its history every turn, against a single-turn rollout of the same total length.

    python -m bench.multiturn                          # the default job's model, 128 rows
    python -m bench.multiturn --hidden 256 --layers 4 --repeats 5

Rows: B = 128 prompts of the `reverse_digits` task (16 prompts x G = 8, the default job's
batch) on the default sampler sub-mesh (4 simulated CPU devices, tp=4), the built-in model
shape (or --hidden/--layers), random weights, temperature 1. The environment (`Chatter`,
below) answers every model turn with a fixed observation of --obs-tokens digits until
--turns model turns; a model turn ends on '.' or '?' (the random model draws one about every
8 tokens) or at --turn-tokens. So every row is prompt + [turn, observation] x turns, as in
`env.name=reverse_digits_check` once trained (3.8 turns per row), with no tool process in the
way: what is measured is the sampler's side and the controller's turn loop.

- multi-turn, history=cache / history=reprefill: `MultiTurn.run` (controller/rollout.py) over
  the same rows with the same keys (so the same tokens); the time includes the host's work
  between turns (decoding, the environment, rendering observations).
- single-turn: `JaxSampler.generate` with no stop token and max_new_tokens = the multi-turn
  rows' mean length (model + observation tokens), so each row is as long as a multi-turn row
  and every token is the model's.

"model tok/s" counts the tokens the model drew; "all tok/s" adds the observation tokens (which
the multi-turn rollout prefills rather than draws). Times are the median of --repeats calls
after two warm-up calls (which compile).
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from rewards.environments import Environment  # noqa: E402


class Chatter(Environment):
    """Answers every model turn with the same digits and '=', never done: rows run to
    env.max_turns (or out of tokens)."""

    alphabet = "?-!"
    stop_strings = ("?",)
    observation = "0123456789"

    def __init__(self, obs_tokens: int = 8):
        self.text = (self.observation * 8)[: obs_tokens - 1] + "="

    def step(self, assistant_text):
        return [{"role": "user", "content": self.text}], False, {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--turn-tokens", type=int, default=16)
    ap.add_argument("--obs-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    from controller.config import load_config
    from controller.data import build_dataset, build_tokenizer
    from controller.rollout import MultiTurn
    from controller.topology import build_meshes, configure_devices
    from rewards.registry import RewardSet
    from sampler.jax_sampler import JaxSampler
    from trainer.model import ModelSpec, define_model, init_params, param_count

    total = args.turns * args.turn_tokens + (args.turns - 1) * args.obs_tokens
    base = [f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}",
            f"model.mlp_dim={4 * args.hidden}", f"env.name={os.path.abspath(__file__)}:Chatter",
            f"env.kwargs={{obs_tokens: {args.obs_tokens}}}", f"env.max_turns={args.turns}",
            f"env.max_total_tokens={total}", f"sampling.max_new_tokens={args.turn_tokens}"]
    cfg = load_config(overrides=base)
    configure_devices(cfg.topology)
    meshes = build_meshes(cfg.topology)
    tokenizer = build_tokenizer(cfg)
    spec = ModelSpec.from_config(cfg.model, tokenizer.vocab_size)
    mdef, params = define_model(spec), init_params(spec, 0)
    rows = build_dataset(cfg, tokenizer).next_batch().rows
    g = cfg.sampling.group_size
    rows = [r for r in rows for _ in range(g)]
    key = jax.random.key(0)

    # Every rollout is built and compiled first; then the repeats take turns, so a load that
    # comes and goes on the machine falls on all of them alike.
    runs = {}
    for history in ("cache", "reprefill"):
        hcfg = load_config(overrides=[*base, f"env.history={history}"])
        sampler = JaxSampler(mdef, meshes.sampler, hcfg.sampling, pad_id=tokenizer.pad_id,
                             stop_ids=tuple(tokenizer.stop_ids))
        sampler.load_weights(jax.device_put(params, sampler.shardings))
        mt = MultiTurn(hcfg, tokenizer, sampler, RewardSet(["reverse_digits"]))
        runs[f"multi-turn, history={history}"] = (
            lambda mt=mt: mt.run(mt.begin(rows, g), key), mt)
    first = next(iter(runs.values()))[0]()
    lengths = first.packed.mask_BxT.sum(axis=1)
    # Single-turn rollout of the same total length: every token drawn, no stop.
    length = round(float(lengths.mean()))
    scfg = cfg.sampling.model_copy(update={"max_new_tokens": length})
    single = JaxSampler(mdef, meshes.sampler, scfg, pad_id=tokenizer.pad_id, stop_ids=())
    single.load_weights(jax.device_put(params, single.shardings))
    prompts = build_dataset(cfg, tokenizer).next_batch()
    tokens = np.repeat(prompts.tokens_PxL, g, axis=0)
    mask = np.repeat(prompts.mask_PxL, g, axis=0)

    def single_turn():
        out = single.generate(tokens, mask, key, group=g)
        return jax.device_get(out.tokens_BxT)  # HOST SYNC, as the loop's: the text is needed

    runs["single-turn, same length"] = (single_turn, None)
    times: dict[str, list[float]] = {name: [] for name in runs}
    outs: dict[str, object] = {}
    for i in range(2 + args.repeats):
        for name, (fn, _) in runs.items():
            t0 = time.perf_counter()
            outs[name] = fn()
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    results = []
    for name, (_, mt) in runs.items():
        if mt is None:
            n = len(rows) * length
            results.append((name, statistics.median(times[name]), n, n, 1.0))
            continue
        mt.close()
        done = outs[name]
        results.append((name, statistics.median(times[name]),
                        int(done.packed.model_mask_BxT.sum()), int(done.packed.mask_BxT.sum()),
                        done.metrics["env/turns_mean"]))

    print(f"model: {param_count(params):,} params (d={args.hidden}, {args.layers} layers) | "
          f"{len(rows)} rows | turns <= {args.turns} of <= {args.turn_tokens} tokens, "
          f"observations {args.obs_tokens} tokens | T = {total} | single-turn length "
          f"{length} | {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    head = (f"{'rollout':<28} {'s':>7} {'turns/row':>9} {'model tok':>9} {'all tok':>8} "
            f"{'model tok/s':>11} {'all tok/s':>9} {'vs single':>9}")
    print(head)
    print("-" * len(head))
    single_rate = results[-1][2] / results[-1][1]
    for name, s, model, everything, turns in results:
        print(f"{name:<28} {s:>7.3f} {turns:>9.2f} {model:>9} {everything:>8} "
              f"{model / s:>11,.0f} {everything / s:>9,.0f} {model / s / single_rate:>8.2f}x")


if __name__ == "__main__":
    main()
