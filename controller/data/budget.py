"""The prompt budget: how many tokens a prompt may have, given the data config and the model.

A row occupies positions 0 .. P + T - 1 (P prompt tokens, T = sampling.max_new_tokens; left
padding takes no positions). A Hugging Face model was trained with RoPE positions below its
config.json `max_position_embeddings`; past them its attention sees angles it never learned, and
nothing fails, so the limit is checked here, before any row is read:

    P_max = data.max_prompt_tokens                       when set; P_max + T must fit
    P_max = min(1024, max_position_embeddings - T)       when data.max_prompt_tokens is unset

A prompt longer than P_max is a bad row, or, with data.truncate_prompts, keeps its last P_max
tokens. The built-in model has no position limit: it learns from random initialization at the
lengths the job gives it, and RoPE is defined at every position.

No JAX here (the CLI may check a config before JAX starts).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from controller.config import ConfigError, DataConfig, JobConfig, ModelConfig, as_path

# P_max when data.max_prompt_tokens is unset and the model allows more.
DEFAULT_MAX_PROMPT_TOKENS = 1024


@dataclass(frozen=True)
class PromptBudget:
    """The longest prompt a batch may hold, and what happens to a longer one."""

    tokens: int  # P_max
    truncate: bool  # longer prompts keep their last `tokens` ids (else they are bad rows)
    source: str  # where P_max comes from, as messages quote it

    @classmethod
    def from_data(cls, data: DataConfig) -> PromptBudget:
        """The budget of the data config alone (no model limit known)."""
        if data.max_prompt_tokens is None:
            return cls(DEFAULT_MAX_PROMPT_TOKENS, data.truncate_prompts,
                       f"the default data.max_prompt_tokens of {DEFAULT_MAX_PROMPT_TOKENS}")
        return cls(data.max_prompt_tokens, data.truncate_prompts,
                   f"data.max_prompt_tokens={data.max_prompt_tokens}")


def model_max_positions(model: ModelConfig) -> int | None:
    """`max_position_embeddings` from model.path's config.json; None for the built-in model, or
    when config.json does not give one.

    An unreadable config.json is also None here: `trainer.hf.load_hf_spec` reads the same file
    first when the job is built and reports it with its fix.
    """
    if model.path is None:
        return None
    try:
        cfg: Any = json.loads((as_path(model.path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    limit = cfg.get("max_position_embeddings") if isinstance(cfg, dict) else None
    return limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None


def prompt_budget(cfg: JobConfig) -> PromptBudget:
    """P_max for the job (see the module docstring); a ConfigError when the config cannot fit."""
    data, new = cfg.data, cfg.completion_tokens
    # T: one completion's tokens, or with an environment a row's turns and observations.
    new_field = "env.max_total_tokens" if cfg.env.name else "sampling.max_new_tokens"
    budget = PromptBudget.from_data(data)
    limit = model_max_positions(cfg.model)
    if limit is None:
        return budget
    where = (f"the model at model.path={cfg.model.path!r} has {limit} positions "
             f"(max_position_embeddings in its config.json)")
    room = limit - new
    if room < 1:
        raise ConfigError(
            f"{new_field}={new} leaves no position for a prompt: {where} (fix: e.g. "
            f"{new_field}={max(1, limit // 2)})")
    given = data.max_prompt_tokens
    if given is not None and given + new > limit and not data.truncate_prompts:
        raise ConfigError(
            f"data.max_prompt_tokens={given} + {new_field}={new} = {given + new} "
            f"positions, but {where} (fix: data.max_prompt_tokens={room}, or "
            f"data.truncate_prompts=true to keep the last {room} tokens of longer prompts)")
    if room >= budget.tokens:
        return budget
    return PromptBudget(room, data.truncate_prompts,
                        f"the {room} tokens the model leaves for a prompt (max_position_embeddings"
                        f"={limit} in model.path's config.json - {new_field}={new})")
