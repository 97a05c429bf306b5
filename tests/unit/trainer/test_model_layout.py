"""The sampler's decode layout: matmul weights output-major give the canonical model's logits."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trainer.model import (
    MATMUL_INPUT_AXES,
    ModelSpec,
    apply_model,
    causal_mask,
    define_model,
    init_params,
    out_major_params,
    positions_from_mask,
)

SPEC = ModelSpec(vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=8, mlp_dim=48, rope_theta=10000.0, norm_eps=1e-6,
                 tie_embeddings=True, qkv_bias=True, dtype=jnp.float32)


def _logits(spec, params, tokens, mask):
    return apply_model(define_model(spec), params, tokens, positions_from_mask(mask),
                       causal_mask(mask, 0, tokens.shape[1]))[0]


@pytest.mark.parametrize("variant", [
    {},
    {"tie_embeddings": False, "o_bias": True},
    {"lora_rank": 2, "lora_alpha": 4.0, "lora_targets": ("q", "o", "up", "down"),
     "lora_dtype": jnp.float32},
])
@pytest.mark.parametrize("fuse", [False, True])
def test_out_major_weights_give_the_canonical_logits(variant, fuse):
    spec = dataclasses.replace(SPEC, **variant)
    params = init_params(spec, seed=3)
    # Nonzero biases and adapters, so that each is seen to be applied where it belongs.
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.05 if "bias" in str(path[-1]) or "lora_b" in str(path[-1]) else x,
        params)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(1, 96, (3, 7)), jnp.int32)
    mask = jnp.asarray(np.arange(7)[None] >= np.array([[0], [2], [4]]))
    want = _logits(spec, params, tokens, mask)
    moved = out_major_params(params, fuse=fuse)
    got = _logits(dataclasses.replace(spec, out_major=True, fused_projections=fuse), moved,
                  tokens, mask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
    # Every matmul weight moved its input axes last; everything else is the same array.
    layer = params["layers"][0]
    if fuse:  # q/k/v and gate/up joined on the output axis
        assert moved["layers"][0]["attn"]["qkv_proj"].shape == (4 + 2 + 2, 8, 32)
        assert moved["layers"][0]["mlp"]["gate_up_proj"].shape == (96, 32)
        assert "q_proj" not in moved["layers"][0]["attn"]
    else:
        assert moved["layers"][0]["attn"]["q_proj"].shape == (4, 8, 32)  # [N, Dh, D]
    assert moved["layers"][0]["attn"]["o_proj"].shape == (32, 4, 8)  # [D, N, Dh]
    assert moved["layers"][0]["mlp"]["down_proj"].shape == (32, 48)
    # And back: the canonical tree, exactly.
    back = out_major_params(moved, inverse=True, fuse=fuse)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert moved["embed"] is params["embed"]
    assert moved["layers"][0]["input_norm"]["scale"] is layer["input_norm"]["scale"]
    if not spec.tie_embeddings:
        assert moved["lm_head"].shape == (96, 32)
    assert {"q_proj", "o_proj", "gate_proj", "down_proj"} <= set(MATMUL_INPUT_AXES)


def test_out_major_bfloat16_weights_accumulate_in_float32():
    # bf16 weights: each product accumulates in float32, so the logits stay within bf16's
    # input rounding of the float32 model's (an all-bf16 product would drift further).
    params = init_params(SPEC, seed=4)
    tokens = jnp.asarray(np.random.default_rng(1).integers(1, 96, (2, 6)), jnp.int32)
    mask = jnp.ones((2, 6), bool)
    want = np.asarray(_logits(SPEC, params, tokens, mask))
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), out_major_params(params))
    got = _logits(dataclasses.replace(SPEC, out_major=True), bf16, tokens, mask)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, atol=0.05 * np.abs(want).max())
