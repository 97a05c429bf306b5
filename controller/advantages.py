"""Group-relative advantages (pure).

GRPO (Shao et al., 2024): for the G completions of one prompt with rewards r_1..r_G,

    A_i = (r_i - mean(r)) / (std(r) + eps)

with the *sample* standard deviation (ddof=1), as the GRPO reference implementations (TRL's
`torch.std`) use. Every token of completion i gets A_i.
"""

from __future__ import annotations

import numpy as np


def grpo_advantages(rewards_PxG: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    """(r - mean_g) / (std_g + eps) per group; rows are prompts, columns the G completions."""
    r = np.asarray(rewards_PxG, dtype=np.float64)
    if r.ndim != 2 or r.shape[1] < 2:
        raise ValueError(f"rewards must be [prompts, G] with G >= 2, got shape {r.shape}")
    mean = r.mean(axis=1, keepdims=True)
    std = r.std(axis=1, ddof=1, keepdims=True)
    return ((r - mean) / (std + eps)).astype(np.float32)
