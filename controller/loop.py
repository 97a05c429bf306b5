"""The GRPO loop: sample -> score -> advantages -> update -> reshard.

One step, as the controller drives it across the two sub-meshes:

    dataset ─prompts×G─▶ sampler ─completions+logprobs─▶ rewards ─scores─▶ advantages
        ─batch─▶ trainer ─new params─▶ reshard ─▶ sampler

Host sync points are marked "HOST SYNC": each is a place where Python waits for the devices.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from controller.advantages import compute_advantages, soft_overlong_penalty, uniform_groups
from controller.config import JobConfig
from controller.data import TaskDataset
from controller.metrics import to_float
from controller.tokenizer import CharTokenizer
from reshard.transfer import Resharder
from rewards.registry import RewardSet
from sampler.base import Sampler
from trainer.trainer import TrainBatch, Trainer


@dataclass
class Rollout:
    """Prompts × G completions with their rewards, on the host; rows grouped G at a time."""

    rows: list[dict[str, Any]]  # one dataset row per completion
    prompt_tokens_BxP: np.ndarray
    prompt_mask_BxP: np.ndarray
    tokens_BxT: np.ndarray
    mask_BxT: np.ndarray
    logps_BxT: np.ndarray
    truncated_B: np.ndarray  # no stop token within max_new_tokens
    scores_B: np.ndarray  # the reward functions' weighted sum
    rewards_B: np.ndarray  # scores + the soft overlong penalty: what advantages see

    def groups(self, index_P: np.ndarray, g: int) -> Rollout:
        """The rollout restricted to the groups `index_P` (in that order)."""
        rows_B = (np.asarray(index_P, int)[:, None] * g + np.arange(g)).reshape(-1)
        return Rollout([self.rows[i] for i in rows_B],
                       *(x[rows_B] for x in (
                           self.prompt_tokens_BxP, self.prompt_mask_BxP, self.tokens_BxT,
                           self.mask_BxT, self.logps_BxT, self.truncated_B, self.scores_B,
                           self.rewards_B)))


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """Row-wise concatenation; prompts are left-padded to the widest part."""
    width = max(p.prompt_tokens_BxP.shape[1] for p in parts)

    def left_pad(x: np.ndarray, fill: Any) -> np.ndarray:
        return np.pad(x, ((0, 0), (width - x.shape[1], 0)), constant_values=fill)

    return Rollout(
        [r for p in parts for r in p.rows],
        np.concatenate([left_pad(p.prompt_tokens_BxP, pad_id) for p in parts]),
        np.concatenate([left_pad(p.prompt_mask_BxP, False) for p in parts]),
        *(np.concatenate([getattr(p, f) for p in parts]) for f in (
            "tokens_BxT", "mask_BxT", "logps_BxT", "truncated_B", "scores_B", "rewards_B")))


class SyncLoop:
    """The synchronous schedule: each phase waits for the one before it."""

    def __init__(self, cfg: JobConfig, tokenizer: CharTokenizer, dataset: TaskDataset,
                 trainer: Trainer, sampler: Sampler, resharder: Resharder, rewards: RewardSet):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.dataset = dataset
        self.trainer = trainer
        self.sampler = sampler
        self.resharder = resharder
        self.rewards = rewards
        self.rng = jax.random.key(cfg.run.seed)

    def push_weights(self) -> Any:
        """Trainer params -> sampler layout -> sampler.load_weights. Returns TransferStats."""
        params, stats = self.resharder.transfer(self.trainer.params, self.sampler.shardings)
        self.sampler.load_weights(params)
        return stats

    def rollout(self, key: Any, times: dict[str, float]) -> tuple[Rollout, dict[str, float]]:
        """Samples G completions for the next prompts_per_step prompts and scores them."""
        g, algo = self.cfg.sampling.group_size, self.cfg.algorithm
        t0 = time.perf_counter()
        prompts = self.dataset.next_batch()
        prompt_tokens = np.repeat(prompts.tokens_PxL, g, axis=0)
        prompt_mask = np.repeat(prompts.mask_PxL, g, axis=0)
        out = self.sampler.generate(prompt_tokens, prompt_mask, key)
        # HOST SYNC: the reward functions need the completion text.
        tokens, mask, logps = jax.device_get((out.tokens_BxT, out.mask_BxT, out.logps_BxT))
        t1 = time.perf_counter()

        rows = [r for r in prompts.rows for _ in range(g)]
        texts = [self.tokenizer.decode(t) for t in tokens]
        scores, components = self.rewards.score([r["prompt"] for r in rows], texts, rows)
        scores_B = np.asarray(scores, np.float32)
        truncated_B = ~np.isin(tokens, [self.tokenizer.stop_id]).any(axis=1)
        rewards_B = scores_B
        if algo.overlong_buffer_len is not None:
            # DAPO soft overlong punishment: lengths in the last L_cache tokens pay linearly.
            rewards_B = scores_B + soft_overlong_penalty(
                mask.sum(axis=1), self.cfg.sampling.max_new_tokens, algo.overlong_buffer_len,
                algo.overlong_penalty_factor)
        times["sample"] += t1 - t0
        times["reward"] += time.perf_counter() - t1
        return (Rollout(rows, prompt_tokens, prompt_mask, tokens, mask, logps, truncated_B,
                        scores_B, rewards_B), components)

    def step(self, step: int) -> dict[str, float]:
        cfg, algo = self.cfg, self.cfg.algorithm
        g, want = cfg.sampling.group_size, cfg.data.prompts_per_step
        t_start = time.perf_counter()
        times = {"sample": 0.0, "reward": 0.0}

        # SAMPLE + SCORE: G completions per prompt on the sampler mesh, rewards on the host.
        # DAPO dynamic sampling: keep only groups whose rewards differ (the others have zero
        # advantage), and sample more prompts until `want` groups, or the retries, run out.
        key = jax.random.fold_in(self.rng, step)
        seen: list[Rollout] = []
        kept: list[Rollout] = []
        dropped: list[Rollout] = []
        component_sums: dict[str, float] = {}
        n_kept = 0
        rounds = 1 + (algo.dynamic_sampling_max_retries if algo.dynamic_sampling else 0)
        for attempt in range(rounds):
            r, components = self.rollout(key if attempt == 0 else jax.random.fold_in(key, attempt),
                                         times)
            seen.append(r)
            for k, v in components.items():
                component_sums[k] = component_sums.get(k, 0.0) + v
            if not algo.dynamic_sampling:
                kept.append(r)
                break
            # Judged on the reward functions' scores, before the length penalty (DAPO filters
            # on accuracy: the overlong penalty alone must not make a group "informative").
            uniform_P = uniform_groups(r.scores_B.reshape(-1, g))
            take = np.flatnonzero(~uniform_P)[: want - n_kept]
            kept.append(r.groups(take, g))
            dropped.append(r.groups(np.flatnonzero(uniform_P), g))
            n_kept += len(take)
            if n_kept >= want:
                break
        n_filtered = sum(len(d.rows) // g for d in dropped)
        shortfall = 0
        if algo.dynamic_sampling and n_kept < want:
            # Retries exhausted: top up with dropped groups (A = 0, so they add only KL and
            # entropy terms) to keep the batch shape, and hence the compiled update, fixed.
            shortfall = want - n_kept
            kept.append(concat_rollouts(dropped, self.tokenizer.pad_id).groups(
                np.arange(shortfall), g))
        batch = concat_rollouts(kept, self.tokenizer.pad_id)
        everything = concat_rollouts(seen, self.tokenizer.pad_id)
        t_scored = time.perf_counter()

        # Overlong filtering (DAPO): truncated completions keep their reward in the group
        # statistics but contribute no loss.
        loss_mask = batch.mask_BxT
        if algo.overlong_filtering:
            loss_mask = batch.mask_BxT & ~batch.truncated_B[:, None]
        train = TrainBatch(batch.prompt_tokens_BxP, batch.prompt_mask_BxP, batch.tokens_BxT,
                           batch.mask_BxT, np.zeros(len(batch.rows), np.float32),
                           batch.logps_BxT, loss_mask)

        # ADVANTAGES: group-relative (algorithm.advantage_estimator), from the final rewards.
        rewards_B = batch.rewards_B
        kl_metrics: dict[str, float] = {}
        if algo.beta > 0 and algo.kl_penalty == "reward":
            # KL in the reward: r_i -= β Σ_t KL_t(π_θ || π_ref). HOST SYNC: read the KL back.
            kl_B = np.asarray(jax.device_get(self.trainer.sequence_kl(train)), np.float32)
            rewards_B = rewards_B - algo.beta * kl_B
            kl_metrics = {"kl/mean": float(kl_B.sum() / max(loss_mask.sum(), 1)),
                          "kl/reward_penalty_mean": float(algo.beta * kl_B.mean())}
        adv_PxG = compute_advantages(rewards_B.reshape(-1, g), algo.advantage_estimator,
                                     algo.advantage_eps, algo.advantage_normalization)
        train = dataclasses.replace(train, advantages_B=adv_PxG.reshape(-1))

        # UPDATE: μ × minibatches optimizer steps, one jitted, sharded call on the trainer mesh.
        aux = self.trainer.update(train)
        aux = jax.device_get(aux)  # HOST SYNC: wait for the update and read its metrics.
        t_updated = time.perf_counter()

        # RESHARD: new weights from the trainer layout to the sampler layout.
        stats = self.push_weights()  # HOST SYNC inside: the transfer is timed to completion.
        t_end = time.perf_counter()

        lengths = everything.mask_BxT.sum(axis=1)
        metrics = {
            "step": float(step),
            # Over every completion sampled this step (all dynamic-sampling rounds).
            "reward/mean": float(everything.scores_B.mean()),
            "reward/std": float(everything.scores_B.std()),
            **{f"reward/{k}": v / len(seen) for k, v in component_sums.items()},
            "completion/len_mean": float(lengths.mean()),
            "completion/stopped_frac": float(1.0 - everything.truncated_B.mean()),
            "advantages/mean": float(adv_PxG.mean()),
            "advantages/std": float(adv_PxG.std()),
            "advantages/zero_frac": float((np.abs(adv_PxG) == 0).mean()),
            **kl_metrics,
            **{k: to_float(v) for k, v in aux.items()},
            "time/sample_s": times["sample"],
            "time/reward_s": times["reward"],
            "time/update_s": t_updated - t_scored,
            "time/reshard_s": t_end - t_updated,
            "time/step_s": t_end - t_start,
            "reshard/bytes": float(stats.bytes),
            "reshard/gbps": stats.gbps,
        }
        if algo.overlong_buffer_len is not None:
            metrics["reward/overlong_penalty_mean"] = float(
                (everything.rewards_B - everything.scores_B).mean())
        if algo.overlong_filtering:
            metrics["overlong/filtered_frac"] = float(batch.truncated_B.mean())
        if algo.dynamic_sampling:
            metrics["dynamic_sampling/rounds"] = float(len(seen))
            metrics["dynamic_sampling/groups_filtered"] = float(n_filtered)
            metrics["dynamic_sampling/shortfall_groups"] = float(shortfall)
            metrics["dynamic_sampling/kept_frac"] = float(
                n_kept / max(len(everything.rows) // g, 1))
        return metrics
