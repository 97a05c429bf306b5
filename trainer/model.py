"""A decoder-only transformer in Flax NNX (Llama / Qwen2 layout, with the Qwen3 and Gemma 2/3
variations behind `ModelSpec` flags).

RMSNorm, rotary position embeddings, grouped-query attention, SwiGLU MLP, optional tied
embeddings and q/k/v biases. The family differences, each a `ModelSpec` field whose default is
the plain Llama / Qwen2 behaviour:

- Qwen3: RMSNorm on each query and key head before RoPE (`qk_norm`).
- Llama 3: RoPE frequency scaling (`rope_scaling`, kind "llama3" or "linear").
- Gemma 2/3: norms that scale by (1 + w) (`norm_plus_one`), "sandwich" norms around attention
  and MLP (`sandwich_norm`), GeGLU (`mlp_activation="gelu_tanh"`), embeddings scaled by
  sqrt(D) (`embed_scale`), a query scale other than Dh^-1/2 (`attn_scale`), tanh soft-capping
  of attention scores and final logits (`attn_softcap`, `final_softcap`), and sliding-window
  layers (`sliding_window`, `sliding_layers`) with their own RoPE base (`local_rope_theta`).

Every parameter carries logical axis names (`out_sharding` metadata) that a mesh's rules table
turns into a `NamedSharding`, so the trainer (FSDP) and the sampler (tensor-parallel) can place
the same tree differently.

The module is used functionally: `define_model` gives a graph definition and logical axes,
`init_params` a pure dict of
arrays; `apply_model(graphdef, params, ...)` merges them inside a jitted function, so params are
jit *arguments* (new weights never recompile, and the HLO stays small).

Shapes: B batch rows, L query length, S key length (== L without a cache, the cache length
with one), D model width, H query heads, K key/value heads, Dh head width, F MLP width, V vocab.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from controller.config import ModelConfig

Params = dict[str, Any]  # nested dict of arrays (nnx pure dict)


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (HF `rope_parameters` with a `rope_type` other than "default").

    "linear": every inverse frequency f_i becomes f_i / factor.
    "llama3" (Llama 3.1): with wavelength λ_i = 2π / f_i, low = L_orig / low_freq_factor and
    high = L_orig / high_freq_factor: λ_i < high keeps f_i; λ_i > low gives f_i / factor; in
    between, f_i' = (1 - s) f_i / factor + s f_i with s = (L_orig / λ_i - low_freq_factor) /
    (high_freq_factor - low_freq_factor).
    """

    kind: str  # "linear" | "llama3"
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class ModelSpec:
    """The hyper-parameters a model needs, resolved (vocab size known).

    Fields after `dtype` select a family's variations; their defaults are the Llama / Qwen2
    layout of the built-in model.
    """

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
    o_bias: bool = False  # a bias on the attention output projection (HF attention_bias)
    qk_norm: bool = False  # Qwen3 / Gemma 3: RMSNorm over Dh of each q and k head before RoPE
    norm_plus_one: bool = False  # Gemma: y = x̂ (1 + w) in float32, else y = w · x̂
    sandwich_norm: bool = False  # Gemma 2/3: norms after attention and MLP outputs too
    mlp_activation: str = "silu"  # "silu" (SwiGLU) | "gelu_tanh" (Gemma's GeGLU)
    embed_scale: float = 1.0  # Gemma: embeddings times sqrt(D) (rounded to the param dtype)
    attn_scale: float | None = None  # query scale; None: Dh^-1/2 (Gemma: q_pre_attn_scalar^-1/2)
    attn_softcap: float | None = None  # scores -> c · tanh(scores / c) (Gemma 2)
    final_softcap: float | None = None  # logits -> c · tanh(logits / c) (Gemma 2)
    rope_scaling: RopeScaling | None = None  # applies to the global (non-sliding) layers
    sliding_window: int | None = None  # W: a sliding layer's query sees keys q - k < W
    sliding_layers: tuple[bool, ...] = ()  # per layer: True = sliding window; () = none
    local_rope_theta: float | None = None  # RoPE base of sliding layers (Gemma 3); None: same
    hf_model_type: str | None = None  # HF `model_type` this spec was read from ("qwen3", ...)
    # Blocks over at most this many queries at a time (the trainer's long sequences): the
    # scores and MLP activations of one chunk exist at once (`Block._by_chunks`); None: all
    # queries together.
    attn_query_chunk: int | None = None
    # LoRA (trainer/lora.py): each projection named in lora_targets (q, k, v, o, gate, up,
    # down) gets y += (alpha / rank) · (x·A)·B with A [in, rank], B [rank, out] in lora_dtype.
    lora_rank: int = 0  # 0: no adapters
    lora_alpha: float = 0.0
    lora_targets: tuple[str, ...] = ()
    lora_dtype: Any = None
    # p: each adapter's input x is dropped elementwise with probability p (and the rest scaled
    # by 1 / (1 - p)) in forwards given a dropout key, i.e. the update's policy forward only.
    lora_dropout: float = 0.0
    # Matmul weights held output-major, [out..., in...] (`out_major_params`): the sampler's
    # decode layout. Each product is then x·Wᵀ with float32 accumulation, the form XLA:CPU's
    # dot streams fastest when a few rows meet a large weight (and, with bf16 weights, the one
    # that does not fall back to a slow bf16-output kernel).
    out_major: bool = False
    # With out_major only: q/k/v held as one weight `qkv_proj` [N + 2K, Dh, D] and gate/up as
    # `gate_up_proj` [2F, D] (`out_major_params(fuse=True)`): one product each per layer, for
    # a sampler on one device (the split would cut across shards otherwise).
    fused_projections: bool = False

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank

    def is_sliding(self, layer: int) -> bool:
        return bool(self.sliding_layers) and self.sliding_layers[layer]

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
    """x̂ = x / sqrt(mean(x²) + eps); y = w · x̂ (Llama: x̂ cast to x's dtype first), or with
    `plus_one` (Gemma) y = x̂ · (1 + w) in float32, then cast. The stored w is the HF weight."""

    def __init__(self, dim: int, eps: float, dtype: Any, plus_one: bool = False):
        self.scale = _const((dim,), ("norm",), dtype, 0.0 if plus_one else 1.0)
        self.eps = eps
        self.plus_one = plus_one

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps, self.plus_one)


def rms_norm(x: jax.Array, w: jax.Array, eps: float, plus_one: bool) -> jax.Array:
    """`RMSNorm` on a bare weight w [D]."""
    x32 = x.astype(jnp.float32)
    var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    scale = w.reshape((1,) * (x.ndim - 1) + (-1,))
    normed = x32 * jax.lax.rsqrt(var + eps)
    if plus_one:
        return (normed * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)
    return normed.astype(x.dtype) * scale


@jax.custom_vjp
def linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """x @ w for x [..., I] and w [I, O], with a backward that XLA:CPU runs without transposes.

    JAX's own transpose rule writes the weight gradient as (dYᵀ·x)ᵀ, and XLA:CPU implements that
    by materialising dY transposed, fused with whatever made dY (the SwiGLU derivative, say):
    an element-at-a-time strided write, 7x slower than the elementwise op alone (measured: 17 ms
    vs 2.4 ms for a [4096, 688] SwiGLU derivative). Here dW = xᵀ·dY is one dot_general
    contracting the leading axes of both operands, which the CPU dot reads in place; the values
    are the same products summed in the same order (tested against jax.grad of x @ w).
    """
    return x @ w


def _linear_fwd(x, w):
    return x @ w, (x, w)


def rows_2d(a: jax.Array) -> jax.Array:
    """[..., N] -> [rows, N] (free for a row-major array): a 2-D dot that contracts its rows
    reads both operands in place, where one contracting several leading axes gets a transposed
    copy of an operand first."""
    return a.reshape(-1, a.shape[-1])


def _linear_bwd(res, dy):
    x, w = res
    dx = jax.lax.dot_general(dy, w.astype(dy.dtype), (((dy.ndim - 1,), (1,)), ((), ())))
    dw = jax.lax.dot_general(rows_2d(x).astype(dy.dtype), rows_2d(dy), (((0,), (0,)), ((), ())))
    return dx.astype(x.dtype), dw.astype(w.dtype)


linear.defvjp(_linear_fwd, _linear_bwd)


def dense(spec: ModelSpec, x: jax.Array, w: jax.Array, n_in: int) -> jax.Array:
    """x [..., I] times a matmul weight whose first n_in axes (canonical layout) or last n_in
    axes (`spec.out_major`) hold I; returns [..., O] in x's dtype."""
    if not spec.out_major:
        return linear(x, w.reshape(math.prod(w.shape[:n_in]), -1))
    return dot_out_major(x, w.reshape(-1, math.prod(w.shape[w.ndim - n_in:]))).astype(x.dtype)


def dot_out_major(x: jax.Array, w_OxI: jax.Array) -> jax.Array:
    """x [..., I] · w_OxIᵀ -> float32 [..., O], as one 2-D product: with x of more than two
    axes XLA:CPU rewrites the product with the weight transposed to [I, O], and copies every
    weight to that layout before the products run."""
    y = jax.lax.dot_general(rows_2d(x).astype(w_OxI.dtype), w_OxI, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)
    return y.reshape(*x.shape[:-1], w_OxI.shape[0])


# Each matmul weight and how many of its leading axes are inputs in the canonical layout.
MATMUL_INPUT_AXES = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2, "gate_proj": 1,
                     "up_proj": 1, "down_proj": 1, "lm_head": 1}


def out_major_params(params: Params, inverse: bool = False, fuse: bool = False) -> Params:
    """The params with every matmul weight moved to [out..., in...] (for a spec with
    out_major=True), or back (inverse); everything else (embedding, norms, biases, adapters)
    is shared as is. fuse: q/k/v and gate/up also joined (or split back) as
    `ModelSpec.fused_projections` holds them.

    Call it outside the program that uses the result: inside one XLA folds the transpose into
    each product, and the products read the weights in the canonical order after all.
    """
    if inverse and fuse:
        params = _split_projections(params)

    def move(path, w):
        n_in = MATMUL_INPUT_AXES.get(getattr(path[-1], "key", None))
        if n_in is None:
            return w
        if inverse:
            n_out = w.ndim - n_in
            return jnp.moveaxis(w, tuple(range(n_out)), tuple(range(n_in, w.ndim)))
        return jnp.moveaxis(w, tuple(range(n_in)), tuple(range(w.ndim - n_in, w.ndim)))

    moved = jax.tree_util.tree_map_with_path(move, params)
    return _join_projections(moved) if fuse and not inverse else moved


FUSED = {"attn": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
         "mlp": ("gate_up_proj", ("gate_proj", "up_proj"))}


def _join_projections(params: Params) -> Params:
    """Output-major q/k/v -> qkv_proj and gate/up -> gate_up_proj, concatenated on axis 0."""
    def join(sub: dict, fused: str, names: tuple[str, ...]) -> None:
        sub[fused] = jnp.concatenate([sub.pop(n) for n in names], axis=0)

    return _each_fused_part(params, join)


def _split_projections(params: Params) -> Params:
    """The inverse of _join_projections: the parts' sizes are their heads (mlp: halves)."""
    def split(sub: dict, fused: str, names: tuple[str, ...]) -> None:
        w = sub.pop(fused)
        if "o_proj" in sub:  # attention: N query heads (out-major o_proj [D, N, Dh]), K, K
            n_q = sub["o_proj"].shape[1]
            n_kv = (w.shape[0] - n_q) // 2
            pieces = jnp.split(w, [n_q, n_q + n_kv], axis=0)
        else:
            pieces = jnp.split(w, 2, axis=0)
        sub.update(zip(names, pieces, strict=True))

    return _each_fused_part(params, split)


def _each_fused_part(params: Params, change: Callable[[dict, str, tuple[str, ...]], None]
                     ) -> Params:
    """A copy of params where change(sub, fused name, part names) rewrote each layer's attn
    and mlp dicts in place."""
    layers = {}
    for i, layer in params["layers"].items():
        layer = {**layer}
        for part, (fused, names) in FUSED.items():
            layer[part] = {**layer[part]}
            change(layer[part], fused, names)
        layers[i] = layer
    return {**params, "layers": layers}


def rope_inv_freq(dh: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """Inverse frequencies f_i = theta^(-2i/Dh), i < Dh/2, scaled as `RopeScaling` describes.

    Computed in float32 numpy at trace time (a constant of the program), as HF does in torch.
    """
    inv = (1.0 / (theta ** (np.arange(0, dh, 2, dtype=np.int64).astype(np.float32) / dh))
           ).astype(np.float32)
    if scaling is None:
        return inv
    if scaling.kind == "linear":
        return (inv / np.float32(scaling.factor)).astype(np.float32)
    if scaling.kind != "llama3":
        raise ValueError(f"rope scaling kind {scaling.kind!r} is not supported "
                         "(supported: linear, llama3)")
    old = scaling.original_max_position
    lo, hi, factor = scaling.low_freq_factor, scaling.high_freq_factor, scaling.factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope(x_BxLxNxDh: jax.Array, positions_BxL: jax.Array, theta: float,
         scaling: RopeScaling | None = None, *, num_positions: int) -> jax.Array:
    """Rotary embedding, half-split (GPT-NeoX / HF Llama) convention.

    num_positions: positions lie in [0, num_positions) (the key length, for positions counted
    from masks). cos/sin are read from a [num_positions, Dh/2] table: XLA:CPU fuses
    elementwise cos/sin into every consumer, so computed per position they would be evaluated
    again for each layer's q and k, and again in the backward, as scalar libm calls inside
    otherwise vectorised loops (~5% of a step's CPU time on bench/grpo_step.py's job). A
    position outside the table reads NaN: a caller that breaks the contract gets NaN logits,
    never a silently wrong rotation.
    """
    inv_freq = jnp.asarray(rope_inv_freq(x_BxLxNxDh.shape[-1], theta, scaling))
    angles_NxF = jnp.arange(num_positions, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    cos = jnp.take(jnp.cos(angles_NxF), positions_BxL, axis=0, mode="fill",
                   fill_value=jnp.nan)[:, :, None, :]
    sin = jnp.take(jnp.sin(angles_NxF), positions_BxL, axis=0, mode="fill",
                   fill_value=jnp.nan)[:, :, None, :]
    x1, x2 = jnp.split(x_BxLxNxDh.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxLxNxDh.dtype)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """c · tanh(x / c) (Gemma 2's soft-capping); identity when c is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def add_lora_params(module: nnx.Module, spec: ModelSpec,
                    shapes: dict[str, tuple[tuple[int, ...], tuple, tuple[int, ...], tuple]]
                    ) -> None:
    """Gives `module` the adapters `<name>_lora_a` [*in, rank] and `<name>_lora_b` [rank, *out]
    of each projection in spec.lora_targets. shapes: name -> (in shape, in logical axes, out
    shape, out logical axes). Zeros here: trainer/lora.py draws A and zeroes B."""
    r, dt = spec.lora_rank, spec.lora_dtype
    for name, (in_shape, in_axes, out_shape, out_axes) in shapes.items():
        if name in spec.lora_targets:
            setattr(module, f"{name}_lora_a", _const((*in_shape, r), (*in_axes, None), dt, 0.0))
            setattr(module, f"{name}_lora_b", _const((r, *out_shape), (None, *out_axes), dt, 0.0))


# The adapters' order when a block's dropout key is split among them (`lora_dropout_key`).
_LORA_NAMES = ("q", "k", "v", "o", "gate", "up", "down")


def lora_dropout_key(key: jax.Array | None, *path: int) -> jax.Array | None:
    """`key` folded with each index of `path` (None stays None): the dropout key of one layer,
    one call of a block, or one adapter, drawn from the update's key."""
    if key is None:
        return None
    for i in path:
        key = jax.random.fold_in(key, i)
    return key


def lora_dropped(spec: ModelSpec, x: jax.Array, key: jax.Array | None) -> jax.Array:
    """x with each element kept with probability 1 - p and scaled by 1 / (1 - p), else zero
    (p = spec.lora_dropout; PEFT's dropout before A). x itself without a key or with p = 0."""
    p = spec.lora_dropout
    if key is None or p == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - p, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - p, x.dtype), jnp.zeros((), x.dtype))


def lora_update(module: nnx.Module, spec: ModelSpec, name: str, x: jax.Array, y: jax.Array,
                dropout_key: jax.Array | None = None) -> jax.Array:
    """y + (alpha / rank) · (dropout(x)·A)·B for projection `name` (y unchanged if it has no
    adapter). x [..., in] is the projection's input flattened as its matmul takes it, y
    [..., out]. dropout_key: the block's key (`lora_dropped`); None: no dropout."""
    if name not in spec.lora_targets:
        return y
    x = lora_dropped(spec, x, lora_dropout_key(dropout_key, _LORA_NAMES.index(name)))
    r = spec.lora_rank
    a = getattr(module, f"{name}_lora_a")[...].reshape(-1, r)
    b = getattr(module, f"{name}_lora_b")[...].reshape(r, -1)
    delta = linear(linear(x.astype(a.dtype), a), b) * jnp.asarray(spec.lora_scale, a.dtype)
    return y + delta.astype(y.dtype)


class Attention(nnx.Module):
    def __init__(self, spec: ModelSpec, rngs: nnx.Rngs, sliding: bool = False):
        d, h, k, dh, dt = (spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim,
                           spec.dtype)
        s_in, s_out = d**-0.5, (h * dh) ** -0.5
        if spec.fused_projections:
            self.qkv_proj = _param(rngs, (h + 2 * k, dh, d), (None, "head_dim", "embed"), dt, s_in)
        else:
            self.q_proj = _param(rngs, (d, h, dh), ("embed", "heads", "head_dim"), dt, s_in)
            self.k_proj = _param(rngs, (d, k, dh), ("embed", "kv_heads", "head_dim"), dt, s_in)
            self.v_proj = _param(rngs, (d, k, dh), ("embed", "kv_heads", "head_dim"), dt, s_in)
        self.o_proj = _param(rngs, (h, dh, d), ("heads", "head_dim", "embed"), dt, s_out)
        if spec.qkv_bias:
            self.q_bias = _const((h, dh), ("heads", "head_dim"), dt, 0.0)
            self.k_bias = _const((k, dh), ("kv_heads", "head_dim"), dt, 0.0)
            self.v_bias = _const((k, dh), ("kv_heads", "head_dim"), dt, 0.0)
        if spec.o_bias:
            self.o_bias = _const((d,), ("embed",), dt, 0.0)
        if spec.qk_norm:
            self.q_norm = RMSNorm(dh, spec.norm_eps, dt, spec.norm_plus_one)
            self.k_norm = RMSNorm(dh, spec.norm_eps, dt, spec.norm_plus_one)
        add_lora_params(self, spec, {
            "q": ((d,), ("embed",), (h, dh), ("heads", "head_dim")),
            "k": ((d,), ("embed",), (k, dh), ("kv_heads", "head_dim")),
            "v": ((d,), ("embed",), (k, dh), ("kv_heads", "head_dim")),
            "o": ((h, dh), ("heads", "head_dim"), (d,), ("embed",))})
        self.spec = spec
        self.sliding = sliding
        if sliding:
            self.rope_theta = spec.local_rope_theta or spec.rope_theta
            self.rope_scaling = None if spec.local_rope_theta else spec.rope_scaling
        else:
            self.rope_theta, self.rope_scaling = spec.rope_theta, spec.rope_scaling

    def __call__(self, x_BxLxD, positions_BxL, mask_BxLxS, kv=None, cache_index=None,
                 dropout_key=None):
        """Attention; with `kv` (a (k, v) cache of length S) the new keys go in at cache_index.
        dropout_key: the adapters' dropout key (`lora_update`).

        A sliding layer also masks keys W or more columns behind the query (HF's window counts
        cache columns too; rows are left-padded, so within a row columns and positions agree).
        """
        q, k, v, kv = self.project(x_BxLxD, positions_BxL, mask_BxLxS, kv, cache_index,
                                   dropout_key)
        l_ = x_BxLxD.shape[1]
        start = 0 if cache_index is None else cache_index  # query i is at column start + i
        chunk = self.spec.attn_query_chunk
        if chunk is None or l_ <= chunk:
            rows = (mask_BxLxS.rows(0, l_) if isinstance(mask_BxLxS, CausalMask)
                    else mask_BxLxS)
            out = self.attend(q, k, v, rows, start + jnp.arange(l_), kv is not None)
        else:
            out = self.attend_by_chunks(q, k, v, mask_BxLxS, start + jnp.arange(l_),
                                        kv is not None, chunk)
        return self.output(out, dropout_key), kv

    def project(self, x_BxLxD, positions_BxL, mask_BxLxS, kv=None, cache_index=None,
                dropout_key=None):
        """(q [B, K, G, L, Dh], keys, values, new cache or None): the projections with their
        biases, norms and rotary embedding; with `kv` the keys and values are the cache's with
        the new columns written at cache_index."""
        spec = self.spec
        b, l_ = x_BxLxD.shape[:2]

        sizes = {"q": spec.num_heads, "k": spec.num_kv_heads, "v": spec.num_kv_heads}
        if spec.fused_projections:
            y = dense(spec, x_BxLxD, self.qkv_proj[...], 1)
            cuts = np.cumsum([n * spec.head_dim for n in sizes.values()])[:-1]
            outs = dict(zip(sizes, jnp.split(y, cuts, axis=-1), strict=True))
        else:  # each [D, n·Dh] as one matmul
            outs = {name: dense(spec, x_BxLxD, getattr(self, f"{name}_proj")[...], 1)
                    for name in sizes}
        q, k, v = (lora_update(self, spec, name, x_BxLxD, outs[name], dropout_key).reshape(
            b, l_, n, spec.head_dim) for name, n in sizes.items())
        if spec.qkv_bias:
            q = q + self.q_bias[...][None, None]
            k = k + self.k_bias[...][None, None]
            v = v + self.v_bias[...][None, None]
        if spec.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        # Positions count real tokens, so each lies below the key length S.
        s_len = mask_BxLxS.shape[-1]
        q = rope(q, positions_BxL, self.rope_theta, self.rope_scaling, num_positions=s_len)
        k = rope(k, positions_BxL, self.rope_theta, self.rope_scaling, num_positions=s_len)
        # Keys and values live head-major, [B, K, S, Dh], so that the attention products need
        # no transpose of the cache: one decode step then touches the cache only where it
        # writes the new column and where it reads it in the products. The cached keys are
        # stored transposed, [B, K, Dh, S] (see init_cache), so that q·kᵀ is a plain product:
        # XLA:CPU's dot kernel repacks a transposed operand on every call, i.e. the whole key
        # cache on every decode step.
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        b, l_, h, dh = q.shape
        groups = h // spec.num_kv_heads
        q = q.reshape(b, l_, spec.num_kv_heads, groups, dh).transpose(0, 2, 3, 1, 4)
        if kv is not None:
            k_cache, v_cache = kv
            k = jax.lax.dynamic_update_slice_in_dim(
                k_cache, k.transpose(0, 1, 3, 2).astype(k_cache.dtype), cache_index, axis=3)
            v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype),
                                                    cache_index, axis=2)
            kv = (k, v)
        return q, k, v, kv

    def output(self, out_BxKxGxLxDh, dropout_key=None):
        """The heads' outputs [B, K, G, L, Dh] through the output projection: [B, L, D]."""
        spec = self.spec
        b, kh, g, l_, dh = out_BxKxGxLxDh.shape
        out = out_BxKxGxLxDh.transpose(0, 3, 1, 2, 4).reshape(b, l_, kh * g * dh)
        out = lora_update(self, spec, "o", out, dense(spec, out, self.o_proj[...], 2),
                          dropout_key)
        if spec.o_bias:
            out = out + self.o_bias[...][None, None]
        return out

    def attend(self, q, k, v, mask_BxLxS, q_cols_L, cached: bool):
        """softmax(q·kᵀ · scale, masked) · v for queries q [B, K, G, L, Dh] at columns q_cols_L,
        keys k [B, K, S, Dh] ([B, K, Dh, S] from a cache) and values v [B, K, S, Dh]."""
        spec = self.spec
        scale = spec.attn_scale if spec.attn_scale is not None else q.shape[-1] ** -0.5
        scores = jnp.einsum("bkgld,bkds->bkgls" if cached else "bkgld,bksd->bkgls", q, k)
        scores = scores.astype(jnp.float32) * scale
        scores = softcap(scores, spec.attn_softcap)
        mask_BxLxS = mask_BxLxS.astype(bool)
        if self.sliding and spec.sliding_window is not None:
            # Query column c sees key column s only if c - s < W.
            s_len = mask_BxLxS.shape[-1]
            window_LxS = q_cols_L[:, None] - jnp.arange(s_len)[None, :] < spec.sliding_window
            mask_BxLxS = mask_BxLxS & window_LxS[None]
        scores = jnp.where(mask_BxLxS[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        return jnp.einsum("bkgls,bksd->bkgld", probs, v)

    def attend_by_chunks(self, q, k, v, mask_BxLxS, q_cols_L, cached: bool, chunk: int,
                         then: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
                         axis: int = 3):
        """`attend`, `chunk` queries at a time, each chunk one program that the backward
        recomputes: the [B, K, G, chunk, S] scores of one chunk exist at once instead of all
        L rows'. Every query's softmax still spans all its keys, so the values are `attend`'s.

        then(out, start): what else each chunk's program does with its [B, K, G, chunk, Dh]
        output (queries start .. start + chunk - 1); the results are joined along `axis`.
        The chunk's slices are taken inside its program, so the loop keeps no per-chunk
        copies for the backward."""
        l_ = q.shape[3]
        rows = query_chunk_rows(mask_BxLxS, l_, chunk)
        q, q_cols_L = pad_to_chunks(q, 3, chunk), pad_to_chunks(q_cols_L, 0, chunk)

        @jax.checkpoint
        def part(start):
            out = self.attend(jax.lax.dynamic_slice_in_dim(q, start, chunk, axis=3), k, v,
                              rows(start), jax.lax.dynamic_slice_in_dim(q_cols_L, start, chunk,
                                                                         axis=0), cached)
            return out if then is None else then(out, start)

        return map_chunks(part, l_, chunk, axis)


def pad_to_chunks(x: jax.Array, axis: int, chunk: int) -> jax.Array:
    """x with zeros appended along `axis` up to a multiple of chunk."""
    pad = -x.shape[axis] % chunk
    return jnp.pad(x, [(0, pad if i == axis else 0) for i in range(x.ndim)])


def map_chunks(fn: Callable[[jax.Array], jax.Array], length: int, chunk: int, axis: int
               ) -> jax.Array:
    """fn(start) for start = 0, chunk, 2·chunk, ... < length (one program, a loop), the
    results joined along `axis` and cut to `length` there."""
    n = -(-length // chunk)
    out = jax.lax.map(fn, jnp.arange(n) * chunk)
    out = jnp.moveaxis(out, 0, axis)
    shape = (*out.shape[:axis], n * chunk, *out.shape[axis + 2:])
    return jax.lax.slice_in_dim(out.reshape(shape), 0, length, axis=axis)


def query_chunk_rows(mask_BxLxS: Any, length: int, chunk: int
                     ) -> Callable[[jax.Array], jax.Array]:
    """rows(start): the [B, chunk, S] mask of queries start .. start + chunk - 1, for chunks
    that run past the last query too. A `CausalMask` builds them in the chunk's program."""
    if isinstance(mask_BxLxS, CausalMask):
        return lambda start: mask_BxLxS.rows(start, chunk)
    # Padded queries see key 0 only, so their softmax stays finite; their rows are dropped.
    pad = -length % chunk
    mask = jnp.pad(mask_BxLxS.astype(bool), ((0, 0), (0, pad), (0, 0)))
    mask = mask.at[:, length:, 0].set(True)
    return lambda start: jax.lax.dynamic_slice_in_dim(mask, start, chunk, axis=1)


class MLP(nnx.Module):
    def __init__(self, spec: ModelSpec, rngs: nnx.Rngs):
        d, f, dt = spec.hidden_size, spec.mlp_dim, spec.dtype
        if spec.fused_projections:
            self.gate_up_proj = _param(rngs, (2 * f, d), (None, "embed"), dt, d**-0.5)
        else:
            self.gate_proj = _param(rngs, (d, f), ("embed", "mlp"), dt, d**-0.5)
            self.up_proj = _param(rngs, (d, f), ("embed", "mlp"), dt, d**-0.5)
        self.down_proj = _param(rngs, (f, d), ("mlp", "embed"), dt, f**-0.5)
        self.activation = spec.mlp_activation
        add_lora_params(self, spec, {"gate": ((d,), ("embed",), (f,), ("mlp",)),
                                     "up": ((d,), ("embed",), (f,), ("mlp",)),
                                     "down": ((f,), ("mlp",), (d,), ("embed",))})
        self.spec = spec

    def __call__(self, x_BxLxD, dropout_key=None):
        """down(act(x·gate) ⊙ x·up); act = silu (SwiGLU) or tanh-approximate gelu (GeGLU).
        dropout_key: the adapters' dropout key (`lora_update`)."""
        spec = self.spec
        if spec.fused_projections:
            pre, up = jnp.split(dense(spec, x_BxLxD, self.gate_up_proj[...], 1), 2, axis=-1)
        else:
            pre = dense(spec, x_BxLxD, self.gate_proj[...], 1)
            up = dense(spec, x_BxLxD, self.up_proj[...], 1)
        pre = lora_update(self, spec, "gate", x_BxLxD, pre, dropout_key)
        gate = jax.nn.silu(pre) if self.activation == "silu" else jax.nn.gelu(pre, approximate=True)
        up = lora_update(self, spec, "up", x_BxLxD, up, dropout_key)
        hidden = gate * up
        return lora_update(self, spec, "down", hidden, dense(spec, hidden, self.down_proj[...], 1),
                           dropout_key)


class Block(nnx.Module):
    """Pre-norm: x += attn(n1(x)); x += mlp(n2(x)). Sandwich (Gemma 2/3): x += n2(attn(n1(x)));
    x += n4(mlp(n3(x))). n2 is `post_attn_norm` either way (HF `post_attention_layernorm`)."""

    def __init__(self, spec: ModelSpec, rngs: nnx.Rngs, layer: int = 0):
        d, eps, dt, p1 = spec.hidden_size, spec.norm_eps, spec.dtype, spec.norm_plus_one
        self.input_norm = RMSNorm(d, eps, dt, p1)
        self.attn = Attention(spec, rngs, sliding=spec.is_sliding(layer))
        self.post_attn_norm = RMSNorm(d, eps, dt, p1)
        if spec.sandwich_norm:
            self.pre_mlp_norm = RMSNorm(d, eps, dt, p1)
            self.post_mlp_norm = RMSNorm(d, eps, dt, p1)
        self.mlp = MLP(spec, rngs)
        self.sandwich = spec.sandwich_norm

    def __call__(self, x, positions, mask, kv=None, cache_index=None, dropout_key=None):
        chunk = self.attn.spec.attn_query_chunk
        if chunk is not None and x.shape[1] > chunk and dropout_key is None:
            return self._by_chunks(x, positions, mask, kv, cache_index, chunk)
        h, kv = self.attn(self.input_norm(x), positions, mask, kv, cache_index, dropout_key)
        return self._after_attention(x, h, dropout_key), kv

    def _after_attention(self, x, h, dropout_key=None):
        """The residual add of the attention output h, then the MLP and its residual."""
        if self.sandwich:
            x = x + self.post_attn_norm(h)
            return x + self.post_mlp_norm(self.mlp(self.pre_mlp_norm(x), dropout_key))
        x = x + h
        return x + self.mlp(self.post_attn_norm(x), dropout_key)

    def _by_chunks(self, x, positions, mask, kv, cache_index, chunk: int):
        """The block `chunk` queries at a time (the trainer's long sequences): the keys and
        values of every column first, then each chunk's attention, output projection and MLP
        as one program that the backward recomputes. Besides one chunk's temporaries, the
        backward then holds [B, L, ·] arrays only for the block's input, its queries, keys and
        values and their gradients, not the MLP's [B, L, F] activations. The values are the
        whole block's: every token goes through the same operations."""
        attn, l_ = self.attn, x.shape[1]
        q, k, v, kv = attn.project(self.input_norm(x), positions, mask, kv, cache_index)
        cols = (0 if cache_index is None else cache_index) + jnp.arange(l_)
        x = pad_to_chunks(x, 1, chunk)

        def rest(out, start):  # the chunk's output projection, residuals and MLP
            return self._after_attention(jax.lax.dynamic_slice_in_dim(x, start, chunk, 1),
                                         attn.output(out))

        return attn.attend_by_chunks(q, k, v, mask, cols, kv is not None, chunk, rest,
                                     axis=1), kv


class Decoder(nnx.Module):
    """tokens -> logits. Call with a KV cache for incremental decoding."""

    def __init__(self, spec: ModelSpec, rngs: nnx.Rngs):
        d, v, dt = spec.hidden_size, spec.vocab_size, spec.dtype
        self.spec = spec
        self.embed = _param(rngs, (v, d), ("vocab", "embed"), dt, 0.02)  # HF-style init
        self.layers = nnx.List([Block(spec, rngs, i) for i in range(spec.num_layers)])
        self.final_norm = RMSNorm(d, spec.norm_eps, dt, spec.norm_plus_one)
        if not spec.tie_embeddings:
            self.lm_head = _param(rngs, (d, v), ("embed", "vocab"), dt, d**-0.5)

    def __call__(self, tokens_BxL, positions_BxL, mask_BxLxS, cache=None, cache_index=None,
                 logit_cols: slice | None = None, dropout_key=None):
        """Returns (logits_BxLxV in float32, new cache or None).

        cache: a list of (k, v) per layer, k [B, K, Dh, S], v [B, K, S, Dh] (`init_cache`); the
        L new positions are written at `cache_index` and `mask_BxLxS` covers all S cache slots.
        logit_cols: compute logits only for these query columns (a static slice); the LM head
        is then applied to those hidden states alone (a prefill needs just the last one).
        dropout_key: LoRA dropout in this forward (`lora_update`), layer i's key folded with i.
        """
        x = embed_tokens(self.spec, self.embed[...], tokens_BxL)
        new_cache = [] if cache is not None else None
        for i, layer in enumerate(self.layers):
            kv = cache[i] if cache is not None else None
            x, kv = layer(x, positions_BxL, mask_BxLxS, kv, cache_index,
                          lora_dropout_key(dropout_key, i))
            if new_cache is not None:
                new_cache.append(kv)
        if logit_cols is not None:
            x = x[:, logit_cols]
        top = {"embed": self.embed[...], "final_norm": {"scale": self.final_norm.scale[...]}}
        if not self.spec.tie_embeddings:
            top["lm_head"] = self.lm_head[...]
        return head_logits(self.spec, top, x), new_cache


# ---------------------------------------------------------------------------------------------
# The model in pieces, on parts of a pure params dict: the embedding, one block, the head. The
# trainer's layered update (trainer/trainer.py) runs each piece as its own program.

# The params outside the blocks: the embedding, the final norm and an untied LM head.
TOP_KEYS = ("embed", "final_norm", "lm_head")


def top_params(params: Params) -> Params:
    """The params the embedding and the head use (everything but the blocks)."""
    return {k: params[k] for k in TOP_KEYS if k in params}


def embed_tokens(spec: ModelSpec, embed_VxD: jax.Array, tokens_BxL: jax.Array) -> jax.Array:
    if spec.out_major and embed_VxD.dtype == jnp.bfloat16:
        # The rows as 16-bit integers: XLA:CPU gathers bf16 from a float32 copy of the whole
        # table, made once per program run (not differentiable: the decode layout only).
        bits = jnp.take(jax.lax.bitcast_convert_type(embed_VxD, jnp.uint16), tokens_BxL, axis=0)
        x = jax.lax.bitcast_convert_type(bits, jnp.bfloat16)
    else:
        x = jnp.take(embed_VxD, tokens_BxL, axis=0)
    if spec.embed_scale != 1.0:
        # HF multiplies by the scale rounded to the weights' dtype (sqrt(D) in bf16).
        x = x * jnp.asarray(spec.embed_scale, x.dtype)
    return x


def head_logits(spec: ModelSpec, top: Params, x_BxLxD: jax.Array) -> jax.Array:
    """Final norm, LM head and soft-cap: hidden states -> float32 logits."""
    x = rms_norm(x_BxLxD, top["final_norm"]["scale"], spec.norm_eps, spec.norm_plus_one)
    # Tied: the embedding transposed (its weight gradient is a small [D, V] transpose).
    if spec.out_major:  # the tied embedding [V, D] is output-major already
        head = top["embed"] if spec.tie_embeddings else top["lm_head"]
        return softcap(dot_out_major(x, head), spec.final_softcap)
    head = top["embed"].T if spec.tie_embeddings else top["lm_head"]
    return softcap(linear(x, head).astype(jnp.float32), spec.final_softcap)


@functools.cache
def _block_def(spec: ModelSpec, sliding: bool) -> tuple[Any, Any]:
    """(graph definition, abstract state) of a block of the given kind."""
    layer = next(i for i in range(spec.num_layers) if spec.is_sliding(i) == sliding)
    return nnx.split(nnx.eval_shape(lambda: Block(spec, nnx.Rngs(0), layer)))


def apply_block(spec: ModelSpec, sliding: bool, params_l: Params, x, positions, mask, kv=None,
                cache_index=None, dropout_key=None):
    """One `Block` (a sliding-window one or not) on its pure params dict; see `Block`."""
    graphdef, abstract = _block_def(spec, sliding)
    state = jax.tree.map(lambda a: a, abstract)
    nnx.replace_by_pure_dict(state, params_l)
    return nnx.merge(graphdef, state)(x, positions, mask, kv, cache_index, dropout_key)


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
                cache=None, cache_index=None, logit_cols: slice | None = None,
                dropout_key=None):
    """Runs the decoder on a pure params dict (call inside jit); see `Decoder.__call__`."""
    state = jax.tree.map(lambda x: x, mdef.abstract_state)  # a fresh State to fill
    nnx.replace_by_pure_dict(state, params)
    model = nnx.merge(mdef.graphdef, state)
    return model(tokens_BxL, positions_BxL, mask_BxLxS, cache, cache_index, logit_cols,
                 dropout_key)


def positions_from_mask(mask_BxL: jax.Array) -> jax.Array:
    """Position ids for left-padded rows: 0 at the first real token, counting up."""
    return jnp.maximum(jnp.cumsum(mask_BxL.astype(jnp.int32), axis=-1) - 1, 0)


def causal_mask(valid_BxS: jax.Array, query_offset: int | jax.Array, length: int) -> jax.Array:
    """[B, L, S] mask: query i (at absolute column query_offset + i) sees valid keys <= it."""
    return CausalMask(valid_BxS, query_offset, length).rows(0, length)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class CausalMask:
    """`causal_mask(valid_BxS, query_offset, length)` kept as its factors, [B, S] and an
    offset, so that attention by chunks of queries builds one chunk's [B, chunk, S] rows at a
    time: the whole [B, L, S] mask grows with the square of the sequence."""

    valid_BxS: jax.Array
    query_offset: int | jax.Array
    length: int = field(metadata={"static": True})

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.valid_BxS.shape[0], self.length, self.valid_BxS.shape[1])

    def rows(self, start: int | jax.Array, size: int) -> jax.Array:
        """The [B, size, S] mask of queries start .. start + size - 1 (past the last query,
        rows as the causal rule extends them)."""
        s = self.valid_BxS.shape[1]
        q_cols = self.query_offset + start + jnp.arange(size)[:, None]
        causal_LxS = jnp.arange(s)[None, :] <= q_cols
        return causal_LxS[None] & self.valid_BxS[:, None, :].astype(bool)


def cache_shapes(spec: ModelSpec, batch: int, length: int
                 ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of one layer's cached (keys, values): keys [B, K, Dh, S] (transposed, see
    Attention), values [B, K, S, Dh]."""
    b, k, s, dh = batch, spec.num_kv_heads, length, spec.head_dim
    return (b, k, dh, s), (b, k, s, dh)


def init_cache(spec: ModelSpec, batch: int, length: int, dtype: Any = None) -> list:
    dt = dtype or spec.dtype
    k_shape, v_shape = cache_shapes(spec, batch, length)
    return [(jnp.zeros(k_shape, dt), jnp.zeros(v_shape, dt)) for _ in range(spec.num_layers)]


def rows_share_prompts(tokens_BxP: Any, mask_BxP: Any, group: int) -> bool:
    """Whether the rows come in consecutive groups of `group` that each carry one prompt (the
    same tokens and mask), as GRPO's G completions of a prompt do. Host arrays."""
    if group <= 1 or np.shape(tokens_BxP)[0] % group:
        return False
    for x in (np.asarray(tokens_BxP), np.asarray(mask_BxP)):
        x_NxGxP = x.reshape(-1, group, x.shape[1])
        if not (x_NxGxP == x_NxGxP[:, :1]).all():
            return False
    return True


def prefill_groups(mdef: ModelDef, params: Params, prompt_BxP: jax.Array,
                   pmask_BxP: jax.Array, group: int, extra_cols: int, dtype: Any = None
                   ) -> tuple[jax.Array, list]:
    """Runs each group's prompt through the model once (see `rows_share_prompts`).

    Returns (logits_BxV at the last prompt column, a cache per layer (see `init_cache`) of
    P + extra_cols columns whose columns [0, P) hold each row's group keys/values and the rest
    zeros, for the tokens that follow at cache_index P). The prompt FLOPs are those of B / G
    rows; a backward through the broadcast sums the G rows' gradients into their shared
    prompt.
    """
    b, p = prompt_BxP.shape
    pmask_NxP = group_firsts(pmask_BxP, group).astype(bool)
    logits_Nx1xV, cache = apply_model(mdef, params, group_firsts(prompt_BxP, group),
                                      positions_from_mask(pmask_NxP),
                                      causal_mask(pmask_NxP, 0, p),
                                      init_cache(mdef.spec, b // group, p, dtype), 0,
                                      logit_cols=slice(p - 1, p))
    cache = [group_kv_to_rows(mdef.spec, kv, group, extra_cols) for kv in cache]
    return to_rows(logits_Nx1xV[:, 0], group), cache


def group_firsts(x_BxR: Any, group: int) -> Any:
    """[B, ...] -> [B / G, ...]: the first row of each group of G."""
    return x_BxR.reshape(-1, group, *x_BxR.shape[1:])[:, 0]


def to_rows(x_Nx: jax.Array, group: int) -> jax.Array:
    """[N, ...] -> [N·G, ...], each group's value repeated G times."""
    n = x_Nx.shape[0]
    return jnp.broadcast_to(x_Nx[:, None], (n, group, *x_Nx.shape[1:])
                            ).reshape(n * group, *x_Nx.shape[1:])


def group_kv_to_rows(spec: ModelSpec, kv: tuple[jax.Array, jax.Array], group: int,
                     extra_cols: int) -> tuple[jax.Array, jax.Array]:
    """One layer's prompt cache of N groups -> B = N·G rows with `extra_cols` zero columns
    after the prompt's (for the tokens that follow)."""
    k, v = kv
    k_pad, v_pad = (jnp.zeros(shape, k.dtype)
                    for shape in cache_shapes(spec, k.shape[0] * group, extra_cols))
    return (jnp.concatenate([to_rows(k, group), k_pad], axis=3),
            jnp.concatenate([to_rows(v, group), v_pad], axis=2))


def param_shardings(mdef: ModelDef, submesh: Any) -> Params:
    """The `NamedSharding` of every param on `submesh`, from its logical axes and the rules."""
    return jax.tree.map(
        lambda axes, shape: submesh.sharding(axes, shape.shape),
        mdef.logical_axes, mdef.shapes(), is_leaf=lambda x: isinstance(x, tuple),
    )


def param_count(params: Params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))
