"""Tunix's side of bench/grpo_step.py: the standard GRPO job in `GRPOLearner` on JAX CPU.

    JAX_PLATFORMS=cpu <tunix-venv>/bin/python bench/peers/tunix_runner.py SPEC.json

Runs in the benchmark's own Tunix virtual environment (google-tunix), never the project's.
The model is Tunix's own `Qwen2` (q/k/v biases, tied embeddings, fp32) with the job's shapes,
randomly initialised by Tunix's `create_dummy_model`; the reference is a copy. Placement:
Tunix's natural CPU setup, every role (actor, reference, rollout) on one 1x1 ("fsdp", "tp")
mesh over JAX's default CPU device (which uses all cores), so rollout shares the actor's
weights. The rollout engine is Tunix's "vanilla" JAX sampler. The tokenizer is the same
word-level one as TRL's (`t0` ... `t1023` = ids 0..1023, `<eos>` = 1024 outside the model's
vocabulary, so completions are exactly `new_tokens` long). The reward is
`rewards/synthetic.py`, imported from the repository.

Phase times come from wrapping the cluster's own methods (`generate`, `get_ref_per_token_logps`,
`update_actor`, `sync_weights`) and the learner's `_compute_rewards`; the reference wrapper
waits for its (asynchronously dispatched) result so that its time is its own. Tunix may
prepare the next batch on a worker thread, so phases may overlap; a step ends when its
`_run_global_step` (and weight sync, if any) returns. Prints one JSON line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

T_START = time.perf_counter()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    sys.path.insert(0, spec["repo"])
    import importlib.metadata

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from tunix.models.dummy_model_creator import create_dummy_model
    from tunix.models.qwen2 import model as qwen2
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.grpo.grpo_learner import GRPOConfig, GRPOLearner
    from tunix.rl.rollout import base_rollout

    from rewards.synthetic import synthetic_even

    m = spec["model"]
    vocab = m["vocab_size"]
    steps = spec["warmup_steps"] + spec["timed_steps"]
    n_prompts = spec["prompts_per_step"]

    # TOKENIZER: t<i> -> i, and one special <eos>/<pad> outside the model's vocabulary.
    words = {f"t{i}": i for i in range(vocab)}
    words["<eos>"] = vocab
    core = Tokenizer(models.WordLevel(words, unk_token="<eos>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<eos>")

    # MODEL: Tunix's Qwen2 (always with q/k/v biases), tied embeddings, fp32.
    # An Auto-axes mesh, as Tunix's own mesh helpers build (jax.make_mesh defaults to Explicit).
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"))
    cfg = qwen2.ModelConfig(
        num_layers=m["num_layers"], vocab_size=vocab, embed_dim=m["hidden_size"],
        hidden_dim=m["mlp_dim"], num_heads=m["num_heads"], head_dim=m["head_dim"],
        num_kv_heads=m["num_kv_heads"], rope_theta=int(m["rope_theta"]),
        norm_eps=m["norm_eps"], use_tied_embedding=m["tie_embeddings"],
        dtype=jnp.float32, param_dtype=jnp.float32,
    )
    reference = create_dummy_model(qwen2.Qwen2, cfg, mesh=mesh, random_seed=spec["seed"])
    graph_def, state = nnx.split(reference)
    actor = nnx.merge(graph_def, jax.tree.map(jnp.copy, state))
    params = sum(x.size for x in jax.tree.leaves(nnx.state(actor, nnx.Param)))

    optimizer = optax.chain(
        optax.clip_by_global_norm(spec["max_grad_norm"]),
        optax.adamw(spec["lr"], b1=spec["adam_b1"], b2=spec["adam_b2"],
                    weight_decay=spec["weight_decay"]),
    )
    training = rl_cluster_lib.RLTrainingConfig(
        actor_optimizer=optimizer, eval_every_n_steps=10**9, max_steps=steps,
        checkpoint_root_directory=None, pbar_description=None,
    )
    rollout = base_rollout.RolloutConfig(
        max_tokens_to_generate=spec["new_tokens"], max_prompt_length=spec["prompt_tokens"],
        temperature=spec["temperature"], top_p=1.0, top_k=None,
        kv_cache_size=spec["prompt_tokens"] + spec["new_tokens"] + 32,
        eos_tokens=[vocab], data_type=jnp.float32,
    )
    roles = rl_cluster_lib.Role
    cluster_cfg = rl_cluster_lib.ClusterConfig(
        role_to_mesh={roles.ACTOR: mesh, roles.REFERENCE: mesh, roles.ROLLOUT: mesh},
        rollout_engine="vanilla", offload_to_cpu=False,
        training_config=training, rollout_config=rollout,
    )
    cluster = rl_cluster_lib.RLCluster(actor=actor, reference=reference, tokenizer=tok,
                                       cluster_config=cluster_cfg)

    def reward_even(prompts, completions, **kwargs):
        return [synthetic_even(p, c, {}) for p, c in zip(prompts, completions, strict=True)]

    algo = GRPOConfig(num_generations=spec["group_size"], num_iterations=1, beta=spec["beta"],
                      epsilon=spec["epsilon"], loss_agg_mode="token-mean")
    learner = GRPOLearner(rl_cluster=cluster, algo_config=algo, reward_fns=[reward_even])

    # PHASE TIMERS (thread-safe: Tunix generates on a worker thread).
    lock = threading.Lock()
    events: list[tuple[str, float, float]] = []  # (name, start, end)
    info: dict[str, list] = {"completion_len": [], "reward": []}

    def timed(name, fn, block=False, record=None):
        def wrapper(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            if block:
                jax.block_until_ready(out)
            if record is not None:
                record(out)
            with lock:
                events.append((name, t, time.perf_counter()))
            return out
        return wrapper

    generate = cluster.generate

    def generate_hook(*a, **k):
        t = time.perf_counter()
        out = generate(*a, **k)
        with lock:
            events.append(("sample", t, time.perf_counter()))
            info["completion_len"].append(
                sum(len(x) for x in out.tokens) / max(len(out.tokens), 1))
        return out

    cluster.generate = generate_hook

    # Tunix's vanilla sampler draws with PRNGKey(0) on every call when the rollout config has
    # no seed, so every step would reuse the same random numbers. Tandem folds the step into its
    # key and TRL advances torch's RNG; give Tunix a fresh seed per call too (same compute).
    rollout_generate = cluster.rollout.generate
    calls = [0]

    def seeded_generate(prompts, rollout_config, **k):
        calls[0] += 1
        seed = spec["seed"] * 1_000_003 + calls[0]
        return rollout_generate(prompts, dataclasses.replace(rollout_config, seed=seed), **k)

    cluster.rollout.generate = seeded_generate
    # The reference forward is dispatched asynchronously; waiting for it here charges its time
    # to "reference" instead of to whatever blocks next (the host only scores rewards between).
    cluster.get_ref_per_token_logps = timed("reference", cluster.get_ref_per_token_logps,
                                            block=True)
    cluster.update_actor = timed("update", cluster.update_actor)
    cluster.sync_weights = timed("sync", cluster.sync_weights)
    learner._compute_rewards = timed(
        "reward", learner._compute_rewards,
        record=lambda r: info["reward"].append(float(np.mean(np.asarray(r)))))
    learner._run_global_step = timed("global_step", learner._run_global_step)

    # Batches as Tunix's grain pipelines make them: a numpy array of prompt strings.
    dataset = [{"prompts": np.array([" ".join(f"t{i}" for i in ids) for ids in
                                     spec["prompts"][s * n_prompts:(s + 1) * n_prompts]])}
               for s in range(steps)]
    t_train = time.perf_counter()
    setup_s = t_train - T_START
    learner.train(dataset)

    # A step ends when its global step returns, or after the weight sync that follows it.
    ends = []
    for name, _, end in sorted(events, key=lambda e: e[2]):
        if name == "global_step":
            ends.append(end)
        elif name == "sync" and ends:
            ends[-1] = max(ends[-1], end)
    bounds = [t_train, *ends]
    out_steps = []
    for i in range(len(ends)):
        lo, hi = bounds[i], bounds[i + 1]
        ph = {}
        for name, start, end in events:
            if name != "global_step" and lo < end <= hi:
                ph[name] = ph.get(name, 0.0) + (end - start)
        out_steps.append({
            "step_s": hi - lo,
            "sample_s": ph.get("sample", 0.0),
            "reference_s": ph.get("reference", 0.0),
            "update_s": ph.get("update", 0.0),
            "sync_s": ph.get("sync", 0.0),
            "reward_s": ph.get("reward", 0.0),
            "reward_mean": info["reward"][i] if i < len(info["reward"]) else float("nan"),
            "completion_len_mean": (info["completion_len"][i]
                                    if i < len(info["completion_len"]) else None),
        })
    print(json.dumps({
        "framework": "tunix",
        "placement": "JAX CPU, actor/reference/rollout on one 1x1 mesh (colocated)",
        "setup_s": setup_s,
        "steps": out_steps,
        "phases": {"sample": "sample_s", "reference": "reference_s", "update": "update_s",
                   "sync": "sync_s", "reward": "reward_s"},
        "phase_notes": {"sync": "rollout shares the actor's weights on one mesh"},
        "settings": {
            "versions": {"google-tunix": importlib.metadata.version("google-tunix"),
                         "jax": jax.__version__},
            "devices": str(mesh.devices.tolist()),
            "params": params,
            "prompts_per_step": len(dataset[0]["prompts"]),
            "num_generations": algo.num_generations,
            "rows_per_step": len(dataset[0]["prompts"]) * algo.num_generations,
            "prompt_tokens": prompt_tokens(tok, dataset),
            "prompts_sha256": spec["prompts_sha256"] if prompts_match(tok, spec) else "mismatch",
            "max_new_tokens": rollout.max_tokens_to_generate,
            "eos_tokens": rollout.eos_tokens,
            "temperature": rollout.temperature,
            "rollout_seed": f"fresh per generate call ({calls[0]} calls)",
            "beta": algo.beta,
            "epsilon": algo.epsilon,
            "loss_agg_mode": algo.loss_agg_mode,
            "num_iterations": algo.num_iterations,
            "learning_rate": spec["lr"],
            "optimizer": "clip_by_global_norm + optax.adamw "
                         f"(b1={spec['adam_b1']}, b2={spec['adam_b2']})",
            "max_grad_norm": spec["max_grad_norm"],
            "optimizer_steps_per_batch": 1,
            "optimizer_steps_done": int(cluster.actor_trainer.train_steps),
            "dtype": "float32",
            "reference_model": True,
            "reward": "rewards.synthetic.synthetic_even",
        },
    }))
    return 0


def prompt_tokens(tok, dataset):
    lengths = sorted({len(tok(str(p))["input_ids"]) for b in dataset for p in b["prompts"]})
    return lengths[0] if len(lengths) == 1 else lengths


def prompts_match(tok, spec) -> bool:
    """The ids the tokenizer makes of the prompt texts are exactly the job's prompt ids."""
    return all(tok(" ".join(f"t{i}" for i in ids))["input_ids"] == ids for ids in spec["prompts"])


if __name__ == "__main__":
    tempfile.tempdir = tempfile.mkdtemp(prefix="tunix-bench-")
    sys.exit(main())
