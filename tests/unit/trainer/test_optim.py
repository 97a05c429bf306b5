"""Learning-rate schedules (trainer/optim.py) against hand-worked numbers."""

import numpy as np
import pytest

from controller.config import OptimizerConfig
from trainer.optim import build_schedule


def test_warmup_cosine_schedule_hand_worked():
    # W = 2, D = 10, r = 0.1, η = 1: s=0 -> 0, s=1 -> 0.5, s=2 -> 1;
    # s=6: 0.1 + 0.9 · ½(1 + cos(π · 4/8)) = 0.55; s=10 -> 0.1; after D stays 0.1.
    cfg = OptimizerConfig(learning_rate=1.0, warmup_steps=2, lr_schedule="cosine",
                          min_lr_ratio=0.1, decay_steps=10)
    sched = build_schedule(cfg)
    got = [float(sched(s)) for s in (0, 1, 2, 6, 10, 20)]
    np.testing.assert_allclose(got, [0.0, 0.5, 1.0, 0.55, 0.1, 0.1], atol=1e-6)
    # The decay horizon defaults to the run's optimizer steps.
    sched = build_schedule(OptimizerConfig(learning_rate=1.0, lr_schedule="cosine"), 4)
    np.testing.assert_allclose([float(sched(s)) for s in (0, 2, 4)], [1.0, 0.5, 0.0],
                               atol=1e-6)


def test_constant_schedule_and_cosine_needs_a_horizon():
    cfg = OptimizerConfig(learning_rate=0.5, warmup_steps=4)
    np.testing.assert_allclose([float(build_schedule(cfg)(s)) for s in (0, 2, 4, 100)],
                               [0.0, 0.25, 0.5, 0.5], atol=1e-7)
    with pytest.raises(ValueError, match="decay_steps"):
        build_schedule(OptimizerConfig(lr_schedule="cosine"))
