"""LoRA: adapters on a frozen base, their update, the reference model with adapters switched
off, merging, and the trainer's state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from controller.config import AlgorithmConfig, JobConfig
from trainer import lora
from trainer.logprobs import sequence_logprobs, sequence_logprobs_and_entropy
from trainer.model import (
    ModelSpec,
    apply_model,
    causal_mask,
    define_model,
    init_params,
    lora_dropout_key,
    lora_dropped,
)
from trainer.trainer import TrainBatch, Trainer

B, P, T, V = 4, 3, 6, 61
ALL = ("q", "k", "v", "o", "gate", "up", "down")


def _spec(**kw) -> ModelSpec:
    base = dict(vocab_size=V, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                head_dim=8, mlp_dim=24, rope_theta=1e4, norm_eps=1e-6, tie_embeddings=True,
                qkv_bias=True, dtype=jnp.float32)
    return ModelSpec(**{**base, **kw})


@pytest.fixture(scope="module")
def model():
    """(base ModelDef, base params, LoRA ModelDef of rank 4 on every projection)."""
    spec = _spec()
    return (define_model(spec), init_params(spec, seed=2),
            define_model(lora.with_lora(spec, 4, 8.0, ALL, "float32")))


def _random_adapters(lmdef, seed):
    """Adapters with B drawn too (the initial B = 0 would make every test below trivial)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(s.dtype),
                        lora.split(lmdef.shapes())[1])


def _forward(mdef, params, tokens, dropout_key=None):
    mask = jnp.ones(tokens.shape, bool)
    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return np.asarray(jax.jit(lambda p, k: apply_model(
        mdef, p, tokens, pos, causal_mask(mask, 0, tokens.shape[1]), dropout_key=k)[0])(
        params, dropout_key))


TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, V, (2, 9)), jnp.int32)


def test_initial_adapters_leave_the_base_model_exactly(model):
    mdef, base, lmdef = model
    adapters = lora.init_adapters(lmdef.shapes(), seed=0)
    a = adapters["layers"][0]["attn"]["q_lora_a"]
    assert a.shape == (16, 4) and np.abs(a).max() <= 16**-0.5 and np.abs(a).max() > 0
    assert not np.any(adapters["layers"][1]["mlp"]["down_lora_b"])  # B = 0
    np.testing.assert_array_equal(_forward(lmdef, lora.combine(base, adapters), TOKENS),
                                  _forward(mdef, base, TOKENS))


def test_adapters_switched_off_are_the_base_and_merging_equals_the_unmerged_forward(model):
    mdef, base, lmdef = model
    adapters = _random_adapters(lmdef, 1)
    unmerged = _forward(lmdef, lora.combine(base, adapters), TOKENS)
    assert np.abs(unmerged - _forward(mdef, base, TOKENS)).max() > 0.1  # adapters matter
    np.testing.assert_array_equal(
        _forward(lmdef, lora.combine(base, lora.switched_off(adapters)), TOKENS),
        _forward(mdef, base, TOKENS))
    merged = lora.merge(lmdef.spec, base, adapters)
    assert jax.tree.structure(merged) == jax.tree.structure(base)
    np.testing.assert_allclose(_forward(mdef, merged, TOKENS), unmerged, atol=1e-5)
    # The update each projection gets: (alpha / rank) · A·B with alpha 8, rank 4.
    a, b = (adapters["layers"][1]["attn"][f"o_lora_{x}"] for x in "ab")
    want = base["layers"][1]["attn"]["o_proj"] + 2.0 * (a.reshape(-1, 4) @ b).reshape(2, 8, 16)
    np.testing.assert_allclose(merged["layers"][1]["attn"]["o_proj"], want, rtol=1e-6)


def test_split_and_combine_are_inverse(model):
    _, base, lmdef = model
    adapters = _random_adapters(lmdef, 2)
    full = lora.combine(base, adapters)
    b, a = lora.split(full)
    assert jax.tree.structure(b) == jax.tree.structure(base)
    assert jax.tree.structure(a) == jax.tree.structure(adapters)
    assert sorted(full["layers"][0]["mlp"]) == ["down_lora_a", "down_lora_b", "down_proj",
                                                 "gate_lora_a", "gate_lora_b", "gate_proj",
                                                 "up_lora_a", "up_lora_b", "up_proj"]


def test_targets_choose_the_projections(model):
    spec = _spec()
    shapes = define_model(lora.with_lora(spec, 2, 4.0, ("q", "down"), "bfloat16")).shapes()
    _, a = lora.split(shapes)
    assert sorted(a["layers"][0]["attn"]) == ["q_lora_a", "q_lora_b"]
    assert sorted(a["layers"][0]["mlp"]) == ["down_lora_a", "down_lora_b"]
    assert a["layers"][0]["mlp"]["down_lora_a"].shape == (24, 2)
    assert a["layers"][0]["attn"]["q_lora_b"].shape == (2, 2, 8)
    assert a["layers"][0]["attn"]["q_lora_b"].dtype == jnp.bfloat16


def _batch():
    rng = np.random.default_rng(3)
    prompt = rng.integers(1, V, (B, P)).astype(np.int32)
    pmask = np.ones((B, P), bool)
    pmask[0, 0] = False
    comp = rng.integers(1, V, (B, T)).astype(np.int32)
    cmask = np.ones((B, T), bool)
    cmask[2, 4:] = False
    adv = np.array([1.0, -0.5, 0.7, -1.2], np.float32)
    return TrainBatch(prompt, pmask, comp, cmask, adv, np.zeros((B, T), np.float32))


def _host(tree):
    return jax.tree.map(np.array, jax.device_get(tree))


@pytest.mark.parametrize("layered", [False, True])
def test_an_update_moves_only_the_adapters_by_their_gradient(model, meshes, layered):
    # One SGD step, β = 0, μ = 1: the adapters move by -lr ∇_adapters of the REINFORCE loss
    # through the adapted model (token-mean weights), the base stays bit for bit.
    _, base, lmdef = model
    adapters = _random_adapters(lmdef, 4)
    batch = _batch()
    lr = 0.3
    trainer = Trainer(lmdef, _host(base), optax.sgd(lr), meshes.trainer,
                      AlgorithmConfig(beta=0.0), 1.0, layered=layered, adapters=_host(adapters))
    assert trainer.uses_layered_update() == layered and trainer.ref_params is None
    trainer.update(batch)
    assert all(np.array_equal(x, y) for x, y in zip(
        jax.tree.leaves(_host(trainer.base)), jax.tree.leaves(base), strict=True))
    b = jax.tree.map(jnp.asarray, batch)

    def loss(a):
        lp = sequence_logprobs(lmdef, lora.combine(base, a), b.prompt_tokens_BxP,
                               b.prompt_mask_BxP, b.completion_tokens_BxT,
                               b.completion_mask_BxT, 1.0)
        m = b.completion_mask_BxT.astype(jnp.float32)
        return -jnp.sum(b.advantages_B[:, None] * lp * m) / jnp.sum(m)

    g = jax.jit(jax.grad(loss))(adapters)
    want = jax.tree.map(lambda x, gx: x - lr * gx, adapters, g)
    for got, w in zip(jax.tree.leaves(_host(trainer.params)), jax.tree.leaves(_host(want)),
                      strict=True):
        np.testing.assert_allclose(got, w, atol=2e-6)
    assert max(np.abs(x - y).max() for x, y in zip(
        jax.tree.leaves(_host(trainer.params)), jax.tree.leaves(adapters), strict=True)) > 1e-3


def test_reference_is_the_base_and_the_kl_starts_at_zero(model, meshes):
    mdef, base, lmdef = model
    batch = _batch()
    trainer = Trainer(lmdef, _host(base), optax.sgd(0.5), meshes.trainer,
                      AlgorithmConfig(beta=0.5), 1.0,
                      adapters=lora.init_adapters(lmdef.shapes(), 0))
    # B = 0: the policy is the base, so the KL to the reference is 0 on the first update...
    aux = jax.device_get(trainer.update(batch))
    assert aux["kl/mean"] == 0.0
    # ... and after it, the reference forward still equals the base model's own forward.
    step = trainer._update_step
    b = trainer.place_batch(batch)
    ref = jax.jit(lambda a, f: step.logprobs(step.reference(a, f), b))(trainer.params,
                                                                         trainer.base)
    plain = jax.jit(lambda p: sequence_logprobs(mdef, p, b.prompt_tokens_BxP, b.prompt_mask_BxP,
                                                b.completion_tokens_BxT,
                                                b.completion_mask_BxT, 1.0))(base)
    # (the sharded forward on the trainer mesh against the plain one: equal up to rounding)
    np.testing.assert_allclose(np.asarray(ref), np.asarray(plain), rtol=1e-6)
    aux = jax.device_get(trainer.update(batch))
    assert aux["kl/mean"] > 0  # the adapters moved the policy away from the base


def test_lora_state_holds_adapters_and_their_optimizer_only(model, meshes):
    _, base, lmdef = model
    adapters = lora.init_adapters(lmdef.shapes(), 0)
    trainer = Trainer(lmdef, _host(base), optax.adamw(1e-3), meshes.trainer,
                      AlgorithmConfig(beta=0.04), 1.0, adapters=adapters)
    n_adapters = sum(x.size for x in jax.tree.leaves(adapters))
    n_base = sum(x.size for x in jax.tree.leaves(base))
    assert sum(x.size for x in jax.tree.leaves(trainer.state["params"])) == n_adapters
    # AdamW's two moments per adapter leaf, plus its step count.
    assert sum(x.size for x in jax.tree.leaves(trainer.state["opt_state"])) == 2 * n_adapters + 1
    est = trainer.memory_estimate(B, P, T)
    assert est.optimizer == 2 * est.gradients and est.reference == 0
    assert est.gradients < est.params / 2
    assert n_adapters < n_base / 2


def test_lora_config_errors_name_the_field():
    for bad, needle in (({"rank": 0}, "greater than or equal to 1"),
                        ({"targets": ["q", "qkv"]}, "unknown target(s) ['qkv']"),
                        ({"targets": []}, "no targets"),
                        ({"alpha": -1}, "greater than 0")):
        with pytest.raises(ValueError, match=r"model\.lora") as e:
            JobConfig.model_validate({"model": {"lora": bad}})
        assert needle in str(e.value)
    with pytest.raises(ValueError, match="choose from q, k, v, o, gate, up, down"):
        JobConfig.model_validate({"model": {"lora": {"targets": ["x"]}}})
    c = JobConfig.model_validate({"model": {"lora": {"rank": 16}}}).model.lora
    assert c.scale_alpha == 32.0 and c.targets == list(ALL) and c.sampler == "merged"


# -- dropout --------------------------------------------------------------------------------

def test_dropout_zeroes_a_fraction_p_of_the_input_and_rescales_the_rest():
    spec = lora.with_lora(_spec(), 4, 8.0, ALL, "float32", dropout=0.25)
    x = jnp.full((400, 250), 3.0)
    y = np.asarray(lora_dropped(spec, x, jax.random.key(0)))
    dropped = y == 0
    assert abs(dropped.mean() - 0.25) < 0.01
    np.testing.assert_array_equal(y[~dropped], 4.0)  # 3 / (1 - 0.25)
    assert abs(y.mean() - 3.0) < 0.03  # unbiased: E[dropout(x)] = x
    # Another key, another mask; no key or p = 0: x untouched.
    assert not np.array_equal(dropped, np.asarray(lora_dropped(spec, x, jax.random.key(1))) == 0)
    assert lora_dropped(spec, x, None) is x
    assert lora_dropped(_spec(lora_dropout=0.0), x, jax.random.key(0)) is x


def test_dropout_acts_on_the_adapter_path_only(model):
    mdef, base, _ = model
    lmdef = define_model(lora.with_lora(mdef.spec, 4, 8.0, ALL, "float32", dropout=0.5))
    adapters = _random_adapters(lmdef, 1)
    params = lora.combine(base, adapters)
    key = jax.random.key(3)
    plain = _forward(lmdef, params, TOKENS)
    dropped = _forward(lmdef, params, TOKENS, key)
    assert np.abs(dropped - plain).max() > 0.1
    np.testing.assert_array_equal(_forward(lmdef, params, TOKENS, key), dropped)  # same key
    assert np.abs(_forward(lmdef, params, TOKENS, jax.random.key(4)) - dropped).max() > 0.1
    # Zero adapters: the base exactly, whatever the dropout draws (the base path keeps x).
    off = lora.combine(base, lora.switched_off(adapters))
    np.testing.assert_array_equal(_forward(lmdef, off, TOKENS, key), _forward(mdef, base, TOKENS))


@pytest.mark.parametrize("layered", [False, True])
def test_an_update_with_dropout_follows_the_gradient_through_the_dropped_forward(
        model, meshes, layered):
    # One SGD step with p = 0.3: the adapters move by -lr ∇ of the REINFORCE loss through the
    # forward with the masks of update 0 (run seed 5, optimizer step 0, microbatch 0), the same
    # masks in the one-program and the per-layer update; not by the gradient without dropout.
    mdef, base, _ = model
    lmdef = define_model(lora.with_lora(mdef.spec, 4, 8.0, ALL, "float32", dropout=0.3))
    adapters = _random_adapters(lmdef, 4)
    batch = _batch()
    lr = 0.3
    trainer = Trainer(lmdef, _host(base), optax.sgd(lr), meshes.trainer,
                      AlgorithmConfig(beta=0.0), 1.0, layered=layered, adapters=_host(adapters),
                      seed=5)
    trainer.update(batch)
    b = jax.tree.map(jnp.asarray, batch)
    key = lora_dropout_key(jax.random.fold_in(jax.random.key(5), 0), 0, 0)

    def loss(a, k):
        lp, _ = sequence_logprobs_and_entropy(
            lmdef, lora.combine(base, a), b.prompt_tokens_BxP, b.prompt_mask_BxP,
            b.completion_tokens_BxT, b.completion_mask_BxT, 1.0, dropout_key=k)
        m = b.completion_mask_BxT.astype(jnp.float32)
        return -jnp.sum(b.advantages_B[:, None] * lp * m) / jnp.sum(m)

    got = jax.tree.leaves(_host(trainer.params))
    for k, close in ((key, True), (None, False)):
        g = jax.jit(jax.grad(loss))(adapters, k)
        want = jax.tree.leaves(_host(jax.tree.map(lambda x, gx: x - lr * gx, adapters, g)))
        gap = max(np.abs(x - y).max() for x, y in zip(got, want, strict=True))
        assert (gap < 2e-6) if close else (gap > 1e-4), (k, gap)
    assert all(np.array_equal(x, y) for x, y in zip(
        jax.tree.leaves(_host(trainer.base)), jax.tree.leaves(base), strict=True))


def test_dropout_config_and_peft_config():
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"model\.lora\.dropout"):
            JobConfig.model_validate({"model": {"lora": {"dropout": bad}}})
    c = JobConfig.model_validate({"model": {"lora": {"dropout": 0.05}}}).model.lora
    spec = lora.configured(_spec(), c)
    assert spec.lora_dropout == 0.05
    assert lora.peft_config(spec, None)["lora_dropout"] == 0.05
    assert JobConfig.model_validate({"model": {"lora": {}}}).model.lora.dropout == 0.0
