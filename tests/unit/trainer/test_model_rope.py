"""RoPE from a position table: the rotation's formula, computed once per forward."""

import jax
import jax.numpy as jnp
import numpy as np

from controller.config import ModelConfig
from trainer.model import (
    ModelSpec,
    apply_model,
    causal_mask,
    define_model,
    init_params,
    rope,
    rope_inv_freq,
)


def _formula(x, pos, theta):
    """HF's half-split convention: pair (i, i + Dh/2) turns by pos * theta^(-2i/Dh)."""
    dh = x.shape[-1]
    ang = pos[..., None, None].astype(np.float64) * (theta ** (-np.arange(0, dh, 2) / dh))
    x1, x2 = x[..., : dh // 2], x[..., dh // 2:]
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang),
                           x2 * np.cos(ang) + x1 * np.sin(ang)], axis=-1)


def test_table_rope_matches_the_formula_and_the_direct_computation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
    pos = rng.integers(0, 40, (2, 5)).astype(np.int32)
    table = np.asarray(rope(jnp.asarray(x), jnp.asarray(pos), 10000.0, num_positions=40))
    # The float32 computation the table replaced: cos/sin of each position's own angles.
    ang = jnp.asarray(pos)[..., None].astype(jnp.float32) * rope_inv_freq(8, 10000.0)[None, None]
    cos, sin = jnp.cos(ang)[:, :, None], jnp.sin(ang)[:, :, None]
    x1, x2 = x[..., :4], x[..., 4:]
    direct = np.asarray(jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1))
    np.testing.assert_allclose(table, _formula(x, pos, 10000.0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(table, direct, rtol=1e-6, atol=1e-6)


def test_a_position_outside_the_table_gives_nan_not_a_wrong_rotation():
    x = jnp.ones((1, 2, 1, 4), jnp.float32)
    out = np.asarray(rope(x, jnp.asarray([[3, 4]]), 10000.0, num_positions=4))
    assert np.isfinite(out[0, 0]).all() and np.isnan(out[0, 1]).all()


def test_cos_and_sin_are_evaluated_once_per_forward_and_backward():
    """Not once per layer, per q and k, and again in the backward (XLA fuses them into every
    consumer otherwise)."""
    cfg = ModelConfig(hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, mlp_dim=64)
    spec = ModelSpec.from_config(cfg, 64)
    mdef, params = define_model(spec), init_params(spec, seed=0)
    mask = jnp.ones((2, 6), bool).at[0, :2].set(False)  # a left-padded row
    pos = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)

    def loss(p):
        return apply_model(mdef, p, jnp.zeros((2, 6), jnp.int32), pos,
                           causal_mask(mask, 0, 6))[0].sum()

    for f in (loss, jax.grad(loss)):
        hlo = jax.jit(f).lower(params).compile().as_text()
        assert hlo.count(" cosine(") == 1 and hlo.count(" sine(") == 1
