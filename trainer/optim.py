"""The optax optimizer from config."""

from __future__ import annotations

import optax

from controller.config import OptimizerConfig


def build_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    lr: optax.ScalarOrSchedule = cfg.learning_rate
    if cfg.warmup_steps:
        lr = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
    parts = []
    if cfg.max_grad_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    parts.append(optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay))
    return optax.chain(*parts)
