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

from collections.abc import Callable
from typing import Any

from controller.config import JobConfig
from controller.metrics import MetricsLog
from controller.topology import configure_devices
from deploy.pathways import initialize_pathways


class Job:
    """A GRPO job: meshes, model, trainer, sampler, rewards and the loop that drives them."""

    def __init__(self, config: JobConfig | None = None):
        self.config = cfg = config or JobConfig()
        initialize_pathways()  # no-op unless JAX_PLATFORMS=proxy; must precede jax.devices()
        configure_devices(cfg.topology)  # before anything touches jax.devices()

        from controller.data import build_dataset, build_tokenizer
        from controller.loop import SyncLoop
        from controller.topology import build_meshes
        from reshard.transfer import Resharder
        from rewards.registry import RewardSet
        from sampler.jax_sampler import JaxSampler
        from trainer.model import ModelSpec, define_model, init_params, param_count
        from trainer.optim import build_optimizer, build_schedule
        from trainer.trainer import Trainer

        self.meshes = build_meshes(cfg.topology)
        self.tokenizer = build_tokenizer(cfg)
        self.rewards = RewardSet(cfg.rewards.functions, cfg.rewards.weights)
        spec = ModelSpec.from_config(cfg.model, self.tokenizer.vocab_size)
        self.model_def = define_model(spec)
        params = init_params(spec, cfg.model.init_seed)
        self.num_params = param_count(params)
        # η(s) over optimizer steps: μ × num_minibatches per GRPO step.
        schedule = build_schedule(cfg.optimizer, cfg.run.steps * cfg.algorithm.num_iterations
                                  * cfg.algorithm.num_minibatches)
        self.trainer = Trainer(self.model_def, params, build_optimizer(cfg.optimizer, schedule),
                               self.meshes.trainer, cfg.algorithm, cfg.sampling.temperature,
                               lr_schedule=schedule)
        self.sampler = JaxSampler(self.model_def, self.meshes.sampler, cfg.sampling,
                                  pad_id=self.tokenizer.pad_id,
                                  stop_ids=(self.tokenizer.stop_id,))
        self.dataset = build_dataset(cfg, self.tokenizer)
        self.loop = SyncLoop(cfg, self.tokenizer, self.dataset, self.trainer, self.sampler,
                             Resharder(), self.rewards)
        self.loop.push_weights()  # the sampler starts from the trainer's initial weights
        self.log = MetricsLog(cfg.run.output_dir)
        if cfg.run.output_dir:
            from pathlib import Path

            (Path(cfg.run.output_dir) / "config.yaml").write_text(cfg.to_yaml())
        self.steps_done = 0

    @property
    def metrics(self) -> list[dict[str, float]]:
        """Every completed step's metrics, in order."""
        return self.log.history

    def step(self) -> dict[str, float]:
        """Runs one GRPO step and returns its metrics."""
        m = self.loop.step(self.steps_done + 1)
        self.steps_done += 1
        self.log.append(m)
        return m

    def run(self, steps: int | None = None,
            on_step: Callable[[dict[str, float]], Any] | None = None) -> list[dict[str, float]]:
        """Runs until `steps` steps (default: run.steps) are done in total."""
        target = steps if steps is not None else self.config.run.steps
        while self.steps_done < target:
            m = self.step()
            if on_step is not None:
                on_step(m)
        return self.metrics

    def summary(self) -> dict[str, Any]:
        return self.log.summary()

    def close(self) -> None:
        self.log.close()

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
