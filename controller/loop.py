"""The GRPO loop: sample -> score -> advantages -> update -> reshard, under three schedules.

One step, as the controller drives it across the two sub-meshes:

    dataset ─prompts×G─▶ sampler ─completions+logprobs─▶ rewards ─scores─▶ advantages
        ─batch─▶ trainer ─new params─▶ reshard ─▶ sampler

A step is split in two halves. `produce(step)` is the sampler side: take prompts, generate, and
score (a `Rollout`). `consume(rollout)` is the trainer side: advantages, update, and the weight
push back to the sampler. The schedules differ only in when the halves run:

- `SyncLoop` ("sync", and "colocated", where both meshes are one): produce, then consume.
- `AsyncLoop` ("async"): a producer thread runs up to `max_staleness` policy versions ahead of
  the trainer, so batch N+1 is sampled and scored while the trainer updates on batch N.

Host sync points are marked "HOST SYNC": each is a place where Python waits for the devices.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from controller.advantages import compute_advantages, soft_overlong_penalty, uniform_groups
from controller.config import JobConfig
from controller.data.tasks import TaskDataset
from controller.data.tokenizer import Tokenizer
from controller.metrics import to_float
from controller.rollout import SUMMED_METRICS, MultiTurn
from controller.timeline import Timeline
from reshard.transfer import Resharder
from rewards.registry import RewardSet
from sampler.base import Sampler, left_pad
from sampler.jax_sampler import bucket_width
from trainer.trainer import TrainBatch, Trainer

# How often a thread blocked on the other one checks that the wait can still end.
WAIT_POLL_S = 0.5


@dataclass
class Samples:
    """Prompts × G completions with their rewards, on the host; rows grouped G at a time."""

    rows: list[dict[str, Any]]  # one dataset row per completion
    prompt_tokens_BxP: np.ndarray
    prompt_mask_BxP: np.ndarray
    tokens_BxT: np.ndarray
    mask_BxT: np.ndarray
    logps_BxT: np.ndarray  # behaviour logprobs: what the sampler drew each token with
    truncated_B: np.ndarray  # no stop token within max_new_tokens
    scores_B: np.ndarray  # the reward functions' weighted sum
    rewards_B: np.ndarray  # scores + the soft overlong penalty: what advantages see
    parts_BxF: np.ndarray  # each reward function's r_k (RewardSet.names order)
    # Multi-turn rows (env.name): the model's own tokens within mask_BxT (the rest are
    # observations), and a record per row (turns, tool calls, ending; controller/rollout.py).
    model_mask_BxT: np.ndarray | None = None
    records: list[dict[str, Any]] | None = None

    def groups(self, index_P: np.ndarray, g: int) -> Samples:
        """The samples restricted to the groups `index_P` (in that order)."""
        rows_B = (np.asarray(index_P, int)[:, None] * g + np.arange(g)).reshape(-1)
        return Samples([self.rows[i] for i in rows_B],
                       *(x[rows_B] for x in (
                           self.prompt_tokens_BxP, self.prompt_mask_BxP, self.tokens_BxT,
                           self.mask_BxT, self.logps_BxT, self.truncated_B, self.scores_B,
                           self.rewards_B, self.parts_BxF)),
                       model_mask_BxT=None if self.model_mask_BxT is None
                       else self.model_mask_BxT[rows_B],
                       records=None if self.records is None else [self.records[i]
                                                                  for i in rows_B])


def concat_samples(parts: list[Samples], pad_id: int) -> Samples:
    """Row-wise concatenation; prompts are left-padded to the widest part."""
    width = max(p.prompt_tokens_BxP.shape[1] for p in parts)
    prompts = [left_pad(p.prompt_tokens_BxP, p.prompt_mask_BxP, width, pad_id) for p in parts]
    return Samples(
        [r for p in parts for r in p.rows],
        np.concatenate([t for t, _ in prompts]),
        np.concatenate([m for _, m in prompts]),
        *(np.concatenate([getattr(p, f) for p in parts]) for f in (
            "tokens_BxT", "mask_BxT", "logps_BxT", "truncated_B", "scores_B", "rewards_B",
            "parts_BxF")),
        model_mask_BxT=None if parts[0].model_mask_BxT is None
        else np.concatenate([p.model_mask_BxT for p in parts]),
        records=None if parts[0].records is None else [x for p in parts for x in p.records])


def merge_reward_metrics(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Per-round reward metrics -> one step's: failure counts add up, the rest average."""
    out: dict[str, float] = {}
    for k in {k for m in rounds for k in m}:
        values = [m[k] for m in rounds if k in m]
        if (k.startswith("rewards/failures") and k != "rewards/failure_frac") or k.startswith(
                SUMMED_METRICS):  # counts add up over rounds
            out[k] = float(sum(values))
        elif k.endswith("_max"):
            out[k] = float(max(values))
        else:
            out[k] = float(sum(values) / len(values))
    return out


@dataclass
class Rollout:
    """One step's batch, ready to train on, and the policy version that sampled it."""

    step: int
    policy_version: int  # the oldest weights any of its completions came from
    data_position: int  # dataset rows consumed once this batch was drawn
    batch: Samples  # what the trainer trains on (after dynamic sampling)
    metrics: dict[str, float]  # rewards, lengths, dynamic sampling, sample/score times


class AdapterSync:
    """LoRA's weight sync: the frozen base moves to the sampler's layout once, then after each
    update only the adapters move, and the sampler's params are put together on its devices:
    "merged" folds W + (alpha / rank)·A·B into a copy of each weight (the sampler runs the plain
    model), "unmerged" hands it the base and the adapters (it runs the model with adapters).

    vLLM has no device layout to move to: "unmerged" hands it the base and the adapters, and it
    loads the base once and serves each new adapter set with its own LoRA support
    (`VllmSampler.enable_adapters`); "merged", and "unmerged" where vLLM cannot serve the
    adapters, push whole merged weights after each update."""

    def __init__(self, trainer: Trainer, sampler: Sampler, resharder: Resharder, mode: str):
        from sampler.vllm_backend import VllmSampler
        from trainer import lora
        from trainer.model import param_shardings

        self.trainer, self.sampler, self.resharder = trainer, sampler, resharder
        self.spec = trainer.mdef.spec
        self.base: Any = None  # the base on the sampler's devices, after the first push
        # vLLM with its LoRA support: only the adapters move after the first push.
        self.vllm_adapters = (isinstance(sampler, VllmSampler) and mode == "unmerged"
                              and sampler.enable_adapters(
                                  trainer.mdef, lora.split,
                                  lora.peft_writer(self.spec, sampler.model_dir)))
        if sampler.shardings is None:  # vLLM: it takes host arrays by HF name
            return
        self.base_shardings, self.adapter_shardings = lora.split(
            param_shardings(trainer.mdef, sampler.submesh))
        if mode == "merged":
            self._compose = jax.jit(lambda b, a: lora.merge(self.spec, b, a),
                                    out_shardings=sampler.shardings)
        else:
            self._compose = lora.combine

    def weights(self) -> tuple[Any, Any]:
        """(the sampler's new params, TransferStats of the adapters' move)."""
        from trainer import lora

        if self.vllm_adapters:
            # vLLM copies host arrays itself (nothing moves on devices); what it takes after
            # the first push is the adapters, so their bytes are the push's.
            adapters, stats = self.resharder.transfer(self.trainer.params, None)
            return lora.combine(self.trainer.base, adapters), stats
        if self.sampler.shardings is None:
            return self.resharder.transfer(self.trainer.merged_params(), None)
        if self.base is None:
            self.base, _ = self.resharder.transfer(self.trainer.base, self.base_shardings)
        adapters, stats = self.resharder.transfer(self.trainer.params, self.adapter_shardings)
        return self._compose(self.base, adapters), stats


class Loop:
    """The two halves of a step; subclasses decide when each runs."""

    schedule = "sync"

    def __init__(self, cfg: JobConfig, tokenizer: Tokenizer, dataset: TaskDataset,
                 trainer: Trainer, sampler: Sampler, resharder: Resharder, rewards: RewardSet,
                 timeline: Timeline | None = None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.dataset = dataset
        self.trainer = trainer
        self.sampler = sampler
        self.resharder = resharder
        self.rewards = rewards
        self.timeline = timeline or Timeline()
        self.rng = jax.random.key(cfg.run.seed)
        self.policy_version = 0  # trainer updates applied so far
        self.sampler_version = 0  # the version of the weights the sampler holds
        self.consumed_position = dataset.position  # rows behind the last *trained* batch
        self._sampler_lock = threading.Lock()  # weight swaps vs. generate() in async mode
        self._pretraced = False  # the trainer was asked to trace its update ahead (step 1)
        self.sample_log: list[dict[str, Any]] = []  # the last trained batch's, run.log_samples
        # Rows are built G at a time from one prompt each (np.repeat in `_sample_and_score`);
        # dynamic sampling and concatenation keep whole groups. So with sampling.share_prompt
        # the sampler and the trainer may run each prompt once per group: decided here, once,
        # and handed to both with the batch.
        self.prompt_group = cfg.sampling.group_size if cfg.sampling.share_prompt else 1
        self.stop_ids = sorted({*tokenizer.stop_ids, *cfg.sampling.stop_tokens})
        # env.name: rows of several turns with an environment (controller/rollout.py).
        self.multiturn = (MultiTurn(cfg, tokenizer, sampler, rewards)
                          if cfg.env.name is not None else None)
        self.adapter_sync = (AdapterSync(trainer, sampler, resharder, cfg.model.lora.sampler)
                             if trainer.lora else None)

    def start(self, resumed_version: int = 0) -> Any:
        """Sets the version counters after a (re)start and pushes weights to the sampler."""
        self.policy_version = self.sampler_version = resumed_version
        self.consumed_position = self.dataset.position
        return self.push_weights(step=resumed_version)

    def sampler_weights(self) -> tuple[Any, int]:
        """The weights the sampler holds now and their policy version, read together (for
        evaluation, which runs its own sampler on them: nothing is copied)."""
        with self._sampler_lock:
            return self.sampler.params, self.sampler_version

    def load_sampler_weights(self, params: Any) -> None:
        """Puts `params` (any layout, e.g. a checkpoint's, restored onto one device) into the
        sampler's layout and dtype and loads them: how `tandem eval` evaluates a policy the
        trainer does not hold."""
        moved, _ = self.resharder.transfer(params, self.sampler.shardings)
        with self._sampler_lock:
            self.sampler.load_weights(moved)

    def push_weights(self, step: int = 0) -> Any:
        """Trainer params -> sampler layout -> sampler.load_weights. Returns TransferStats
        (under LoRA: of the adapters, the only bytes that move after the first push)."""
        with self.timeline.span("reshard", "trainer", step):
            if self.adapter_sync is not None:
                params, stats = self.adapter_sync.weights()
            else:
                params, stats = self.resharder.transfer(self.trainer.params,
                                                        self.sampler.shardings)
        with self._sampler_lock:
            self.sampler.load_weights(params)
            self.sampler_version = self.policy_version
        return stats

    # -- the sampler side ------------------------------------------------------------------

    def _sample_and_score(self, step: int, key: Any, totals: dict[str, float]
                          ) -> tuple[Samples, dict[str, float], int]:
        """Samples G completions for the next prompts_per_step prompts and scores them; adds
        its times and truncated prompts to `totals`."""
        if self.multiturn is not None:
            return self._sample_and_score_turns(step, key, totals)
        g, algo, tl = self.cfg.sampling.group_size, self.cfg.algorithm, self.timeline

        # SAMPLE: G completions for each prompt, on the sampler mesh.
        with tl.span("sample", "sampler", step) as sample_span:
            prompts = self.dataset.next_batch()
            totals["truncated_prompts"] += prompts.truncated
            prompt_tokens = np.repeat(prompts.tokens_PxL, g, axis=0)
            prompt_mask = np.repeat(prompts.mask_PxL, g, axis=0)
            self._pretrace_update(prompt_tokens, prompt_mask)
            with self._sampler_lock:
                version = self.sampler_version
                out = self.sampler.generate(prompt_tokens, prompt_mask, key,
                                            group=self.prompt_group)
            # HOST SYNC: the reward functions need the completion text.
            tokens, mask, logps = jax.device_get((out.tokens_BxT, out.mask_BxT, out.logps_BxT))

        # SCORE: text -> rewards (Python, on the host).
        with tl.span("score", "host", step) as score_span:
            rows = [r for r in prompts.rows for _ in range(g)]
            texts = [self.tokenizer.decode(t) for t in tokens]
            ids = [t[m].tolist() for t, m in zip(tokens, mask, strict=True)]
            # reward/<label>[/<component>] and rewards/failures_<kind> metrics come back too.
            scored = self.rewards.score_each([r["prompt"] for r in rows], texts, rows, ids)
            reward_metrics = scored.metrics
            scores_B = np.asarray(scored.totals, np.float32)
            parts_BxF = np.asarray(list(scored.each.values()), np.float32).T.reshape(
                len(rows), len(scored.each))
            # Truncated: no stop id within max_new_tokens, where the stop ids are the ones the
            # sampler stops on (the tokenizer's and sampling.stop_tokens).
            truncated_B = ~np.isin(tokens, self.stop_ids).any(axis=1)
            rewards_B = scores_B
            if algo.overlong_buffer_len is not None:
                # DAPO soft overlong punishment: lengths in the last L_cache tokens pay linearly.
                rewards_B = scores_B + soft_overlong_penalty(
                    mask.sum(axis=1), self.cfg.sampling.max_new_tokens, algo.overlong_buffer_len,
                    algo.overlong_penalty_factor)
        totals["sample"] += sample_span.seconds
        totals["reward"] += score_span.seconds
        samples = Samples(rows, prompt_tokens, prompt_mask, tokens, mask, logps, truncated_B,
                          scores_B, rewards_B, parts_BxF)
        return samples, reward_metrics, version

    def _sample_and_score_turns(self, step: int, key: Any, totals: dict[str, float]
                                ) -> tuple[Samples, dict[str, float], int]:
        """`_sample_and_score` for multi-turn rows (env.name): the environment renders the
        prompts, the rows play their turns (controller/rollout.py), and the reward functions
        score each row's `Environment.answer` (its last model turn by default), plus w_env
        times the environment's own score."""
        g, algo, tl = self.cfg.sampling.group_size, self.cfg.algorithm, self.timeline
        mt = self.multiturn
        assert mt is not None
        with tl.span("sample", "sampler", step) as sample_span:
            prompts = self.dataset.next_batch()
            totals["truncated_prompts"] += prompts.truncated
            started = mt.begin([r for r in prompts.rows for _ in range(g)], self.prompt_group)
            self._pretrace_update(started.prompt_BxP, started.pmask_BxP)
            with self._sampler_lock:
                version = self.sampler_version
                done = mt.run(started, key)  # HOST SYNC inside: every turn's tokens
        with tl.span("score", "host", step) as score_span:
            packed, rows = done.packed, done.rows
            ids = [t[m].tolist() for t, m in zip(packed.tokens_BxT, packed.model_mask_BxT,
                                                 strict=True)]
            scored = self.rewards.score_each([r["prompt"] for r in rows], done.final_texts,
                                             rows, ids)
            reward_metrics = {**scored.metrics, **done.metrics}
            scores_B = np.asarray(scored.totals, np.float32)
            if done.env_scored:
                scores_B = scores_B + np.float32(self.cfg.env.reward_weight) * done.env_scores_B
                reward_metrics["reward/env"] = float(done.env_scores_B.mean())
            parts_BxF = np.asarray(list(scored.each.values()), np.float32).T.reshape(
                len(rows), len(scored.each))
            rewards_B = scores_B
            if algo.overlong_buffer_len is not None:
                rewards_B = scores_B + soft_overlong_penalty(
                    packed.mask_BxT.sum(axis=1), self.cfg.completion_tokens,
                    algo.overlong_buffer_len, algo.overlong_penalty_factor)
        totals["sample"] += sample_span.seconds
        totals["reward"] += score_span.seconds
        samples = Samples(rows, done.prompt_BxP, done.pmask_BxP, packed.tokens_BxT,
                          packed.mask_BxT, packed.logps_BxT, done.truncated_B, scores_B,
                          rewards_B, parts_BxF, model_mask_BxT=packed.model_mask_BxT,
                          records=done.records)
        return samples, reward_metrics, version

    def produce(self, step: int) -> Rollout:
        """Samples and scores one step's batch (with DAPO dynamic sampling when configured)."""
        cfg, algo = self.cfg, self.cfg.algorithm
        g, want = cfg.sampling.group_size, cfg.data.prompts_per_step
        totals = {"sample": 0.0, "reward": 0.0, "truncated_prompts": 0.0}

        # DAPO dynamic sampling: keep only groups whose rewards differ (the others have zero
        # advantage), and sample more prompts until `want` groups, or the retries, run out.
        key = jax.random.fold_in(self.rng, step)
        seen: list[Samples] = []
        kept: list[Samples] = []
        dropped: list[Samples] = []
        reward_rounds: list[dict[str, float]] = []
        versions: list[int] = []
        n_kept = 0
        rounds = 1 + (algo.dynamic_sampling_max_retries if algo.dynamic_sampling else 0)
        for attempt in range(rounds):
            r, reward_metrics, version = self._sample_and_score(
                step, key if attempt == 0 else jax.random.fold_in(key, attempt), totals)
            seen.append(r)
            reward_rounds.append(reward_metrics)
            versions.append(version)
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
            kept.append(concat_samples(dropped, self.tokenizer.pad_id).groups(
                np.arange(shortfall), g))
        batch = concat_samples(kept, self.tokenizer.pad_id)
        everything = concat_samples(seen, self.tokenizer.pad_id)

        lengths = everything.mask_BxT.sum(axis=1)
        metrics = {
            # Over every completion sampled this step (all dynamic-sampling rounds).
            "reward/mean": float(everything.scores_B.mean()),
            "reward/std": float(everything.scores_B.std()),
            **merge_reward_metrics(reward_rounds),
            "completion/len_mean": float(lengths.mean()),
            "completion/tokens": float(lengths.sum()),
            "completion/stopped_frac": float(1.0 - everything.truncated_B.mean()),
            "time/sample_s": totals["sample"],
            "time/reward_s": totals["reward"],
            **self.sampler.metrics(),  # sampler/compiles, sampler/kept_mass
            **(self.multiturn.metrics() if self.multiturn is not None else {}),
        }
        if algo.overlong_buffer_len is not None:
            metrics["reward/overlong_penalty_mean"] = float(
                (everything.rewards_B - everything.scores_B).mean())
        if cfg.data.truncate_prompts:
            # Prompts drawn this step (all dynamic-sampling rounds) cut to the prompt budget.
            metrics["data/truncated_prompts"] = totals["truncated_prompts"]
        if algo.overlong_filtering:
            metrics["overlong/filtered_frac"] = float(batch.truncated_B.mean())
        if algo.dynamic_sampling:
            metrics["dynamic_sampling/rounds"] = float(len(seen))
            metrics["dynamic_sampling/groups_filtered"] = float(n_filtered)
            metrics["dynamic_sampling/shortfall_groups"] = float(shortfall)
            metrics["dynamic_sampling/kept_frac"] = float(
                n_kept / max(len(everything.rows) // g, 1))
        return Rollout(step, min(versions), self.dataset.position, batch, metrics)

    # -- the trainer side ------------------------------------------------------------------

    def _train_batch(self, batch: Samples) -> TrainBatch:
        """The trainer's host batch (advantages still zero), in one fixed set of dtypes."""
        # Overlong filtering (DAPO): truncated completions keep their reward in the group
        # statistics but contribute no loss.
        mask_BxT = np.asarray(batch.mask_BxT, bool)
        loss_mask = mask_BxT
        if batch.model_mask_BxT is not None:
            # Multi-turn: observation tokens are attended (mask_BxT) but carry no loss and
            # count in no aggregation; only the model's own tokens have behaviour logprobs.
            loss_mask = np.asarray(batch.model_mask_BxT, bool)
        if self.cfg.algorithm.overlong_filtering:
            loss_mask = loss_mask & ~np.asarray(batch.truncated_B, bool)[:, None]
        # Prompt columns left-padded (masked) to the sampler's bucket width: the trainer, too,
        # compiles once per bucket rather than once per prompt width.
        width = bucket_width(batch.prompt_tokens_BxP.shape[1], self.cfg.sampling.prompt_bucket)
        prompt_BxP, pmask_BxP = left_pad(np.asarray(batch.prompt_tokens_BxP, np.int32),
                                         np.asarray(batch.prompt_mask_BxP, bool), width,
                                         self.tokenizer.pad_id)
        return TrainBatch(prompt_BxP, pmask_BxP, np.asarray(batch.tokens_BxT, np.int32),
                          mask_BxT, np.zeros(len(batch.rows), np.float32),
                          np.asarray(batch.logps_BxT, np.float32), loss_mask,
                          sampled_mask_BxT=None if batch.model_mask_BxT is None
                          else np.asarray(batch.model_mask_BxT, bool),
                          group=self.prompt_group)

    def _pretrace_update(self, prompt_tokens: np.ndarray, prompt_mask: np.ndarray) -> None:
        """Has the trainer trace its update for this step's batch shapes while the sampler
        compiles and samples (first step only; see `Trainer.pretrace`)."""
        if self._pretraced:
            return
        self._pretraced = True
        b, t = len(prompt_tokens), self.cfg.completion_tokens
        placeholder = Samples([{}] * b, prompt_tokens, prompt_mask, np.zeros((b, t), np.int32),
                              np.ones((b, t), bool), np.zeros((b, t), np.float32),
                              np.zeros(b, bool), np.zeros(b, np.float32), np.zeros(b, np.float32),
                              np.zeros((b, 0), np.float32),
                              model_mask_BxT=None if self.multiturn is None
                              else np.ones((b, t), bool))
        self.trainer.pretrace(self._train_batch(placeholder))

    def consume(self, r: Rollout) -> dict[str, float]:
        algo, g, tl = self.cfg.algorithm, self.cfg.sampling.group_size, self.timeline
        batch = r.batch
        train = self._train_batch(batch)
        loss_mask = train.loss_mask_BxT

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
        if self.cfg.run.log_samples:
            self.sample_log = self._sample_records(r, adv_PxG.reshape(-1))

        # UPDATE: μ × minibatches optimizer steps, one jitted, sharded call on the trainer
        # mesh (the reference model's forward pass runs inside the same program). Off-policy
        # batches (async) are corrected by the truncated importance ratio against the
        # behaviour logprobs.
        staleness = self.policy_version - r.policy_version
        with tl.span("update", "trainer", r.step) as update_span:
            aux = self.trainer.update(train, off_policy=staleness > 0)
            aux = jax.device_get(aux)  # HOST SYNC: wait for the update and read its metrics.
        self.policy_version += 1
        self.consumed_position = r.data_position

        # RESHARD: new weights from the trainer layout to the sampler layout.
        stats = self.push_weights(r.step)  # HOST SYNC inside: timed to completion.

        return {
            "step": float(r.step),
            **r.metrics,
            "advantages/mean": float(adv_PxG.mean()),
            "advantages/std": float(adv_PxG.std()),
            "advantages/zero_frac": float((np.abs(adv_PxG) == 0).mean()),
            **kl_metrics,
            **{k: to_float(v) for k, v in aux.items()},
            "time/update_s": update_span.seconds,
            "time/reshard_s": stats.seconds,
            "reshard/bytes": float(stats.bytes),
            "reshard/gbps": stats.gbps,
            "policy/version": float(self.policy_version),
            "policy/staleness": float(staleness),
        }

    def _sample_records(self, r: Rollout, advantages_B: np.ndarray) -> list[dict[str, Any]]:
        """The first run.log_samples rollouts of a batch, as samples.jsonl lines."""
        b = r.batch
        out = []
        for i in range(min(self.cfg.run.log_samples, len(b.rows))):
            row = b.rows[i]
            out.append({
                "step": r.step,
                "prompt": row["prompt"] if isinstance(row.get("prompt"), str) else row,
                "completion": self.tokenizer.decode(b.tokens_BxT[i]),
                "reward": float(b.rewards_B[i]),
                "rewards": dict(zip(self.rewards.names, map(float, b.parts_BxF[i]),
                                    strict=True)),
                "advantage": float(advantages_B[i]),
                "length": int(np.asarray(b.mask_BxT[i]).sum()),
                "truncated": bool(b.truncated_B[i]),
                "policy_version": r.policy_version,
            })
            if b.records is not None:  # multi-turn: the whole row, and how it went
                out[-1]["completion"] = b.records[i]["transcript"]
                out[-1].update({k: v for k, v in b.records[i].items() if k != "transcript"})
        return out

    # -- schedule interface ------------------------------------------------------------------

    def step(self, step: int) -> dict[str, float]:
        raise NotImplementedError

    def close(self) -> None:
        """Stops any threads and tool workers; safe to call more than once."""
        if self.multiturn is not None:
            self.multiturn.close()


class SyncLoop(Loop):
    """Each phase waits for the one before it: sample -> score -> update -> reshard."""

    schedule = "sync"

    def step(self, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        m = self.consume(self.produce(step))
        m["time/step_s"] = time.perf_counter() - t0
        return m


class AsyncLoop(Loop):
    """Bounded staleness: the sampler runs up to k = max_staleness versions ahead.

    The batch for step n is sampled once the sampler holds weights of version >= n - 1 - k,
    so with k = 0 every batch is sampled by the latest policy and the run equals `SyncLoop`
    for the same seed. The producer thread samples and scores; the caller's thread trains.
    """

    schedule = "async"

    def __init__(self, *args: Any, max_staleness: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.max_staleness = max_staleness
        self._queue: queue.Queue[Rollout | BaseException] = queue.Queue(
            maxsize=max_staleness + 1)
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_step = 1
        self._awaited_version: int | None = None  # set while the producer waits for weights
        self.dropped = 0

    def _ensure_started(self, first_step: int) -> None:
        if self._thread is None:
            self._next_step = first_step
            self._thread = threading.Thread(target=self._produce_forever, daemon=True,
                                            name="tandem-sampler")
            self._thread.start()

    def _produce_forever(self) -> None:
        n = self._next_step
        try:
            while not self._stop.is_set():
                with self._cond:  # wait until the sampler's weights are recent enough
                    self._awaited_version = n - 1 - self.max_staleness
                    while (self.sampler_version < n - 1 - self.max_staleness
                           and not self._stop.is_set()):
                        self._cond.wait(timeout=0.1)
                    self._awaited_version = None
                if self._stop.is_set():
                    return
                rollout = self.produce(n)
                while not self._stop.is_set():
                    try:
                        self._queue.put(rollout, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                n += 1
        except BaseException as e:  # surfaced in the training thread
            self._queue.put(e)

    def push_weights(self, step: int = 0) -> Any:
        stats = super().push_weights(step)
        cond = getattr(self, "_cond", None)
        if cond is not None:
            with cond:
                cond.notify_all()
        return stats

    def step(self, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        self._ensure_started(step)
        while True:
            with self.timeline.span("wait", "trainer", step):
                item = self._next_rollout()  # HOST SYNC: wait for a scored batch
            if isinstance(item, BaseException):
                raise item
            if self.policy_version - item.policy_version <= self.max_staleness:
                break
            self.dropped += 1  # too stale to train on; counted, never silently used
        assert item.step == step, (item.step, step)  # one producer, steps in order
        m = self.consume(item)
        m["async/dropped_batches"] = float(self.dropped)
        m["time/step_s"] = time.perf_counter() - t0
        return m

    def _next_rollout(self) -> Rollout | BaseException:
        """The producer's next item. Never waits forever: a producer thread that died without
        reporting, or one that waits for weights only this (waiting) thread could push, is an
        error rather than a hang."""
        while True:
            try:
                return self._queue.get(timeout=WAIT_POLL_S)
            except queue.Empty:
                pass
            if self._thread is None or not self._thread.is_alive():
                raise RuntimeError("the sampler thread stopped without a batch or an error")
            with self._cond:
                awaited = self._awaited_version
            # Only this thread pushes weights, and it is waiting here: if the producer waits
            # for a version the sampler does not hold, neither side can ever move.
            if awaited is not None and self.sampler_version < awaited and self._queue.empty():
                raise RuntimeError(
                    f"the async loop is stuck: the sampler thread waits for weights of version "
                    f">= {awaited}, the sampler holds version {self.sampler_version} and the "
                    f"trainer (version {self.policy_version}) waits for a batch; the weight "
                    f"push after an update did not reach the sampler")

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None
        super().close()


def build_loop(cfg: JobConfig, *args: Any, **kwargs: Any) -> Loop:
    if cfg.schedule.kind == "async":
        return AsyncLoop(cfg, *args, max_staleness=cfg.schedule.max_staleness, **kwargs)
    return SyncLoop(cfg, *args, **kwargs)
