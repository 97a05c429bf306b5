"""TRL's side of bench/memory.py: `trl.GRPOTrainer`'s update alone, on fixed rows, torch CPU.

    <trl-venv>/bin/python bench/peers/trl_memory_runner.py SPEC.json [--checkpointing on|off]
        [--scratch DIR]

Runs in the benchmark's TRL virtual environment (torch 2.13.0 CPU + trl 1.16.0), never the
project's. The model is a `Qwen2ForCausalLM` with the spec's shapes and random init, fp32,
saved to a scratch directory (`--scratch`, which the caller removes, so that a run stopped
by a signal leaves nothing behind; default: a temporary directory removed on exit) and loaded
by `GRPOTrainer` as policy and reference (no hub access). Nothing is generated: each step
builds the batch that `_generate_and_score_completions` would return for the spec's token ids
(every completion exactly T tokens, the spec's advantages, no `old_per_token_logps` since
μ = 1) and runs TRL's own update on it:

    reference log-probs  `_get_per_token_logps_and_entropies(ref_model, ...)` under no_grad,
                         with gradient checkpointing switched off, as TRL does
    loss                 `compute_loss` (TRL's fused, tiled LM head; loss_type "dapo", i.e.
                         the token mean over the batch, as Tandem's `token-mean`)
    backward             `accelerator.backward(loss)`
    optimizer step       gradient-norm clip, the trainer's own AdamW (`create_optimizer`), zero grad

The step time covers all four. Gradient checkpointing is TRL's default (`GRPOConfig`: on)
unless `--checkpointing` says otherwise; it is switched on as `Trainer.train` does. Prints one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from trl_runner import qwen2_config

T_START = time.perf_counter()
GIB = 1 << 30


def rss_gib() -> float:
    """This process's resident set now (VmRSS), in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / GIB
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("spec", type=Path)
    ap.add_argument("--checkpointing", choices=["default", "on", "off"], default="default")
    ap.add_argument("--scratch", type=Path, help="where the model and the trainer's output go")
    ns = ap.parse_args()
    if ns.scratch is not None:
        return run(ns, ns.scratch)
    scratch = Path(tempfile.mkdtemp(prefix="trl-memory-"))
    try:
        return run(ns, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run(ns: argparse.Namespace, scratch: Path) -> int:
    spec = json.loads(ns.spec.read_text())

    import torch
    import transformers
    import trl
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM
    from trl import GRPOConfig, GRPOTrainer
    from trl.models.utils import disable_gradient_checkpointing

    m = spec["model"]
    vocab = m["vocab_size"]
    torch.manual_seed(spec["seed"])
    prompt_ids = torch.tensor(spec["prompt_ids"], dtype=torch.long)
    completion_ids = torch.tensor(spec["completion_ids"], dtype=torch.long)
    rows, t = completion_ids.shape

    # TOKENIZER: GRPOTrainer wants one (pad and EOS ids); nothing is tokenized or generated, so
    # a few words do. <eos> is the model's last id; no row ever contains it.
    core = Tokenizer(models.WordLevel({"t0": 0, "<eos>": vocab - 1}, unk_token="<eos>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<eos>")
    tok.padding_side = "left"

    # MODEL: bench/peers/trl_runner.py's, as long as the rows.
    cfg = qwen2_config(m, max_positions=prompt_ids.shape[1] + t, eos_id=vocab - 1,
                       pad_id=vocab - 1)
    # GRPOTrainer builds its reference model from the policy's path, so the random init is
    # saved locally and both are loaded from it.
    model_dir = scratch / "model"
    Qwen2ForCausalLM(cfg).float().save_pretrained(model_dir)
    tok.save_pretrained(model_dir)

    kwargs = {} if ns.checkpointing == "default" else {
        "gradient_checkpointing": ns.checkpointing == "on"}
    args = GRPOConfig(
        output_dir=str(scratch / "output"), report_to="none",
        save_strategy="no", disable_tqdm=True, use_cpu=True, bf16=False, fp16=False,
        seed=spec["seed"], dataloader_num_workers=0,
        per_device_train_batch_size=rows, gradient_accumulation_steps=1,
        num_generations=spec["group_size"], max_completion_length=t,
        num_iterations=1, steps_per_generation=1, temperature=1.0,
        beta=spec["beta"], epsilon=spec["epsilon"], loss_type="dapo",
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0,
        adam_beta1=spec["adam_b1"], adam_beta2=spec["adam_b2"],
        weight_decay=spec["weight_decay"], max_grad_norm=spec["max_grad_norm"],
        optim="adamw_torch", disable_dropout=True, model_init_kwargs={"dtype": torch.float32},
        **kwargs,
    )

    def no_reward(prompts, completions, **kw):
        return [0.0] * len(prompts)

    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=[no_reward], args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["t0"] * rows}),
                          processing_class=tok)
    model, ref = trainer.model, trainer.ref_model
    # What `Trainer.train` does before its first step: activation checkpointing, train mode,
    # the optimizer; and the attribute `compute_loss` reads (no accumulation here).
    checkpointing = bool(args.activation_checkpointing)
    if checkpointing:
        gc_kwargs = dict(args.activation_checkpointing_kwargs or {})
        every_n_layers = gc_kwargs.pop("every_n_layers", 1)
        offload = gc_kwargs.pop("offload", False)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=gc_kwargs or None,
                                              every_n_layers=every_n_layers, offload=offload)
    model.train()
    optimizer = trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1
    params = sum(p.numel() for p in model.parameters())

    prompt_mask = torch.ones_like(prompt_ids)
    completion_mask = torch.ones_like(completion_ids)
    advantages = torch.tensor(spec["advantages"], dtype=torch.float32)
    setup_s = time.perf_counter() - T_START
    rss_setup = rss_gib()

    steps = []
    for i in range(spec["warmup_steps"] + spec["timed_steps"]):
        t0 = time.perf_counter()
        # REFERENCE: as in `_generate_and_score_completions`.
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        with torch.no_grad(), disable_gradient_checkpointing(
                model, args.gradient_checkpointing_kwargs):
            ref_logps, _, _ = trainer._get_per_token_logps_and_entropies(
                ref, input_ids, attention_mask, t, batch_size=args.per_device_train_batch_size)
        inputs = {
            "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
            "completion_ids": completion_ids, "completion_mask": completion_mask,
            "advantages": advantages, "num_items_in_batch": completion_mask.sum(),
            "ref_per_token_logps": ref_logps,
        }
        # LOSS, BACKWARD, OPTIMIZER STEP: as in `Trainer.training_step` and its loop.
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(model, inputs)
        trainer.accelerator.backward(loss)
        trainer.accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        model.zero_grad()
        steps.append({"step_s": time.perf_counter() - t0, "warmup": i < spec["warmup_steps"],
                      "loss": float(loss.detach()),
                      "kl": trainer._metrics["train"]["kl"][-1]
                      if trainer._metrics["train"].get("kl") else float("nan")})

    print(json.dumps({
        "framework": "trl",
        "setup_s": setup_s,
        "steps": steps,
        "rss_after_setup_gib": rss_setup,
        "rss_peak_self_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
        "device_peak_gib": None,
        "settings": {
            "params": params,
            "device": "cpu",
            "platform": "cpu",
            "rows": rows,
            "group_size": args.num_generations,
            "prompt_tokens": int(prompt_ids.shape[1]),
            "completion_tokens": int(t),
            "vocab_size": model.config.vocab_size,
            "beta": args.beta,
            "epsilon": args.epsilon,
            "loss_type": args.loss_type,
            "learning_rate": args.learning_rate,
            "max_grad_norm": args.max_grad_norm,
            "optimizer_steps_per_batch": 1,
            "gradient_checkpointing": checkpointing,
            "attn_implementation": model.config._attn_implementation,
            "reference_model": ref is not None,
            "dtype": str(next(model.parameters()).dtype),
            "torch_threads": torch.get_num_threads(),
            "versions": {"trl": trl.__version__, "transformers": transformers.__version__,
                         "torch": torch.__version__},
        },
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
