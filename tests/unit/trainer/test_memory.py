"""The update's memory: log-probs by chunks of the sequence, activation checkpointing, and the
fit check that refuses a config before anything compiles."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from controller.config import AlgorithmConfig, ConfigError, JobConfig, TrainerConfig
from trainer.logprobs import chunked_head, sequence_logprobs_and_entropy, token_logprobs_and_entropy
from trainer.memory import (
    LOGITS_CHUNK_BYTES,
    MemoryBudgetError,
    MemoryPlan,
    activation_bytes,
    attention_chunk,
    estimate_update,
    logits_chunk,
    resolve_remat,
)
from trainer.model import ModelSpec, define_model, head_logits, init_params
from trainer.trainer import TrainBatch, Trainer

B, P, T, V = 4, 3, 7, 97


def _spec(**kw) -> ModelSpec:
    base = dict(vocab_size=V, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                head_dim=8, mlp_dim=32, rope_theta=1e4, norm_eps=1e-6, tie_embeddings=True,
                qkv_bias=True, dtype=jnp.float32)
    return ModelSpec(**{**base, **kw})


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.mark.parametrize("variant", ["tied", "untied-softcap"])
@pytest.mark.parametrize("chunk", [1, 3, 4, 7, 50])
@pytest.mark.parametrize("vocab_block", [10, 97, None])
def test_chunked_head_equals_the_whole_head_with_gradients(variant, chunk, vocab_block):
    # Chunks that divide T (1, 7), that do not (3, 4) and one longer than T: the same log-probs,
    # entropies and gradients (w.r.t. the hidden states, the head weight and the final norm),
    # at temperature 0.7, with cotangents on both outputs. The weight's gradient summed by
    # vocabulary blocks of 10 (nine blocks and a tail of 7), of all 97, or the default.
    spec = _spec(tie_embeddings=variant == "tied",
                 final_softcap=None if variant == "tied" else 5.0)
    k = jax.random.split(jax.random.key(0), 7)
    top = {"embed": jax.random.normal(k[0], (V, 16)),
           "final_norm": {"scale": 1 + 0.1 * jax.random.normal(k[1], (16,))}}
    if variant != "tied":
        top["lm_head"] = jax.random.normal(k[2], (16, V)) * 0.3
    x = jax.random.normal(k[3], (B, T, 16))
    tok = jax.random.randint(k[4], (B, T), 0, V)
    g_lp, g_ent = jax.random.normal(k[5], (B, T)), jax.random.normal(k[6], (B, T))

    def objective(head):
        def f(top, x):
            lp, ent = head(top, x)
            return jnp.sum(lp * g_lp) + jnp.sum(ent * g_ent), (lp, ent)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(top, x)

    (_, (lp0, e0)), g0 = objective(
        lambda top, x: token_logprobs_and_entropy(head_logits(spec, top, x), tok, 0.7))
    (_, (lp1, e1)), g1 = objective(lambda top, x: chunked_head(spec, top, x, tok, 0.7, chunk,
                                                               vocab_block=vocab_block))
    assert lp1.shape == (B, T) and e1.shape == (B, T)
    assert _rel(lp1, lp0) <= 1e-6 and _rel(e1, e0) <= 1e-6
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
        if np.any(b):
            assert _rel(a, b) <= 1e-6
        else:  # the untied model's embedding: not used by the head
            assert not np.any(a)


@pytest.fixture(scope="module")
def model():
    spec = _spec()
    return define_model(spec), init_params(spec, seed=5)


def _rows(seed: int, group: int = 1):
    rng = np.random.default_rng(seed)
    prompt = rng.integers(2, V, (B, P)).astype(np.int32)
    pmask = np.ones((B, P), bool)
    pmask[:2, 0] = False  # left padding
    if group > 1:
        prompt, pmask = (np.repeat(x[::group], group, 0) for x in (prompt, pmask))
    comp = rng.integers(2, V, (B, T)).astype(np.int32)
    cmask = np.ones((B, T), bool)
    cmask[1, 4:] = False
    return prompt, pmask, comp, cmask


@pytest.fixture(scope="module")
def sliding_model():
    """Gemma-like: a sliding-window layer (window 4) before a global one, soft-capped scores."""
    spec = _spec(sliding_window=4, sliding_layers=(True, False), attn_softcap=20.0)
    return define_model(spec), init_params(spec, seed=6)


@pytest.mark.parametrize("variant", ["per-row", "grouped", "sliding"])
def test_sequence_logprobs_by_chunks_and_policies_equal_the_plain_forward(
        model, sliding_model, variant):
    # Through the model: per-row and shared-prompt forwards and sliding-window attention;
    # every head chunk, attention chunk (3 and 4 queries: neither divides the 10 or 7 query
    # columns) and checkpointing policy give the plain forward's values and gradients.
    mdef, params = sliding_model if variant == "sliding" else model
    group = 2 if variant == "grouped" else 1
    prompt, pmask, comp, cmask = (jnp.asarray(x) for x in _rows(1, group))
    adv = jnp.asarray(np.linspace(-1, 1, B), jnp.float32)

    def run(chunk, remat, attention):
        def f(p):
            lp, ent = sequence_logprobs_and_entropy(mdef, p, prompt, pmask, comp, cmask, 1.0,
                                                    group, chunk=chunk, remat=remat,
                                                    attention_chunk=attention)
            return jnp.sum(lp * cmask * adv[:, None]) + 0.1 * jnp.sum(ent * cmask), (lp, ent)
        (_, out), g = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
        return out, g

    (lp0, e0), g0 = run(None, "none", None)
    for chunk, remat, attention in [(2, "none", None), (5, "block", 3), (None, "matmuls", None),
                                    (3, "matmuls", 4), (None, "none", 1)]:
        (lp, e), g = run(chunk, remat, attention)
        assert _rel(lp, lp0) <= 1e-6 and _rel(e, e0) <= 1e-6, (chunk, remat, attention)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0), strict=True):
            assert _rel(a, b) <= 1e-5, (chunk, remat, attention)


def _gradient_temp_bytes(spec: ModelSpec, completion_len: int, **options) -> int:
    """XLA's own accounting of the temporaries of the gradient of Σ log π over 4 rows of 8 prompt
    and `completion_len` completion columns, with `sequence_logprobs_and_entropy`'s options."""
    mdef = define_model(spec)
    params = jax.eval_shape(lambda: init_params(spec, 0))
    shapes = [jax.ShapeDtypeStruct((4, n), dt) for n, dt in
              ((8, jnp.int32), (8, jnp.bool_), (completion_len, jnp.int32),
               (completion_len, jnp.bool_))]

    def loss(p, *rows):
        return jnp.sum(sequence_logprobs_and_entropy(mdef, p, *rows, 1.0, **options)[0])
    compiled = jax.jit(jax.grad(loss)).lower(params, *shapes).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_chunks_shrink_the_compiled_programs_memory():
    # What the chunk is for: at a vocabulary of 32,768 the whole head holds [4, 256, 32768]
    # float32 logits several times; by chunks of 16 positions a sixteenth of that.
    spec = _spec(vocab_size=32768, num_layers=1)
    whole = _gradient_temp_bytes(spec, 256, chunk=None)
    chunked = _gradient_temp_bytes(spec, 256, chunk=16)
    assert whole >= 2 * (4 * 256 * 32768 * 4) and chunked < whole / 4, (whole, chunked)


def test_the_head_weight_gradient_is_summed_in_place():
    # Tied head at vocabulary 32,768, d=256: the [V, D] weight gradient (32 MiB) is the
    # program's output; by vocabulary blocks of 1,024 its backward holds no second [V, D] array
    # (each block's share is 1 MiB), only a chunk's logits and their derivatives. In one block
    # XLA:CPU computes the chunk's whole share before adding it.
    v, d, rows, t, chunk = 32768, 256, 4, 64, 8
    spec = _spec(vocab_size=v, hidden_size=d)
    top = {"embed": jax.ShapeDtypeStruct((v, d), jnp.float32),
           "final_norm": {"scale": jax.ShapeDtypeStruct((d,), jnp.float32)}}
    x = jax.ShapeDtypeStruct((rows, t, d), jnp.float32)
    tok = jax.ShapeDtypeStruct((rows, t), jnp.int32)

    def temp_bytes(vocab_block):
        def loss(top, x, tok):
            return jnp.sum(chunked_head(spec, top, x, tok, 1.0, chunk, False, vocab_block)[0])
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(top, x, tok).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    weight, chunk_logits = v * d * 4, rows * chunk * v * 4
    whole, blocked = temp_bytes(v), temp_bytes(1024)
    assert whole >= weight and blocked < weight and blocked < 4 * chunk_logits, (whole, blocked)


def test_attention_chunks_shrink_the_compiled_programs_memory():
    # All 1,032 queries' scores at once: [4, 2, 1032, 1032] float32 (34 MB) several times; by
    # chunks of 64 queries, one chunk's (recomputed in the backward).
    spec = _spec(num_layers=1)
    whole = _gradient_temp_bytes(spec, 1024, attention_chunk=None)
    chunked = _gradient_temp_bytes(spec, 1024, attention_chunk=64)
    scores = 4 * 2 * 1032 * 1032 * 4
    assert whole >= 2 * scores and chunked < whole / 4, (whole, chunked)


def _block_backward_temp_bytes(spec: ModelSpec, length: int, group: int,
                               attention: int | None) -> int:
    """XLA's temporaries of one block's backward program as the layered update runs it: the
    pullback of the block under "block" checkpointing (the block recomputed, then its
    backward), for 4 rows of 8 prompt and `length` completion columns."""
    from trainer.logprobs import block_rows, rematerialized, with_attention_chunk

    mdef = with_attention_chunk(define_model(spec), attention)
    layer = jax.eval_shape(lambda: init_params(spec, 0))["layers"][0]
    pmask, cmask = jnp.ones((4, 8), bool), jnp.ones((4, length), bool)
    d = spec.hidden_size
    h = ((jax.ShapeDtypeStruct((4 // group, 8, d), jnp.float32),
          jax.ShapeDtypeStruct((4, length, d), jnp.float32)) if group > 1
         else (jax.ShapeDtypeStruct((4, 8 + length, d), jnp.float32),))

    def block(p, x):
        return block_rows(mdef, False, p, x, pmask, cmask, group)

    _, pullback = jax.eval_shape(lambda p, x: jax.vjp(rematerialized(block, "block"), p, x),
                                 layer, h)
    compiled = jax.jit(lambda pb, dh: pb(dh)).lower(pullback, h).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("group", [1, 4])
def test_a_chunked_blocks_backward_grows_linearly_with_the_sequence(group):
    # By chunks of 64 queries, a block's backward holds [rows, length, ·] arrays and one
    # chunk's [rows, heads, 64, length] scores: doubling the sequence about doubles it. A
    # [rows, length, length] mask (4 MB at 1,032 columns, 16 MB at 2,056) would quadruple.
    spec = _spec(num_layers=1)
    short, long = (_block_backward_temp_bytes(spec, n, group, 64) for n in (1024, 2048))
    assert long < 2.2 * short, (short, long)


def test_a_chunked_block_keeps_no_whole_sequence_mlp_activations():
    # A wide MLP (F = 1,024 at D = 16): the whole block's backward holds [4, 1032, 1024]
    # float32 activations (16.9 MB each) several times; by chunks of 64 queries the MLP runs
    # one chunk at a time, and what the backward holds is a few [4, 1032, 16] arrays and one
    # chunk's activations and scores.
    spec = _spec(num_layers=1, mlp_dim=1024)
    mlp_activation = 4 * 1032 * 1024 * 4
    whole = _block_backward_temp_bytes(spec, 1024, 1, None)
    chunked = _block_backward_temp_bytes(spec, 1024, 1, 64)
    assert whole > 2 * mlp_activation and chunked < mlp_activation, (whole, chunked)


def test_checkpointing_shrinks_what_a_block_keeps_for_its_backward(model):
    # The residuals of one block's forward: what the layered update holds between a block's
    # forward and backward programs, for every layer at once. At 512 columns the attention
    # probabilities ([4, 2, 512, 512] float32) dominate "none"; "matmuls" keeps the
    # projections' outputs; "block" keeps the block's input (and its params, which the
    # backward gets anyway).
    from trainer.logprobs import block_rows, rematerialized

    mdef, params = model
    layer = params["layers"][0]
    pmask, cmask = jnp.ones((4, 8), bool), jnp.ones((4, 504), bool)
    h = (jnp.zeros((4, 512, 16)),)

    def kept(remat):
        def block(p, x):
            return block_rows(mdef, False, p, x, pmask, cmask, 1)
        pullback = jax.eval_shape(lambda p, x: jax.vjp(rematerialized(block, remat), p, x)[1],
                                  layer, h)
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(pullback))

    none, matmuls, block = kept("none"), kept("matmuls"), kept("block")
    probs = 4 * 2 * 512 * 512 * 4
    assert none > 2 * probs and matmuls < probs and block < matmuls, (none, matmuls, block)
    inputs = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((layer, h)))
    assert block <= inputs + cmask.size + pmask.size + 1024  # and a few scalars


@pytest.fixture(scope="module")
def batch():
    prompt, pmask, comp, cmask = _rows(2)
    adv = np.array([1.0, -1.0, 0.5, -0.5], np.float32)
    return TrainBatch(prompt, pmask, comp, cmask, adv, np.zeros((B, T), np.float32))


def _host(tree):
    return jax.tree.map(np.array, jax.device_get(tree))


@pytest.mark.parametrize("layered", [False, True])
def test_an_update_lands_on_the_same_params_under_every_policy(model, meshes, batch, layered):
    # One AdamW-free SGD update with the reference model's KL and an entropy bonus in the
    # loss, by the one-program update and by the per-layer programs: every checkpointing
    # policy and a chunked head land on the same parameters and metrics.
    mdef, params = model
    algo = AlgorithmConfig(beta=0.5, entropy_coef=0.01)

    def update(memory):
        trainer = Trainer(mdef, _host(params), optax.sgd(0.1), meshes.trainer, algo, 1.0,
                          layered=layered, memory=memory)
        assert trainer.uses_layered_update() == layered
        aux = jax.device_get(trainer.update(batch))
        return _host(trainer.params), aux

    p0, aux0 = update(TrainerConfig(remat="none"))
    moved = [np.max(np.abs(a - b)) for a, b in zip(jax.tree.leaves(p0),
                                                     jax.tree.leaves(_host(params)), strict=True)]
    assert max(moved) > 1e-3  # the update did something
    for memory in (TrainerConfig(remat="block"), TrainerConfig(remat="matmuls"),
                   TrainerConfig(remat="block", logits_chunk=3, attention_chunk=4)):
        p, aux = update(memory)
        for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p0), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
        for k in aux0:
            assert aux[k] == pytest.approx(aux0[k], rel=1e-5, abs=1e-7), (memory, k)


def test_the_automatic_chunk_bounds_a_chunks_logits():
    # Small logits: the whole completion at once. Qwen2.5's vocabulary, 8 rows of 1,024
    # tokens: the largest chunk whose float32 logits take at most LOGITS_CHUNK_BYTES.
    assert logits_chunk(None, 8, 64, 1024) is None
    c = logits_chunk(None, 8, 1024, 151_936)
    assert c == LOGITS_CHUNK_BYTES // (8 * 151_936 * 4) == 13
    assert 8 * c * 151_936 * 4 <= LOGITS_CHUNK_BYTES < 8 * (c + 1) * 151_936 * 4
    assert logits_chunk(None, 4096, 16, 262_144) == 1  # never below one position
    assert logits_chunk(100, 8, 64, 1024) is None  # a chunk past the length is the whole
    assert logits_chunk(16, 8, 64, 1024) == 16


def test_automatic_checkpointing_follows_the_activations():
    spec = _spec(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, head_dim=64,
                 mlp_dim=1536)
    gib = 2**30
    assert attention_chunk(None, spec, 8, 512) is None  # 64 MiB of scores: all at once
    assert attention_chunk(None, spec, 8, 8192) == 2**28 // (8 * 8 * 8192 * 4) == 128
    assert attention_chunk(32, spec, 8, 8192) == 32 and attention_chunk(9000, spec, 8, 8192) is None
    assert resolve_remat("auto", spec, 8, 512, 16 * gib) == "none"
    assert resolve_remat("auto", spec, 8, 8192, 16 * gib) == "block"
    # By chunks of queries the scores no longer grow with L x L: 1,024 columns fit unchecked.
    assert resolve_remat("auto", spec, 8, 1024, 16 * gib, attn_chunk=None) == "block"
    assert resolve_remat("auto", spec, 8, 1024, 16 * gib, attn_chunk=128) == "none"
    assert resolve_remat("matmuls", spec, 8, 8192, 16 * gib) == "matmuls"
    # Attention's L x L scores dominate long sequences without checkpointing.
    assert (activation_bytes(spec, 8, 4096, "block") < activation_bytes(spec, 8, 4096, "matmuls")
            < activation_bytes(spec, 8, 4096, "none"))


def test_a_config_that_cannot_fit_names_the_fields_to_change():
    # Qwen2.5-0.5B's shapes on a 16 GiB device: the message names the fields, and suggests
    # the option that shrinks the largest term: the whole head's logits, or the activations.
    spec = _spec(vocab_size=151_936, hidden_size=896, num_layers=24, num_heads=14,
                 num_kv_heads=2, head_dim=64, mlp_dim=4864)
    common = dict(param_bytes=2 * 10**9, reference=True, rows=64, device_bytes=16 * 2**30)
    head_bound = estimate_update(spec, prompt_len=64, completion_len=1024,
                                 plan=MemoryPlan(None, "block", None), **common)
    attention_bound = estimate_update(spec, prompt_len=512, completion_len=4096,
                                      plan=MemoryPlan(16, "none", None), **common)
    for est, fix, not_fix in ((head_bound, "trainer.logits_chunk=16", "trainer.remat"),
                              (attention_bound, "trainer.remat=block", "trainer.logits_chunk")):
        with pytest.raises(MemoryBudgetError) as e:
            est.check("data.prompts_per_step x sampling.group_size")
        msg = str(e.value)
        assert isinstance(e.value, ConfigError)
        for needle in (fix, "data.prompts_per_step", "sampling.max_new_tokens",
                       "topology.trainer_devices", "16.00 GiB", "the update does not fit"):
            assert needle in msg, needle
        assert f"(fix: {not_fix}" not in msg and f"; or {not_fix}" not in msg
    small = dataclasses.replace(head_bound, activations=0, logits=0, params=10**6,
                                optimizer=2 * 10**6, gradients=10**6, reference=10**6)
    small.check("rows")  # fits: no error


def test_the_trainer_refuses_an_update_too_large_for_its_devices(model, meshes, batch):
    mdef, params = model
    trainer = Trainer(mdef, _host(params), optax.sgd(0.1), meshes.trainer,
                      AlgorithmConfig(beta=0.0), 1.0)
    trainer.device_bytes = 2**14  # a 16 KiB device: less than its parameters
    with pytest.raises(MemoryBudgetError, match="the update does not fit"):
        trainer.update(batch)
    trainer.device_bytes = None  # unknown: never refused
    trainer.update(batch)


def test_trainer_section_validates_its_fields():
    assert JobConfig().trainer == TrainerConfig(logits_chunk=None, remat="auto",
                                                attention_chunk=None)
    with pytest.raises(ValueError, match="logits_chunk"):
        JobConfig.model_validate({"trainer": {"logits_chunk": 0}})
    with pytest.raises(ValueError, match="remat"):
        JobConfig.model_validate({"trainer": {"remat": "everything"}})
