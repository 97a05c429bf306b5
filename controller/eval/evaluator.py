"""Held-out evaluation on the sampler mesh, with the sampler's current weights.

An `Evaluator` holds the held-out prompts (the first `eval.num_prompts` of `eval.split`, or of
the file `eval.path`, in order), a sampler of its own on the training sampler's mesh (the same
model and layout; `eval.temperature`, `eval.max_new_tokens`), and the job's reward set.
`run(params)` takes the weights the training sampler holds (no copy of the model is made),
samples n = `eval.samples_per_prompt` completions per prompt in batches of `eval.batch_rows`
completions (the last one padded to the same shape, so one program serves every batch), and
scores them:

- `eval/reward/mean`, `eval/reward/<label>`: mean reward, combined and per function;
  `eval/accuracy/<label>` for a function whose rewards are all 0 or 1;
- a sample is *correct* when the job's first reward function gives it its full score, 1.0
  (an exact answer for `reverse_digits`, a right one for `gsm8k`): `eval/accuracy` (over all
  samples), `eval/pass@k` (the unbiased estimator from n >= k samples), `eval/maj@k` (where
  the task's answers can be extracted: `rewards.answers`);
- `eval/mean@k` (the combined reward over each prompt's first k samples), completion length,
  truncation, reward failures, prompts, samples and `eval/time_s`.

Its randomness is a key of its own, `eval.seed`, the same at every evaluation: training's
keys, data position and sampler state are never touched, so a run's trajectory is the same
with evaluation on or off, and two evaluations differ only by the policy. A failing reward
function is counted (`eval/rewards/failures`), never raised.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from controller.config import JobConfig
from controller.eval.scores import maj_at_k, mean_at_k, mean_pass_at_k
from rewards.answers import HAS_ANSWERS, extract_answer


@dataclass
class EvalResult:
    metrics: dict[str, float]  # "eval/..." keys
    records: list[dict[str, Any]]  # one per prompt: prompt, completions, rewards, answers


def eval_data_config(cfg: JobConfig) -> JobConfig:
    """`cfg` with its data section pointed at the held-out prompts, in order, and its
    sampling section at the evaluation's settings (what the prompt budget is checked with)."""
    e = cfg.eval
    data = {"split": e.split, "shuffle": False, "prompts_per_step": e.num_prompts}
    if e.path is not None:
        data["path"] = e.path
    sampling = {"temperature": e.temperature,
                "max_new_tokens": e.max_new_tokens or cfg.sampling.max_new_tokens}
    return cfg.model_copy(update={"data": cfg.data.model_copy(update=data),
                                  "sampling": cfg.sampling.model_copy(update=sampling)})


def answer_task(cfg: JobConfig) -> str | None:
    """Whose answers maj@k votes on: the first reward function's, else the task's; None when
    neither has an extractor."""
    first = cfg.rewards.functions[0] if cfg.rewards.functions else None
    for name in (first, cfg.data.task):
        if name in HAS_ANSWERS:
            return name
    return None


class Evaluator:
    def __init__(self, cfg: JobConfig, tokenizer: Any, rewards: Any, model_def: Any,
                 mesh: Any, *, param_dtype: Any = None):
        from controller.data import build_dataset
        from sampler.jax_sampler import JaxSampler

        self.tokenizer = tokenizer
        self.rewards = rewards
        local = eval_data_config(cfg)
        dataset = build_dataset(local, tokenizer)
        n_prompts = min(cfg.eval.num_prompts, len(dataset)) if hasattr(dataset, "__len__") \
            else cfg.eval.num_prompts
        self.prompts = dataset.next_batch(n_prompts)
        self.n = cfg.eval.samples_per_prompt
        self.k = cfg.eval.k
        self.group = self.n if cfg.sampling.share_prompt else 1
        # Batches of eval.batch_rows completions (whole groups), fixed by the eval settings
        # alone: the same evaluation in a run and in `tandem eval`, whatever the training batch.
        self.prompts_per_batch = max(1, min(cfg.eval.batch_rows // self.n, n_prompts))
        self.sampler = JaxSampler(model_def, mesh, local.sampling, pad_id=tokenizer.pad_id,
                                  stop_ids=tuple(tokenizer.stop_ids), param_dtype=param_dtype)
        self.stop_ids = np.asarray(self.sampler.stop_ids, np.int32)
        self.key = jax.random.key(cfg.eval.seed)
        self.answers_of = answer_task(cfg)

    @property
    def num_prompts(self) -> int:
        return len(self.prompts.rows)

    def run(self, params: Any) -> EvalResult:
        """Evaluates the policy `params` (the training sampler's weights, as they are)."""
        t0 = time.perf_counter()
        self.sampler.load_weights(params)
        p, n, per = self.num_prompts, self.n, self.prompts_per_batch
        tokens_list, mask_list = [], []
        for b, start in enumerate(range(0, p, per)):
            idx = np.arange(start, start + per).clip(max=p - 1)  # the last batch padded
            prompt = np.repeat(self.prompts.tokens_PxL[idx], n, axis=0)
            pmask = np.repeat(self.prompts.mask_PxL[idx], n, axis=0)
            out = self.sampler.generate(prompt, pmask, jax.random.fold_in(self.key, b),
                                        group=self.group)
            tokens, mask = jax.device_get((out.tokens_BxT, out.mask_BxT))
            keep = (start + np.arange(per)) < p
            tokens_list.append(tokens.reshape(per, n, -1)[keep])
            mask_list.append(mask.reshape(per, n, -1)[keep])
        tokens_PxNxT = np.concatenate(tokens_list)
        mask_PxNxT = np.concatenate(mask_list)

        rows = [r for r in self.prompts.rows for _ in range(n)]
        flat_tokens = tokens_PxNxT.reshape(p * n, -1)
        flat_mask = mask_PxNxT.reshape(p * n, -1)
        texts = [self.tokenizer.decode(t) for t in flat_tokens]
        ids = [t[m].tolist() for t, m in zip(flat_tokens, flat_mask, strict=True)]
        scores = self.rewards.score_each([r["prompt"] for r in rows], texts, rows, ids,
                                         tolerate_failures=True)
        totals_PxN = np.asarray(scores.totals, np.float64).reshape(p, n)
        each = {k: np.asarray(v, np.float64).reshape(p, n) for k, v in scores.each.items()}
        first = next(iter(each.values()))
        correct_PxN = first == 1.0
        truncated_PxN = ~np.isin(tokens_PxNxT, self.stop_ids).any(axis=2)
        answers = ([[extract_answer(self.answers_of, texts[i * n + j]) for j in range(n)]
                    for i in range(p)] if self.answers_of else None)

        k = self.k
        m: dict[str, float] = {
            "eval/reward/mean": float(totals_PxN.mean()),
            "eval/accuracy": float(correct_PxN.mean()),
            f"eval/pass@{k}": mean_pass_at_k(correct_PxN, k),
            f"eval/mean@{k}": mean_at_k(totals_PxN, k),
        }
        if answers is not None:
            m[f"eval/maj@{k}"] = maj_at_k(answers, correct_PxN.tolist(), k)
        for label, values in each.items():
            m[f"eval/reward/{label}"] = float(values.mean())
            if np.isin(values, (0.0, 1.0)).all():
                m[f"eval/accuracy/{label}"] = float((values == 1.0).mean())
        m["eval/completion/len_mean"] = float(mask_PxNxT.sum(axis=2).mean())
        m["eval/completion/truncated_frac"] = float(truncated_PxN.mean())
        m["eval/rewards/failures"] = scores.metrics["rewards/failures"]
        m["eval/rewards/failure_frac"] = scores.metrics["rewards/failure_frac"]
        m["eval/prompts"] = float(p)
        m["eval/samples"] = float(p * n)
        m["eval/time_s"] = time.perf_counter() - t0

        records = []
        for i, row in enumerate(self.prompts.rows):
            records.append({
                "prompt": row["prompt"] if isinstance(row.get("prompt"), str) else row,
                "target": row.get("target"),
                "completions": texts[i * n:(i + 1) * n],
                "reward": totals_PxN[i].tolist(),
                "rewards": {label: v[i].tolist() for label, v in each.items()},
                "correct": correct_PxN[i].tolist(),
                "truncated": truncated_PxN[i].tolist(),
                **({"answers": answers[i]} if answers is not None else {}),
            })
        return EvalResult(m, records)


def format_eval(step: int, metrics: dict[str, float]) -> str:
    """One line for the console: `eval step 50: accuracy 0.312  pass@4 0.500 ...` (with one
    sample per prompt, pass@1 and maj@1 are the accuracy and mean@1 the reward: left out)."""
    single = metrics["eval/samples"] == metrics["eval/prompts"]
    head = [(k.removeprefix("eval/"), v) for k, v in metrics.items()
            if k == "eval/accuracy" or (not single and k.startswith(
                ("eval/pass@", "eval/maj@", "eval/mean@")))]
    parts = [f"{name} {v:.3f}" for name, v in head]
    parts.append(f"reward {metrics['eval/reward/mean']:.3f}")
    prompts = int(metrics["eval/prompts"])
    per_prompt = int(metrics["eval/samples"]) // max(prompts, 1)
    return (f"eval  step {step:>4}  " + "  ".join(parts)
            + f"  ({prompts} prompts x {per_prompt}, {metrics['eval/time_s']:.1f}s)")
