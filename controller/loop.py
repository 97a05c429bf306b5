"""The GRPO loop: sample -> score -> advantages -> update -> reshard.

One step, as the controller drives it across the two sub-meshes:

    dataset ─prompts×G─▶ sampler ─completions+logprobs─▶ rewards ─scores─▶ advantages
        ─batch─▶ trainer ─new params─▶ reshard ─▶ sampler

Host sync points are marked "HOST SYNC": each is a place where Python waits for the devices.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from controller.advantages import grpo_advantages
from controller.config import JobConfig
from controller.data import TaskDataset
from controller.metrics import to_float
from controller.tokenizer import CharTokenizer
from reshard.transfer import Resharder
from rewards.registry import RewardSet
from sampler.base import Sampler
from trainer.trainer import TrainBatch, Trainer


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
        # Called with "sampling" / "scoring" / "training" / "syncing" as each phase begins
        # (the Job publishes it to the status board); must return at once.
        self.on_phase: Callable[[str], Any] | None = None
        self.weight_pushes = 0  # the sampler holds policy version weight_pushes - 1

    def _phase(self, name: str) -> None:
        if self.on_phase is not None:
            self.on_phase(name)

    def push_weights(self) -> Any:
        """Trainer params -> sampler layout -> sampler.load_weights. Returns TransferStats."""
        params, stats = self.resharder.transfer(self.trainer.params, self.sampler.shardings)
        self.sampler.load_weights(params)
        self.weight_pushes += 1
        return stats

    def step(self, step: int) -> dict[str, float]:
        g = self.cfg.sampling.group_size
        t_start = time.perf_counter()

        # SAMPLE: G completions for each prompt, on the sampler mesh.
        self._phase("sampling")
        prompts = self.dataset.next_batch()
        prompt_tokens = np.repeat(prompts.tokens_PxL, g, axis=0)
        prompt_mask = np.repeat(prompts.mask_PxL, g, axis=0)
        key = jax.random.fold_in(self.rng, step)
        out = self.sampler.generate(prompt_tokens, prompt_mask, key)
        # HOST SYNC: the reward functions need the completion text.
        tokens, mask, logps = jax.device_get((out.tokens_BxT, out.mask_BxT, out.logps_BxT))
        t_sampled = time.perf_counter()

        # SCORE: text -> rewards (Python, on the host).
        self._phase("scoring")
        rows = [r for r in prompts.rows for _ in range(g)]
        texts = [self.tokenizer.decode(t) for t in tokens]
        rewards, components = self.rewards.score([r["prompt"] for r in rows], texts, rows)
        rewards_PxG = np.asarray(rewards, np.float32).reshape(-1, g)
        t_scored = time.perf_counter()

        # ADVANTAGES: group-relative, A = (r - mean_g) / (std_g + eps).
        adv_B = grpo_advantages(rewards_PxG, self.cfg.algorithm.advantage_eps).reshape(-1)

        # UPDATE: one jitted, sharded GRPO step on the trainer mesh.
        self._phase("training")
        aux = self.trainer.update(
            TrainBatch(prompt_tokens, prompt_mask, tokens, mask, adv_B, logps))
        aux = jax.device_get(aux)  # HOST SYNC: wait for the update and read its metrics.
        t_updated = time.perf_counter()

        # RESHARD: new weights from the trainer layout to the sampler layout.
        self._phase("syncing")
        stats = self.push_weights()  # HOST SYNC inside: the transfer is timed to completion.
        t_end = time.perf_counter()

        lengths = mask.sum(axis=1)
        metrics = {
            "step": float(step),
            "reward/mean": float(rewards_PxG.mean()),
            "reward/std": float(rewards_PxG.std()),
            **{f"reward/{k}": float(v) for k, v in components.items()},
            "completion/len_mean": float(lengths.mean()),
            "completion/stopped_frac": float(
                np.isin(tokens, [self.tokenizer.stop_id]).any(axis=1).mean()),
            **{k: to_float(v) for k, v in aux.items()},
            "time/sample_s": t_sampled - t_start,
            "time/reward_s": t_scored - t_sampled,
            "time/update_s": t_updated - t_scored,
            "time/reshard_s": t_end - t_updated,
            "time/step_s": t_end - t_start,
            "reshard/bytes": float(stats.bytes),
            "reshard/gbps": stats.gbps,
        }
        return metrics
