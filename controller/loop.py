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

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

from controller.advantages import grpo_advantages
from controller.config import JobConfig
from controller.data import TaskDataset
from controller.metrics import to_float
from controller.timeline import Timeline
from controller.tokenizer import CharTokenizer
from reshard.transfer import Resharder
from rewards.registry import RewardSet
from sampler.base import Sampler
from trainer.trainer import TrainBatch, Trainer


@dataclass
class Rollout:
    """One step's scored completions (host arrays), and the policy version that made them."""

    step: int
    policy_version: int
    data_position: int  # dataset rows consumed once this batch was drawn
    rows: list[dict[str, Any]]
    prompt_tokens_BxP: np.ndarray
    prompt_mask_BxP: np.ndarray
    tokens_BxT: np.ndarray
    mask_BxT: np.ndarray
    logps_BxT: np.ndarray  # behaviour logprobs: what the sampler drew each token with
    rewards_PxG: np.ndarray
    reward_metrics: dict[str, float]
    times: dict[str, float] = field(default_factory=dict)


class Loop:
    """The two halves of a step; subclasses decide when each runs."""

    schedule = "sync"

    def __init__(self, cfg: JobConfig, tokenizer: CharTokenizer, dataset: TaskDataset,
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

    def start(self, resumed_version: int = 0) -> Any:
        """Sets the version counters after a (re)start and pushes weights to the sampler."""
        self.policy_version = self.sampler_version = resumed_version
        self.consumed_position = self.dataset.position
        return self.push_weights(step=resumed_version)

    def push_weights(self, step: int = 0) -> Any:
        """Trainer params -> sampler layout -> sampler.load_weights. Returns TransferStats."""
        with self.timeline.span("reshard", "trainer", step):
            params, stats = self.resharder.transfer(self.trainer.params, self.sampler.shardings)
        with self._sampler_lock:
            self.sampler.load_weights(params)
            self.sampler_version = self.policy_version
        return stats

    # -- the sampler side ------------------------------------------------------------------

    def produce(self, step: int) -> Rollout:
        g = self.cfg.sampling.group_size
        tl = self.timeline

        # SAMPLE: G completions for each prompt, on the sampler mesh.
        with tl.span("sample", "sampler", step) as sample_span:
            prompts = self.dataset.next_batch()
            prompt_tokens = np.repeat(prompts.tokens_PxL, g, axis=0)
            prompt_mask = np.repeat(prompts.mask_PxL, g, axis=0)
            key = jax.random.fold_in(self.rng, step)
            with self._sampler_lock:
                version = self.sampler_version
                out = self.sampler.generate(prompt_tokens, prompt_mask, key)
            # HOST SYNC: the reward functions need the completion text.
            tokens, mask, logps = jax.device_get((out.tokens_BxT, out.mask_BxT, out.logps_BxT))

        # SCORE: text -> rewards (Python, on the host).
        with tl.span("score", "host", step) as score_span:
            rows = [r for r in prompts.rows for _ in range(g)]
            texts = [self.tokenizer.decode(t) for t in tokens]
            ids = [t[m].tolist() for t, m in zip(tokens, mask, strict=True)]
            # reward/<label>[/<component>] and rewards/failures_<kind> metrics come back too.
            rewards, reward_metrics = self.rewards.score(
                [r["prompt"] for r in rows], texts, rows, ids)
            rewards_PxG = np.asarray(rewards, np.float32).reshape(-1, g)
        return Rollout(step, version, self.dataset.position, prompts.rows, prompt_tokens,
                       prompt_mask, tokens, mask, logps, rewards_PxG, reward_metrics,
                       {"time/sample_s": sample_span.seconds,
                        "time/reward_s": score_span.seconds,
                        **self.sampler.metrics()})  # sampler/compiles, sampler/kept_mass

    # -- the trainer side ------------------------------------------------------------------

    def consume(self, r: Rollout) -> dict[str, float]:
        tl = self.timeline
        # ADVANTAGES: group-relative, A = (r - mean_g) / (std_g + eps).
        adv_B = grpo_advantages(r.rewards_PxG, self.cfg.algorithm.advantage_eps).reshape(-1)

        # UPDATE: one jitted, sharded GRPO step on the trainer mesh (the reference model's
        # forward pass runs inside the same program). Off-policy batches (async) are corrected
        # by the truncated importance ratio against the behaviour logprobs.
        staleness = self.policy_version - r.policy_version
        with tl.span("update", "trainer", r.step) as update_span:
            aux = self.trainer.update(
                TrainBatch(r.prompt_tokens_BxP, r.prompt_mask_BxP, r.tokens_BxT, r.mask_BxT,
                           adv_B, r.logps_BxT), off_policy=staleness > 0)
            aux = jax.device_get(aux)  # HOST SYNC: wait for the update and read its metrics.
        self.policy_version += 1
        self.consumed_position = r.data_position

        # RESHARD: new weights from the trainer layout to the sampler layout.
        stats = self.push_weights(r.step)  # HOST SYNC inside: timed to completion.

        lengths = r.mask_BxT.sum(axis=1)
        return {
            "step": float(r.step),
            "reward/mean": float(r.rewards_PxG.mean()),
            "reward/std": float(r.rewards_PxG.std()),
            **r.reward_metrics,
            "completion/len_mean": float(lengths.mean()),
            "completion/tokens": float(lengths.sum()),
            "completion/stopped_frac": float(
                np.isin(r.tokens_BxT, list(self.tokenizer.stop_ids)).any(axis=1).mean()),
            **{k: to_float(v) for k, v in aux.items()},
            **r.times,
            "time/update_s": update_span.seconds,
            "time/reshard_s": stats.seconds,
            "reshard/bytes": float(stats.bytes),
            "reshard/gbps": stats.gbps,
            "policy/version": float(self.policy_version),
            "policy/staleness": float(staleness),
        }

    # -- schedule interface ------------------------------------------------------------------

    def step(self, step: int) -> dict[str, float]:
        raise NotImplementedError

    def close(self) -> None:
        """Stops any threads; safe to call more than once."""


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
                    while (self.sampler_version < n - 1 - self.max_staleness
                           and not self._stop.is_set()):
                        self._cond.wait(timeout=0.1)
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
                item = self._queue.get()  # HOST SYNC: wait for a scored batch
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

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None


def build_loop(cfg: JobConfig, *args: Any, **kwargs: Any) -> Loop:
    if cfg.schedule.kind == "async":
        return AsyncLoop(cfg, *args, max_staleness=cfg.schedule.max_staleness, **kwargs)
    return SyncLoop(cfg, *args, **kwargs)
