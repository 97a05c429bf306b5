"""The optax optimizer and learning-rate schedule from config.

    η(s) = η · s / W                                   for s < W (linear warmup; W may be 0)
    η(s) = η                                           "constant"
    η(s) = η · (r + (1 - r) · ½(1 + cos(π (s - W) / (D - W))))   "cosine", r = min_lr_ratio

s counts optimizer steps (μ × num_minibatches per GRPO batch), D = decay_steps.
"""

from __future__ import annotations

import optax

from controller.config import OptimizerConfig


def build_schedule(cfg: OptimizerConfig, total_steps: int | None = None) -> optax.Schedule:
    """η(s) from the config; `total_steps` is D when `decay_steps` is unset."""
    peak = cfg.learning_rate
    if cfg.lr_schedule == "constant":
        after: optax.Schedule = optax.constant_schedule(peak)
    elif cfg.lr_schedule == "cosine":
        decay = cfg.decay_steps or total_steps
        if decay is None:
            raise ValueError("optimizer.lr_schedule='cosine' needs optimizer.decay_steps or the "
                             "run's total optimizer steps (fix: e.g. optimizer.decay_steps=400)")
        after = optax.cosine_decay_schedule(peak, max(decay - cfg.warmup_steps, 1),
                                            alpha=cfg.min_lr_ratio)
    else:
        raise ValueError(f"unknown optimizer.lr_schedule {cfg.lr_schedule!r}")
    if not cfg.warmup_steps:
        return after
    warmup = optax.linear_schedule(0.0, peak, cfg.warmup_steps)
    return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def build_optimizer(cfg: OptimizerConfig, schedule: optax.Schedule | None = None
                    ) -> optax.GradientTransformation:
    """clip_by_global_norm (unless max_grad_norm is None), then AdamW at η(s)."""
    lr = schedule if schedule is not None else build_schedule(cfg)
    parts = []
    if cfg.max_grad_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    parts.append(optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay))
    return optax.chain(*parts)
