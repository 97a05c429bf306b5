"""The sampler interface every backend implements, and the weight checks they share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import jax
import numpy as np


@dataclass(frozen=True)
class Completions:
    """Generated tokens for B rows, right-padded to T = max_new_tokens.

    mask_BxT marks real completion tokens (the stop token included, padding after it not);
    logps_BxT is the log-probability the sampler drew each token with (0 where masked), under
    the tempered, untruncated distribution log softmax(logits / τ) (see sampler/sampling.py).
    """

    tokens_BxT: Any
    logps_BxT: Any
    mask_BxT: Any


class WeightMismatchError(ValueError):
    """load_weights got a tree whose structure, shapes, dtypes or shardings do not fit."""


class Sampler(Protocol):
    def generate(self, prompt_tokens_BxP: Any, prompt_mask_BxP: Any, rng: Any, *,
                 group: int = 1) -> Completions:
        """Completions for left-padded prompts (one row per completion wanted).

        group > 1 says the rows come in consecutive groups of `group` rows with one prompt
        each (the controller builds them so); a backend may then prefill each prompt once.
        """
        ...

    def load_weights(self, params: Any) -> None:
        """Replaces the sampler's weights; the only way they change."""
        ...

    def metrics(self) -> dict[str, float]:
        """Counters about the sampler itself (`sampler/...` keys), read after generate."""
        ...


def left_pad(tokens_BxP: np.ndarray, mask_BxP: np.ndarray, width: int, pad_id: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """Adds masked pad columns on the left up to `width`; real tokens stay right-aligned.

    Every prompt batch a sampler takes is left-padded: each row's next token then falls in the
    same cache column. The controller pads with this too (data batches, merged batches).
    """
    b, p = tokens_BxP.shape
    if width == p:
        return tokens_BxP, mask_BxP
    tokens = np.full((b, width), pad_id, np.int32)
    mask = np.zeros((b, width), bool)
    tokens[:, width - p:] = tokens_BxP
    mask[:, width - p:] = mask_BxP
    return tokens, mask


def check_weights(params: Any, expected: Any, shardings: Any | None) -> None:
    """Raises WeightMismatchError unless `params` matches the model leaf for leaf.

    expected: the model's tree with (shape, dtype) leaves. shardings: the sampler's
    NamedSharding tree, or None to skip the placement check (a host-side backend such as vLLM).
    A silent wrong-layer load is the worst bug an RL system can have, so the structure (every
    key), each shape and dtype, and each placement are compared, and the first difference is
    named by its path.
    """
    is_pair = lambda x: isinstance(x, tuple)  # noqa: E731
    want = jax.tree.structure(expected, is_leaf=is_pair)
    got = jax.tree.structure(params)
    if want != got:
        raise WeightMismatchError(
            f"load_weights: tree structure differs from the model's.\n  expected: {want}\n"
            f"  got:      {got}"
        )
    flat_want = jax.tree_util.tree_leaves_with_path(expected, is_leaf=is_pair)
    flat_sh = jax.tree.leaves(shardings) if shardings is not None else [None] * len(flat_want)
    for (path, (shape, dtype)), leaf, sh in zip(
        flat_want, jax.tree.leaves(params), flat_sh, strict=True
    ):
        name = jax.tree_util.keystr(path)
        if tuple(leaf.shape) != tuple(shape) or leaf.dtype != dtype:
            raise WeightMismatchError(
                f"load_weights: {name} is {leaf.dtype}{list(leaf.shape)}, the model needs "
                f"{dtype}{list(shape)}"
            )
        if sh is None:
            continue
        if not isinstance(leaf, jax.Array) or leaf.sharding != sh:
            where = leaf.sharding if isinstance(leaf, jax.Array) else type(leaf).__name__
            raise WeightMismatchError(
                f"load_weights: {name} has sharding {where}, the sampler needs {sh} "
                f"(fix: reshard the tree to sampler.shardings first)"
            )
        if leaf.weak_type:
            # A weak type is part of jit's cache key: loading it would recompile generate.
            raise WeightMismatchError(
                f"load_weights: {name} is weakly typed (made from a Python scalar); the "
                f"compiled sampler expects a strong {dtype} (fix: .astype(jnp.{dtype}))"
            )
