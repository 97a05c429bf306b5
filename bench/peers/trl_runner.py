"""TRL's side of bench/grpo_step.py: the standard GRPO job in `trl.GRPOTrainer` on torch CPU.

    <trl-venv>/bin/python bench/peers/trl_runner.py SPEC.json

Runs in the benchmark's own TRL virtual environment (torch 2.13.0 CPU + trl), never the
project's. The model is a `Qwen2ForCausalLM` with the job's shapes and random init; the
tokenizer is a word-level one over the words `t0` ... `t1023` (ids 0..1023, the same ids Tandem
samples) plus `<eos>` = 1024, which doubles as the pad token. The model's vocabulary is 1024,
so `<eos>` can never be sampled: every completion is exactly `new_tokens` long, as in Tandem,
without any logit masking. The reward is `rewards/synthetic.py`, imported from the repository.

Per-phase times come from wrapping the trainer's own methods (sample = `_generate`, reference =
the reference model's `_get_per_token_logps_and_entropies`, reward = `_calculate_rewards`);
the step time is between consecutive `on_step_end` callbacks (the first from `on_train_begin`),
and update = step - `_prepare_inputs` (generation, scoring and reference all happen in there).
Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

T_START = time.perf_counter()


def qwen2_config(m: dict, *, max_positions: int, eos_id: int, pad_id: int | None) -> Any:
    """A `Qwen2Config` with the bench model's shapes `m`: the Qwen2 layout (q/k/v biases,
    SwiGLU, RMSNorm, RoPE), tied embeddings, fp32."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=m["vocab_size"], hidden_size=m["hidden_size"], intermediate_size=m["mlp_dim"],
        num_hidden_layers=m["num_layers"], num_attention_heads=m["num_heads"],
        num_key_value_heads=m["num_kv_heads"], head_dim=m["head_dim"],
        tie_word_embeddings=m["tie_embeddings"], rms_norm_eps=m["norm_eps"],
        rope_theta=m["rope_theta"], max_position_embeddings=max_positions,
        eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None,
        use_sliding_window=False, torch_dtype="float32",
    )


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    sys.path.insert(0, spec["repo"])
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rewards.synthetic import synthetic_even

    m = spec["model"]
    vocab = m["vocab_size"]
    torch.manual_seed(spec["seed"])

    # TOKENIZER: t<i> -> i, and one special <eos>/<pad> outside the model's vocabulary.
    words = {f"t{i}": i for i in range(vocab)}
    words["<eos>"] = vocab
    core = Tokenizer(models.WordLevel(words, unk_token="<eos>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<eos>")
    tok.padding_side = "left"

    # <eos> is not an embedding row: it can never be sampled.
    model = Qwen2ForCausalLM(qwen2_config(m, max_positions=512, eos_id=vocab, pad_id=None)).float()
    model.generation_config.eos_token_id = vocab
    model.generation_config.pad_token_id = vocab
    # GRPOTrainer builds its reference model from the policy's path, so the random init is
    # saved locally and both are loaded from it (no hub access).
    model_dir = Path(tempfile.mkdtemp(prefix="trl-bench-model-"))
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)

    steps = spec["warmup_steps"] + spec["timed_steps"]
    n_prompts = spec["prompts_per_step"]
    prompts = [" ".join(f"t{i}" for i in ids) for ids in spec["prompts"]]
    assert len(prompts) == steps * n_prompts, (len(prompts), steps, n_prompts)
    dataset = Dataset.from_dict({"prompt": prompts})

    def reward_even(prompts, completions, **kwargs):
        return [synthetic_even(p, c, {}) for p, c in zip(prompts, completions, strict=True)]

    rows = n_prompts * spec["group_size"]
    out_dir = tempfile.mkdtemp(prefix="trl-bench-")
    args = GRPOConfig(
        output_dir=out_dir, report_to="none", save_strategy="no", logging_steps=1,
        disable_tqdm=True, use_cpu=True, bf16=False, fp16=False, seed=spec["seed"],
        gradient_checkpointing=False, dataloader_num_workers=0,
        per_device_train_batch_size=rows, gradient_accumulation_steps=1,
        num_generations=spec["group_size"], max_completion_length=spec["new_tokens"],
        num_iterations=1, steps_per_generation=1, shuffle_dataset=False,
        temperature=spec["temperature"], top_p=1.0, top_k=0,
        beta=spec["beta"], epsilon=spec["epsilon"], loss_type="dapo", scale_rewards="group",
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0,
        adam_beta1=spec["adam_b1"], adam_beta2=spec["adam_b2"],
        weight_decay=spec["weight_decay"], max_grad_norm=spec["max_grad_norm"],
        optim="adamw_torch", max_steps=steps, log_completions=False, disable_dropout=True,
        model_init_kwargs={"dtype": torch.float32},
    )

    # PHASE TIMERS: wrap the trainer's own methods; each appends (name, seconds).
    events: list[tuple[str, float]] = []
    marks: dict[str, float] = {}
    info: dict[str, list] = {"completion_len": [], "reward": [], "loss": [], "kl": []}

    class Timing(TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks["last"] = time.perf_counter()
            marks["train_begin"] = marks["last"]

        def on_step_end(self, *a, **k):
            now = time.perf_counter()
            events.append(("step", now - marks["last"]))
            marks["last"] = now

        def on_log(self, args, state, control, logs=None, **k):
            if logs and "loss" in logs:
                info["loss"].append(logs["loss"])
                info["kl"].append(logs.get("kl", float("nan")))

    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=[reward_even], args=args,
                          train_dataset=dataset, processing_class=tok, callbacks=[Timing()])

    def timed(name, fn, when=None):
        def wrapper(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            if when is None or when(*a, **k):
                events.append((name, time.perf_counter() - t))
            return out
        return wrapper

    ref = trainer.ref_model
    model = trainer.model
    params = sum(p.numel() for p in model.parameters())
    trainer._generate = timed("sample", trainer._generate)
    trainer._prepare_inputs = timed("prepare", trainer._prepare_inputs)
    trainer._get_per_token_logps_and_entropies = timed(
        "reference", trainer._get_per_token_logps_and_entropies,
        when=lambda model, *a, **k: ref is not None and model is ref)
    calc = trainer._calculate_rewards

    def rewards_hook(inputs, prompts_, completions, completion_ids_list):
        info["completion_len"].append(
            sum(len(c) for c in completion_ids_list) / len(completion_ids_list))
        t = time.perf_counter()
        out = calc(inputs, prompts_, completions, completion_ids_list)
        events.append(("reward", time.perf_counter() - t))
        info["reward"].append(float(out.float().mean()))
        return out

    trainer._calculate_rewards = rewards_hook

    t_ready = time.perf_counter()
    trainer.train()

    # Split the event stream into steps: every phase event belongs to the next "step" event.
    per_step: list[dict[str, float]] = []
    cur: dict[str, float] = {}
    for name, secs in events:
        if name == "step":
            cur["step_s"] = secs
            per_step.append(cur)
            cur = {}
        else:
            cur[name] = cur.get(name, 0.0) + secs
    out_steps = []
    for i, s in enumerate(per_step):
        prepare = s.get("prepare", 0.0)
        out_steps.append({
            "step_s": s["step_s"],
            "sample_s": s.get("sample", 0.0),
            "reference_s": s.get("reference", 0.0),
            "reward_s": s.get("reward", 0.0),
            # loss forward + backward + optimizer step (+ the trainer's per-step bookkeeping)
            "update_s": s["step_s"] - prepare,
            "reward_mean": info["reward"][i] if i < len(info["reward"]) else float("nan"),
            "loss": info["loss"][i] if i < len(info["loss"]) else float("nan"),
            "kl": info["kl"][i] if i < len(info["kl"]) else float("nan"),
            "completion_len_mean": info["completion_len"][i],
        })
    a = trainer.args
    gen = trainer.generation_config
    prompt_tokens = sorted({len(tok(p, add_special_tokens=True)["input_ids"]) for p in prompts})
    print(json.dumps({
        "framework": "trl",
        "placement": "torch CPU, one process",
        "setup_s": t_ready - T_START,
        "steps": out_steps,
        "phases": {"sample": "sample_s", "reference": "reference_s", "update": "update_s",
                   "sync": None, "reward": "reward_s"},
        "phase_notes": {"sync": "none: the policy generates with its own weights (no vLLM)"},
        "settings": {
            "versions": {"trl": trl.__version__, "transformers": transformers.__version__,
                         "torch": torch.__version__},
            "torch_threads": torch.get_num_threads(),
            "params": params,
            "prompts_per_step": a.per_device_train_batch_size // a.num_generations,
            "num_generations": a.num_generations,
            "rows_per_step": a.per_device_train_batch_size * a.gradient_accumulation_steps,
            "prompt_tokens": prompt_tokens[0] if len(prompt_tokens) == 1 else prompt_tokens,
            "prompts_sha256": spec["prompts_sha256"] if prompts_match(tok, spec) else "mismatch",
            "max_new_tokens": gen.max_new_tokens,
            "eos_token_id": gen.eos_token_id,
            "temperature": a.temperature,
            "top_p_top_k": [a.top_p, a.top_k],
            "beta": a.beta,
            "epsilon": a.epsilon,
            "loss_type": a.loss_type,
            "num_iterations": a.num_iterations,
            "learning_rate": a.learning_rate,
            "lr_scheduler": str(a.lr_scheduler_type),
            "adam_b1_b2": [a.adam_beta1, a.adam_beta2],
            "max_grad_norm": a.max_grad_norm,
            "optimizer_steps_per_batch": a.steps_per_generation * a.num_iterations,
            "gradient_checkpointing": a.gradient_checkpointing,
            "dtype": str(next(model.parameters()).dtype),
            "reference_model": ref is not None,
            "reward": "rewards.synthetic.synthetic_even",
        },
    }))
    return 0


def prompts_match(tok, spec) -> bool:
    """The ids TRL's tokenizer makes of the prompt texts are exactly the job's prompt ids."""
    for ids in spec["prompts"]:
        text = " ".join(f"t{i}" for i in ids)
        if tok(text, add_special_tokens=True)["input_ids"] != ids:
            return False
    return True


if __name__ == "__main__":
    sys.exit(main())
