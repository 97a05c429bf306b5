"""Group-relative advantages and reward shaping (pure, NumPy, on the host).

Rewards arrive as a [prompts, G] array: row p holds the G completions of prompt p. Every token
of completion i gets its completion's advantage A_i. The estimators (`ADVANTAGE_ESTIMATORS`,
keyed by `algorithm.advantage_estimator`):

- "grpo" (Shao et al., 2024):  A_i = (r_i - mean_g(r)) / (std_g(r) + eps), with the *sample*
  standard deviation (ddof=1), as the GRPO reference implementations use (TRL's `torch.std`,
  verl's `torch.std`). With normalization="batch" the std is that of every reward in the batch
  while the mean stays per group (Lite PPO, Liu et al., 2025; TRL `scale_rewards="batch"`).
- "dr_grpo" (Liu et al., 2025):  A_i = r_i - mean_g(r); no std division (it biases towards
  questions that are too easy or too hard).
- "rloo" (Ahmadian et al., 2024):  A_i = r_i - (1/(G-1)) Σ_{j≠i} r_j = G/(G-1) (r_i - mean_g).

A group whose G rewards are all equal carries no signal: every estimator gives it A = 0 exactly
(the centring is done so that equal rewards cancel without rounding).

Reward shaping from DAPO (Yu et al., 2025) lives here too: the soft overlong punishment.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np

Normalization = Literal["group", "batch"]


def _check(rewards_PxG: np.ndarray) -> np.ndarray:
    r = np.asarray(rewards_PxG, dtype=np.float64)
    if r.ndim != 2 or r.shape[1] < 2:
        raise ValueError(f"rewards must be [prompts, G] with G >= 2, got shape {r.shape}")
    return r


def _centred(r_PxG: np.ndarray) -> np.ndarray:
    """r - mean_g(r), exactly 0 for groups of equal rewards (mean of equal floats can round)."""
    uniform_P = np.ptp(r_PxG, axis=1) == 0
    return np.where(uniform_P[:, None], 0.0, r_PxG - r_PxG.mean(axis=1, keepdims=True))


def grpo_advantages(rewards_PxG: np.ndarray, eps: float = 1e-4,
                    normalization: Normalization = "group") -> np.ndarray:
    """GRPO: (r - mean_g) / (std + eps); std per group (ddof=1) or over the whole batch."""
    r = _check(rewards_PxG)
    if normalization == "group":
        std = r.std(axis=1, ddof=1, keepdims=True)
    elif normalization == "batch":
        std = np.full((1, 1), r.std(ddof=1) if r.size > 1 else 0.0)
    else:
        raise ValueError(f"unknown advantage normalization {normalization!r}")
    return (_centred(r) / (std + eps)).astype(np.float32)


def dr_grpo_advantages(rewards_PxG: np.ndarray, eps: float = 1e-4,
                       normalization: Normalization = "group") -> np.ndarray:
    """Dr.GRPO: r - mean_g (no std division; `eps` and `normalization` are unused)."""
    del eps
    if normalization != "group":
        raise ValueError("dr_grpo divides by no std: normalization must be 'group'")
    return _centred(_check(rewards_PxG)).astype(np.float32)


def rloo_advantages(rewards_PxG: np.ndarray, eps: float = 1e-4,
                    normalization: Normalization = "group") -> np.ndarray:
    """RLOO: r_i minus the mean of the other G-1 rewards = G/(G-1) · (r_i - mean_g)."""
    del eps
    if normalization != "group":
        raise ValueError("rloo divides by no std: normalization must be 'group'")
    r = _check(rewards_PxG)
    g = r.shape[1]
    return (_centred(r) * (g / (g - 1))).astype(np.float32)


AdvantageFn = Callable[[np.ndarray, float, Normalization], np.ndarray]

# Keyed by `algorithm.advantage_estimator`.
ADVANTAGE_ESTIMATORS: dict[str, AdvantageFn] = {
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
    "rloo": rloo_advantages,
}


def compute_advantages(rewards_PxG: np.ndarray, estimator: str, eps: float = 1e-4,
                       normalization: Normalization = "group") -> np.ndarray:
    """The named estimator's advantages, [prompts, G] float32."""
    try:
        fn = ADVANTAGE_ESTIMATORS[estimator]
    except KeyError:
        raise ValueError(f"unknown advantage estimator {estimator!r} (known: "
                         f"{sorted(ADVANTAGE_ESTIMATORS)})") from None
    return fn(rewards_PxG, eps, normalization)


def uniform_groups(rewards_PxG: np.ndarray) -> np.ndarray:
    """[prompts] bool: True where all G rewards are equal (zero advantage; DAPO filters these)."""
    return np.ptp(np.asarray(rewards_PxG, np.float64), axis=1) == 0


def soft_overlong_penalty(lengths_B: np.ndarray, max_len: int, buffer_len: int,
                          factor: float = 1.0) -> np.ndarray:
    """DAPO's soft overlong punishment (Yu et al., 2025, eq. 13), added to the reward.

        R_len(|y|) = 0                                  if |y| <= L_max - L_cache
                   = ((L_max - L_cache) - |y|) / L_cache  if L_max - L_cache < |y| <= L_max
                   = -1                                 if |y| > L_max

    times `factor`. L_max = max_len (the completion budget), L_cache = buffer_len.
    """
    if not 0 < buffer_len < max_len:
        raise ValueError(f"overlong buffer_len={buffer_len} must be in (0, max_len={max_len})")
    n = np.asarray(lengths_B, np.float64)
    free = max_len - buffer_len
    pen = np.where(n <= free, 0.0, (free - n) / buffer_len)
    pen = np.where(n > max_len, -1.0, pen)
    return (factor * pen).astype(np.float32)
