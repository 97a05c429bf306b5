"""A decoder-only transformer in Flax NNX (Llama / Qwen2 layout).

RMSNorm, rotary position embeddings, grouped-query attention, SwiGLU MLP, optional tied
embeddings and q/k/v biases. Every parameter carries logical axis names (`out_sharding`
metadata) that a mesh's rules table turns into a `NamedSharding`, so the trainer (FSDP) and
the sampler (tensor-parallel) can place the same tree differently.

The module is used functionally: `define_model` gives a graph definition and logical axes,
`init_params` a pure dict of
arrays; `apply_model(graphdef, params, ...)` merges them inside a jitted function, so params are
jit *arguments* (new weights never recompile, and the HLO stays small).

Shapes: B batch rows, L query length, S key length (== L without a cache, the cache length
with one), D model width, H query heads, K key/value heads, Dh head width, F MLP width, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from controller.config import ModelConfig

Params = dict[str, Any]  # nested dict of arrays (nnx pure dict)


@dataclass(frozen=True)
class ModelSpec:
    """The hyper-parameters a model needs, resolved (vocab size known)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    rope_theta: float
    norm_eps: float
    tie_embeddings: bool
    qkv_bias: bool
    dtype: Any

    @classmethod
    def from_config(cls, cfg: ModelConfig, vocab_size: int) -> ModelSpec:
        return cls(
            vocab_size=cfg.vocab_size or vocab_size,
            hidden_size=cfg.hidden_size,
            num_layers=cfg.num_layers,
            num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.resolved_head_dim,
            mlp_dim=cfg.mlp_dim,
            rope_theta=cfg.rope_theta,
            norm_eps=cfg.norm_eps,
            tie_embeddings=cfg.tie_embeddings,
            qkv_bias=cfg.qkv_bias,
            dtype=jnp.dtype(cfg.dtype),
        )


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype: Any,
           scale: float) -> nnx.Param:
    value = jax.random.normal(rngs.params(), shape, jnp.float32) * scale
    return nnx.Param(value.astype(dtype), out_sharding=axes, eager_sharding=False)


def _const(shape: tuple[int, ...], axes: tuple[str | None, ...], dtype: Any, fill: float
           ) -> nnx.Param:
    return nnx.Param(jnp.full(shape, fill, dtype), out_sharding=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype: Any):
        self.scale = _const((dim,), ("norm",), dtype, 1.0)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
        scale = self.scale[...].reshape((1,) * (x.ndim - 1) + (-1,))
        return (x32 * jax.lax.rsqrt(var + self.eps)).astype(x.dtype) * scale


def rope(x_BxLxNxDh: jax.Array, positions_BxL: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, half-split (GPT-NeoX / HF Llama) convention."""
    dh = x_BxLxNxDh.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
    angles_BxLxF = positions_BxL[..., None].astype(jnp.float32) * inv_freq[None, None, :]
    cos = jnp.cos(angles_BxLxF)[:, :, None, :]
    sin = jnp.sin(angles_BxLxF)[:, :, None, :]
    x1, x2 = jnp.split(x_BxLxNxDh.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxLxNxDh.dtype)


class Attention(nnx.Module):
    def __init__(self, spec: ModelSpec, rngs: nnx.Rngs):
        d, h, k, dh, dt = (spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim,
                           spec.dtype)
        s_in, s_out = d**-0.5, (h * dh) ** -0.5
        self.q_proj = _param(rngs, (d, h, dh), ("embed", "heads", "head_dim"), dt, s_in)
        self.k_proj = _param(rngs, (d, k, dh), ("embed", "kv_heads", "head_dim"), dt, s_in)
        self.v_proj = _param(rngs, (d, k, dh), ("embed", "kv_heads", "head_dim"), dt, s_in)
        self.o_proj = _param(rngs, (h, dh, d), ("heads", "head_dim", "embed"), dt, s_out)
        if spec.qkv_bias:
            self.q_bias = _const((h, dh), ("heads", "head_dim"), dt, 0.0)
            self.k_bias = _const((k, dh), ("kv_heads", "head_dim"), dt, 0.0)
            self.v_bias = _const((k, dh), ("kv_heads", "head_dim"), dt, 0.0)
        self.spec = spec

    def __call__(self, x_BxLxD, positions_BxL, mask_BxLxS, kv=None, cache_index=None):
        """Attention; with `kv` (a (k, v) cache of length S) the new keys go in at cache_index."""
        spec = self.spec
        q = jnp.einsum("bld,dhk->blhk", x_BxLxD, self.q_proj[...])
        k = jnp.einsum("bld,dhk->blhk", x_BxLxD, self.k_proj[...])
        v = jnp.einsum("bld,dhk->blhk", x_BxLxD, self.v_proj[...])
        if spec.qkv_bias:
            q = q + self.q_bias[...][None, None]
            k = k + self.k_bias[...][None, None]
            v = v + self.v_bias[...][None, None]
        q = rope(q, positions_BxL, spec.rope_theta)
        k = rope(k, positions_BxL, spec.rope_theta)
        if kv is not None:
            k_cache, v_cache = kv
            k = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype),
                                                    cache_index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype),
                                                    cache_index, axis=1)
            kv = (k, v)
        b, l_, h, dh = q.shape
        groups = h // spec.num_kv_heads
        q = q.reshape(b, l_, spec.num_kv_heads, groups, dh)
        scores = jnp.einsum("blkgd,bskd->bkgls", q, k).astype(jnp.float32) * dh**-0.5
        scores = jnp.where(mask_BxLxS[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgls,bskd->blkgd", probs, v).reshape(b, l_, h, dh)
        return jnp.einsum("blhk,hkd->bld", out, self.o_proj[...]), kv


class MLP(nnx.Module):
    def __init__(self, spec: ModelSpec, rngs: nnx.Rngs):
        d, f, dt = spec.hidden_size, spec.mlp_dim, spec.dtype
        self.gate_proj = _param(rngs, (d, f), ("embed", "mlp"), dt, d**-0.5)
        self.up_proj = _param(rngs, (d, f), ("embed", "mlp"), dt, d**-0.5)
        self.down_proj = _param(rngs, (f, d), ("mlp", "embed"), dt, f**-0.5)

    def __call__(self, x_BxLxD):
        gate = jax.nn.silu(x_BxLxD @ self.gate_proj[...])
        return (gate * (x_BxLxD @ self.up_proj[...])) @ self.down_proj[...]


class Block(nnx.Module):
    def __init__(self, spec: ModelSpec, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(spec.hidden_size, spec.norm_eps, spec.dtype)
        self.attn = Attention(spec, rngs)
        self.post_attn_norm = RMSNorm(spec.hidden_size, spec.norm_eps, spec.dtype)
        self.mlp = MLP(spec, rngs)

    def __call__(self, x, positions, mask, kv=None, cache_index=None):
        h, kv = self.attn(self.input_norm(x), positions, mask, kv, cache_index)
        x = x + h
        return x + self.mlp(self.post_attn_norm(x)), kv


class Decoder(nnx.Module):
    """tokens -> logits. Call with a KV cache for incremental decoding."""

    def __init__(self, spec: ModelSpec, rngs: nnx.Rngs):
        d, v, dt = spec.hidden_size, spec.vocab_size, spec.dtype
        self.spec = spec
        self.embed = _param(rngs, (v, d), ("vocab", "embed"), dt, 0.02)  # HF-style init
        self.layers = nnx.List([Block(spec, rngs) for _ in range(spec.num_layers)])
        self.final_norm = RMSNorm(d, spec.norm_eps, dt)
        if not spec.tie_embeddings:
            self.lm_head = _param(rngs, (d, v), ("embed", "vocab"), dt, d**-0.5)

    def __call__(self, tokens_BxL, positions_BxL, mask_BxLxS, cache=None, cache_index=None):
        """Returns (logits_BxLxV in float32, new cache or None).

        cache: a list of (k, v) per layer, each [B, S, K, Dh]; the L new positions are written at
        `cache_index` and `mask_BxLxS` covers all S cache slots.
        """
        x = jnp.take(self.embed[...], tokens_BxL, axis=0)
        new_cache = [] if cache is not None else None
        for i, layer in enumerate(self.layers):
            kv = cache[i] if cache is not None else None
            x, kv = layer(x, positions_BxL, mask_BxLxS, kv, cache_index)
            if new_cache is not None:
                new_cache.append(kv)
        x = self.final_norm(x)
        head = self.embed[...].T if self.spec.tie_embeddings else self.lm_head[...]
        return (x @ head).astype(jnp.float32), new_cache


# ---------------------------------------------------------------------------------------------
# Functional use: a graph definition + a pure dict of arrays.


@dataclass(frozen=True)
class ModelDef:
    """The static half of a model: graph definition, abstract state and logical axes."""

    spec: ModelSpec
    graphdef: Any
    abstract_state: Any  # nnx.State of ShapeDtypeStructs, used to rebuild from a pure dict
    logical_axes: Params  # same tree as params, leaves are tuples of logical axis names

    def shapes(self) -> Params:
        return nnx.to_pure_dict(self.abstract_state)


def define_model(spec: ModelSpec) -> ModelDef:
    """Builds the model abstractly (no weights allocated) and records its structure."""
    abstract = nnx.eval_shape(lambda: Decoder(spec, nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    axes = jax.tree.map(
        lambda v: tuple(v.get_metadata().get("out_sharding") or (None,) * len(v.value.shape)),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    return ModelDef(spec, graphdef, state, nnx.to_pure_dict(axes))


def init_params(spec: ModelSpec, seed: int) -> Params:
    """Random initial parameters as a pure dict (on the default device; shard afterwards)."""
    _, state = nnx.split(Decoder(spec, nnx.Rngs(seed)))
    return nnx.to_pure_dict(state)


def apply_model(mdef: ModelDef, params: Params, tokens_BxL, positions_BxL, mask_BxLxS,
                cache=None, cache_index=None):
    """Runs the decoder on a pure params dict (call inside jit)."""
    state = jax.tree.map(lambda x: x, mdef.abstract_state)  # a fresh State to fill
    nnx.replace_by_pure_dict(state, params)
    model = nnx.merge(mdef.graphdef, state)
    return model(tokens_BxL, positions_BxL, mask_BxLxS, cache, cache_index)


def positions_from_mask(mask_BxL: jax.Array) -> jax.Array:
    """Position ids for left-padded rows: 0 at the first real token, counting up."""
    return jnp.maximum(jnp.cumsum(mask_BxL.astype(jnp.int32), axis=-1) - 1, 0)


def causal_mask(valid_BxS: jax.Array, query_offset: int | jax.Array, length: int) -> jax.Array:
    """[B, L, S] mask: query i (at absolute column query_offset + i) sees valid keys <= it."""
    s = valid_BxS.shape[1]
    q_cols = query_offset + jnp.arange(length)[:, None]
    causal_LxS = jnp.arange(s)[None, :] <= q_cols
    return causal_LxS[None] & valid_BxS[:, None, :].astype(bool)


def init_cache(spec: ModelSpec, batch: int, length: int, dtype: Any = None) -> list:
    dt = dtype or spec.dtype
    shape = (batch, length, spec.num_kv_heads, spec.head_dim)
    return [(jnp.zeros(shape, dt), jnp.zeros(shape, dt)) for _ in range(spec.num_layers)]


def param_count(params: Params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))
