"""The Python controller API.

    from controller.api import Job
    from controller.config import load_config

    with Job(load_config(overrides=["run.steps=20"])) as job:
        metrics = job.step()      # one GRPO step -> {"reward/mean": ..., ...}
        history = job.run()       # the remaining steps
        print(job.summary())

In CPU-proxy simulation (the default) the Job makes JAX's CPU backend expose
`topology.simulated_devices` devices; construct it before any other JAX operation runs.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from controller.config import ConfigError, JobConfig
from controller.metrics import MetricsLog
from controller.topology import configure_devices
from deploy.pathways import initialize_pathways

log = logging.getLogger(__name__)


class Job:
    """A GRPO job: meshes, model, trainer, sampler, rewards and the loop that drives them."""

    def __init__(self, config: JobConfig | None = None):
        self.config = cfg = config or JobConfig()
        # No-op unless JAX_PLATFORMS=proxy; must precede anything that touches jax.devices().
        self.pathways = initialize_pathways(cfg.topology.backend)
        configure_devices(cfg.topology)  # before anything touches jax.devices()

        from controller.data import build_dataset, build_tokenizer
        from controller.loop import build_loop
        from controller.timeline import Timeline
        from controller.topology import build_meshes
        from reshard.transfer import Resharder
        from rewards.registry import RewardSet
        from sampler.factory import build_sampler
        from trainer.model import (
            ModelSpec,
            define_model,
            init_params,
            param_count,
            param_shardings,
        )
        from trainer.optim import build_optimizer
        from trainer.trainer import Trainer

        self.meshes = build_meshes(cfg.topology, colocated=cfg.schedule.kind == "colocated")
        self.tokenizer = build_tokenizer(cfg)
        self.rewards = RewardSet.from_config(cfg.rewards)  # may start worker processes
        if cfg.model.path:
            # A Hugging Face checkpoint, read straight into the trainer's sharding.
            from trainer.hf import load_hf_params, load_hf_spec

            spec = load_hf_spec(cfg.model.path, cfg.model.dtype)
            if self.tokenizer.vocab_size > spec.vocab_size:
                raise ValueError(
                    f"model.path={cfg.model.path!r}: the tokenizer has {self.tokenizer.vocab_size} "
                    f"ids but the model only {spec.vocab_size} embeddings (fix: use the tokenizer "
                    f"that belongs to this checkpoint)")
            self.model_def = define_model(spec)
            params = load_hf_params(cfg.model.path, self.model_def,
                                    shardings=param_shardings(self.model_def, self.meshes.trainer))
        else:
            spec = ModelSpec.from_config(cfg.model, self.tokenizer.vocab_size)
            self.model_def = define_model(spec)
            params = init_params(spec, cfg.model.init_seed)
        self.num_params = param_count(params)
        self.trainer = Trainer(self.model_def, params, build_optimizer(cfg.optimizer),
                               self.meshes.trainer, cfg.algorithm, cfg.sampling.temperature,
                               is_cap=cfg.schedule.is_cap)
        hf_dir, to_hf = None, None
        if cfg.model.path and cfg.sampling.backend == "vllm":
            # vLLM serves the HF directory and takes each new policy by HF tensor name.
            from trainer.hf import hf_named_arrays

            hf_dir, to_hf = cfg.model.path, lambda p: hf_named_arrays(self.model_def.spec, p)
        self.sampler = build_sampler(cfg.sampling, self.model_def, self.meshes.sampler,
                                     pad_id=self.tokenizer.pad_id,
                                     stop_ids=tuple(self.tokenizer.stop_ids),
                                     param_dtype=cfg.reshard.dtype,
                                     hf_model_dir=hf_dir, to_hf=to_hf)
        self.dataset = build_dataset(cfg, self.tokenizer)
        self.timeline = Timeline()
        resharder = Resharder(dtype=cfg.reshard.dtype, chunk_bytes=cfg.reshard.chunk_bytes,
                              donate=cfg.reshard.donate, method=cfg.reshard.method)
        self.loop = build_loop(cfg, self.tokenizer, self.dataset, self.trainer, self.sampler,
                               resharder, self.rewards, timeline=self.timeline)
        self.steps_done = 0
        self.resumed_from: int | None = None
        self._stop_requested = False
        self._checkpoint_requested = False
        self.checkpointer = self._open_checkpoints()
        # The sampler starts from the trainer's weights (initial, or just restored).
        self.loop.start(resumed_version=self.steps_done)
        self.log = MetricsLog(cfg.run.output_dir, resume_step=self.resumed_from,
                              sinks=self._extra_sinks())
        if cfg.run.output_dir:
            (Path(cfg.run.output_dir) / "config.yaml").write_text(cfg.to_yaml())

    def _extra_sinks(self) -> list[Any]:
        from controller.metrics import TensorBoardSink, WandbSink

        cfg, sinks = self.config, []
        if cfg.run.tensorboard:
            if not cfg.run.output_dir:
                raise ConfigError("run.tensorboard=true needs run.output_dir (fix: e.g. "
                                  "run.output_dir=runs/my-run)")
            sinks.append(TensorBoardSink(Path(cfg.run.output_dir) / "tensorboard"))
        if cfg.run.wandb_project:
            sinks.append(WandbSink(cfg.run.wandb_project, cfg.run.name,
                                   cfg.model_dump(mode="json"), cfg.run.output_dir))
        return sinks

    # -- checkpoints -----------------------------------------------------------------------

    def _open_checkpoints(self) -> Any:
        """Opens the checkpoint directory; on run.resume restores the newest good checkpoint."""
        cfg = self.config
        directory = cfg.checkpoint_dir
        if directory is None:
            if cfg.run.resume:
                raise ConfigError(
                    "run.resume=true but there is no checkpoint directory (fix: set "
                    "run.output_dir or checkpoint.dir to the run to resume)")
            return None
        from trainer.checkpoint import Checkpointer, abstract_like

        ckpt = Checkpointer(directory, keep_last=cfg.checkpoint.keep_last,
                            async_save=cfg.checkpoint.async_save)
        metrics_file = Path(cfg.run.output_dir or directory) / "metrics.jsonl"
        if not cfg.run.resume:
            if ckpt.steps() or (metrics_file.exists() and metrics_file.stat().st_size):
                raise ConfigError(
                    f"{directory} already holds a run (checkpoints {ckpt.steps()}); nothing is "
                    f"overwritten (fix: run.resume=true to continue it, or a new "
                    f"run.output_dir)")
            return ckpt
        found = ckpt.restore_latest(abstract_like(self.trainer.state))
        if found is None:
            log.warning("run.resume=true but %s has no usable checkpoint: starting fresh",
                        directory)
            return ckpt
        _, state, meta = found
        self.trainer.restore_state(state)
        self.dataset.position = int(meta["data_position"])
        self.steps_done = self.resumed_from = int(meta["step"])
        return ckpt

    def _checkpoint_meta(self) -> dict[str, Any]:
        import jax

        return {
            "step": self.steps_done,
            "policy_version": self.loop.policy_version,
            # Rows behind the last trained batch: an async sampler may have drawn more, and
            # those batches are sampled again after a resume.
            "data_position": self.loop.consumed_position,
            # Sampling keys are fold_in(key(run.seed), step): the seed and step are the state.
            "rng": {"seed": self.config.run.seed,
                    "key_data": jax.random.key_data(self.loop.rng).tolist()},
            "config": self.config.model_dump(mode="json"),
            "config_digest": self.config.digest(),
        }

    def save_checkpoint(self, *, wait: bool = False) -> bool:
        """Saves the current state (asynchronously unless `wait`). False if not configured."""
        if self.checkpointer is None:
            return False
        if self.checkpointer.steps()[-1:] == [self.steps_done]:
            return True  # this step is already saved
        self.checkpointer.save(self.steps_done, self.trainer.state, self._checkpoint_meta(),
                               wait=wait)
        return True

    def request_checkpoint(self) -> None:
        """Asks for a checkpoint after the current step (safe from any thread)."""
        self._checkpoint_requested = True

    def request_stop(self) -> None:
        """Asks the job to stop after the current step, with a checkpoint (any thread)."""
        self._stop_requested = True

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested

    @property
    def metrics(self) -> list[dict[str, float]]:
        """Every completed step's metrics, in order."""
        return self.log.history

    def step(self) -> dict[str, float]:
        """Runs one GRPO step and returns its metrics."""
        m = self.loop.step(self.steps_done + 1)
        self.steps_done += 1
        self.log.append(m)
        every = self.config.checkpoint.every_steps
        if self._checkpoint_requested or (every and self.steps_done % every == 0):
            self._checkpoint_requested = False
            self.save_checkpoint()
        return m

    def run(self, steps: int | None = None,
            on_step: Callable[[dict[str, float]], Any] | None = None) -> list[dict[str, float]]:
        """Runs until `steps` steps (default: run.steps) are done in total."""
        target = steps if steps is not None else self.config.run.steps
        with _graceful_signals(self):
            while self.steps_done < target and not self._stop_requested:
                m = self.step()
                if on_step is not None:
                    on_step(m)
        # The end of a run, or a stop: a complete checkpoint of where it got to.
        self.save_checkpoint(wait=True)
        return self.metrics

    def save_hf_model(self, path: str, *, max_shard_bytes: int = 4 * 1024**3,
                      overwrite: bool = False) -> Any:
        """Writes the current policy as a Hugging Face directory (config, safetensors shards,
        and, when the job started from model.path, its tokenizer and generation files)."""
        from trainer.hf import save_hf_model

        return save_hf_model(path, self.model_def.spec, self.trainer.params,
                             source_dir=self.config.model.path, max_shard_bytes=max_shard_bytes,
                             overwrite=overwrite)

    def summary(self) -> dict[str, Any]:
        """First vs last reward, step time, sync bandwidth, and the timeline's busy/idle/overlap
        fractions per mesh (from step 2 on: step 1 is mostly compilation)."""
        return {**self.log.summary(), **self.timeline.summary(since_step=2)}

    def close(self) -> None:
        """Stops the sampler thread (async), waits for saves, closes sinks; idempotent."""
        self.loop.close()
        if self.config.run.output_dir and self.timeline.spans:
            self.timeline.write_chrome_trace(Path(self.config.run.output_dir) / "trace.json")
        if self.checkpointer is not None:
            self.checkpointer.close()  # waits for background saves to finish
            self.checkpointer = None
        self.log.close()
        self.rewards.close()  # stops reward worker processes / Ray actors

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@contextlib.contextmanager
def _graceful_signals(job: Job) -> Iterator[None]:
    """SIGTERM / SIGINT ask the job to stop after the current step (and save); a second
    SIGINT interrupts at once. Cluster preemption sends SIGTERM first, so this is the path
    that keeps a preempted run's progress."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and job.stop_requested:
            raise KeyboardInterrupt
        log.warning("%s: stopping after the current step", signal.Signals(signum).name)
        job.request_stop()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
