"""The jitted update (μ iterations × minibatches × gradient accumulation) against plain loops."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from controller.config import AlgorithmConfig, ModelConfig
from trainer.logprobs import sequence_logprobs, sequence_logprobs_and_entropy
from trainer.loss import grpo_loss
from trainer.trainer import TrainBatch, Trainer

B, P, T = 8, 3, 4


@pytest.fixture(scope="module")
def small_model(tokenizer):
    """1 layer, d=16: these tests compare update arithmetic, so compile as little as we can."""
    from trainer.model import ModelSpec, define_model, init_params

    cfg = ModelConfig(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=32)
    spec = ModelSpec.from_config(cfg, tokenizer.vocab_size)
    return define_model(spec), init_params(spec, seed=3)


@pytest.fixture(scope="module")
def batch(tokenizer):
    rng = np.random.default_rng(0)
    v = tokenizer.vocab_size
    prompt = rng.integers(2, v, (B, P)).astype(np.int32)
    pmask = np.ones((B, P), bool)
    pmask[:4, 0] = False  # left padding on half the rows
    comp = rng.integers(2, v, (B, T)).astype(np.int32)
    cmask = np.ones((B, T), bool)
    cmask[1, 2:] = False
    cmask[5, 1:] = False
    loss_mask = cmask.copy()
    loss_mask[6] = False  # an overlong-filtered row: visible to attention, no loss
    adv = rng.normal(0, 1, B).astype(np.float32)
    return TrainBatch(prompt, pmask, comp, cmask, adv, np.zeros((B, T), np.float32), loss_mask)


def _host(tree):
    return jax.tree.map(lambda x: np.array(x), jax.device_get(tree))


def _trainer(small_model, meshes, lr, trainer_kw=None, **algo):
    mdef, params = small_model
    cfg = AlgorithmConfig(**{"beta": 0.0, **algo})
    # A host copy: the trainer donates its state, which must not alias the shared fixture.
    return Trainer(mdef, _host(params), optax.sgd(lr), meshes.trainer, cfg, temperature=1.0,
                   **(trainer_kw or {}))


AGG = "seq-mean-token-mean"  # per-row weights 1/(|y_b|·S): the mode most sensitive to chunking


@pytest.fixture(scope="module")
def one_step(small_model, meshes, batch):
    """(params, aux) after one μ=1, β=0, single-minibatch update with SGD(0.1)."""
    trainer = _trainer(small_model, meshes, 0.1, loss_aggregation=AGG)
    aux = jax.device_get(trainer.update(batch))
    return _host(trainer.params), aux


def test_mu1_update_is_a_plain_policy_gradient_step(small_model, batch, one_step):
    # μ = 1, β = 0, one minibatch, SGD(lr): θ' = θ - lr ∇(-Σ_bt w_bt A_b log π_bt) with the
    # seq-mean-token-mean weights w_bt = m_bt / (|y_b| · S) (row 6 has no loss tokens: S = 7).
    mdef, params = small_model
    lr = 0.1
    got_params, aux = one_step
    b = jax.tree.map(jnp.asarray, batch)

    def reinforce(p):
        lp = sequence_logprobs(mdef, p, b.prompt_tokens_BxP, b.prompt_mask_BxP,
                               b.completion_tokens_BxT, b.completion_mask_BxT, 1.0)
        m = b.loss_mask_BxT.astype(jnp.float32)
        n_B = m.sum(-1)
        w = m / (jnp.maximum(n_B, 1.0)[:, None] * jnp.sum(n_B > 0))
        return -jnp.sum(b.advantages_B[:, None] * lp * w)

    g = jax.jit(jax.grad(reinforce))(params)
    want = jax.tree.map(lambda x, gx: x - lr * gx, params, g)
    for got_leaf, want_leaf in zip(jax.tree.leaves(got_params), jax.tree.leaves(_host(want)),
                                   strict=True):
        np.testing.assert_allclose(got_leaf, want_leaf, atol=1e-5)
    assert aux["ratio/mean"] == pytest.approx(1.0) and aux["optim/steps"] == 1.0
    assert aux["clip/low_frac"] == aux["clip/high_frac"] == 0.0


def test_gradient_accumulation_is_exact(small_model, meshes, batch, one_step):
    # K = 2 microbatches summed == one pass over the minibatch: the weights 1/(|y_b|·S) need S
    # counted over the whole minibatch, not per microbatch.
    two = _trainer(small_model, meshes, 0.1, loss_aggregation=AGG,
                   gradient_accumulation_steps=2)
    # Accumulation runs as one monolithic program; so does, by default, a model this small.
    assert not two.uses_layered_update() and not _trainer(small_model, meshes, 0.1).layered
    assert Trainer(*small_model, optax.sgd(0.1), meshes.trainer, AlgorithmConfig(),
                   temperature=1.0, layered=True).uses_layered_update()
    a2 = jax.device_get(two.update(batch))
    p1, a1 = one_step
    for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(_host(two.params)), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6)
    for k in ("loss/policy", "loss/total", "policy/entropy", "grad/norm"):
        assert a1[k] == pytest.approx(a2[k], rel=1e-5, abs=1e-7), k


def test_mu2_minibatches2_matches_a_plain_loop(small_model, meshes, batch):
    # μ = 2 passes × 2 minibatches = 4 SGD steps; π_old = θ_0's logprobs (recomputed once).
    mdef, params = small_model
    lr, algo = 0.5, {"num_iterations": 2, "num_minibatches": 2, "epsilon": 0.1,
                     "loss_aggregation": "seq-mean-token-mean"}
    trainer = _trainer(small_model, meshes, lr, **algo)
    aux = jax.device_get(trainer.update(batch))
    b = jax.tree.map(jnp.asarray, batch)

    def logps(p, pt, pm, ct, cm):
        return sequence_logprobs(mdef, p, pt, pm, ct, cm, 1.0)

    inputs = (b.prompt_tokens_BxP, b.prompt_mask_BxP, b.completion_tokens_BxT,
              b.completion_mask_BxT)
    old = jax.jit(logps)(params, *inputs)

    @jax.jit
    def sgd_step(p, pt, pm, ct, cm, old, adv, lm):
        def loss(p):
            return grpo_loss(logps(p, pt, pm, ct, cm), old, None, adv, lm, epsilon=0.1,
                             aggregation="seq-mean-token-mean")[0]
        return jax.tree.map(lambda x, gx: x - lr * gx, p, jax.grad(loss)(p))

    theta = params
    for _ in range(2):
        for mb in (slice(0, 4), slice(4, 8)):
            theta = sgd_step(theta, *(x[mb] for x in inputs), old[mb], b.advantages_B[mb],
                             b.loss_mask_BxT[mb])
    for got_leaf, want_leaf in zip(jax.tree.leaves(_host(trainer.params)),
                                   jax.tree.leaves(_host(theta)), strict=True):
        np.testing.assert_allclose(got_leaf, want_leaf, atol=2e-5)
    assert aux["optim/steps"] == 4.0
    # Later steps are off-policy: ratios move away from 1 and some get clipped.
    assert aux["ratio/max"] > 1.0 or aux["ratio/min"] < 1.0
    assert np.isfinite(aux["policy/approx_kl"]) and aux["policy/approx_kl"] > 0


def test_sampler_old_logprobs_enter_the_ratio(small_model, meshes, batch):
    # old_logprobs="sampler": π_old is the sampler's logprob; shifting it by +0.1 makes the
    # first-step ratio exp(log π_θ - (log π_θ + 0.1)) = exp(-0.1) on every token.
    probe = _trainer(small_model, meshes, 0.0)
    lp = np.asarray(probe.logprobs(batch))
    shifted = dataclasses.replace(batch, sampler_logps_BxT=lp + 0.1)
    trainer = _trainer(small_model, meshes, 0.0, old_logprobs="sampler")
    aux = jax.device_get(trainer.update(shifted))
    assert aux["ratio/min"] == pytest.approx(np.exp(-0.1), rel=1e-4)
    assert aux["ratio/max"] == pytest.approx(np.exp(-0.1), rel=1e-4)


def test_reference_offload_lives_on_the_host_and_changes_nothing(small_model, meshes, batch):
    # β > 0 puts the reference model's KL in the loss; offloaded or not, the update is the same.
    on_device = _trainer(small_model, meshes, 0.1, beta=0.5)
    offloaded = _trainer(small_model, meshes, 0.1, beta=0.5, reference_offload=True)
    assert offloaded.ref_params is None
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(offloaded.ref_params_host))
    aux_a = jax.device_get(on_device.update(batch))
    aux_b = jax.device_get(offloaded.update(batch))
    assert aux_a["kl/mean"] == aux_b["kl/mean"]
    for a, b in zip(jax.tree.leaves(_host(on_device.params)),
                    jax.tree.leaves(_host(offloaded.params)), strict=True):
        np.testing.assert_array_equal(a, b)


def _grouped(batch, g):
    """The batch with every G consecutive rows sharing the first row's prompt (GRPO's layout),
    and saying so (group=G)."""
    first = lambda x: np.repeat(np.asarray(x)[::g], g, 0)  # noqa: E731
    return dataclasses.replace(batch, prompt_tokens_BxP=first(batch.prompt_tokens_BxP),
                               prompt_mask_BxP=first(batch.prompt_mask_BxP), group=g)


@pytest.mark.parametrize("g", [2, 4])
def test_shared_prompt_forward_equals_the_per_row_forward(small_model, batch, g):
    # Each prompt once, its keys/values shared by its group: same logprobs, entropies and
    # gradients as running every row's copy of the prompt (left padding and short completions
    # included: rows 0-3 are padded, rows 1 and 5 stop early).
    mdef, params = small_model
    b = jax.tree.map(jnp.asarray, _grouped(batch, g))

    def run(group):
        def f(p):
            return sequence_logprobs_and_entropy(
                mdef, p, b.prompt_tokens_BxP, b.prompt_mask_BxP, b.completion_tokens_BxT,
                b.completion_mask_BxT, 0.7, group)

        lp, ent = jax.jit(f)(params)
        m = b.completion_mask_BxT.astype(jnp.float32)
        grads = jax.jit(jax.grad(lambda p: jnp.sum(f(p)[0] * m * b.advantages_B[:, None])))(
            params)
        return np.asarray(lp), np.asarray(ent), _host(grads)

    (lp1, ent1, g1), (lpg, entg, gg) = run(1), run(g)
    np.testing.assert_allclose(lpg, lp1, atol=1e-5)
    np.testing.assert_allclose(entg, ent1, atol=1e-5)
    for x, y in zip(jax.tree.leaves(gg), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5)


def test_update_shares_prompts_only_when_the_batch_says_so(small_model, meshes, batch):
    mdef, params = small_model
    cfg = AlgorithmConfig(beta=0.0, loss_aggregation=AGG)
    trainer = Trainer(mdef, _host(params), optax.sgd(0.1), meshes.trainer, cfg, temperature=1.0,
                      share_min_width=0)
    assert trainer._group(_grouped(batch, 4)) == 4
    assert trainer._group(batch) == 1  # group=1, no claim that rows share a prompt: per-row
    two_mb = Trainer(mdef, _host(params), optax.sgd(0.1), meshes.trainer,
                     AlgorithmConfig(beta=0.0, num_minibatches=4), temperature=1.0,
                     share_min_width=0)
    assert two_mb._group(_grouped(batch, 4)) == 1  # a 2-row minibatch cannot hold a group
    narrow = Trainer(mdef, _host(params), optax.sgd(0.1), meshes.trainer, cfg, temperature=1.0,
                     share_min_width=P + 1)
    assert narrow._group(_grouped(batch, 4)) == 1  # prompts too short to be worth sharing
    with pytest.raises(ValueError, match="TrainBatch.group=3 with 8 rows"):
        trainer._group(dataclasses.replace(batch, group=3))  # not whole groups: a bad claim
    # And the grouped update lands where the per-row update does.
    per_row = _trainer(small_model, meshes, 0.1, loss_aggregation=AGG)
    per_row.update(dataclasses.replace(_grouped(batch, 4), group=1))
    trainer.update(_grouped(batch, 4))
    for x, y in zip(jax.tree.leaves(_host(trainer.params)), jax.tree.leaves(_host(per_row.params)),
                    strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6)


def test_heap_cap_changes_no_value_of_the_update(small_model, meshes, batch, monkeypatch):
    # The CPU heap cap (trainer/cpu_heap.py) only moves buffers: the same update compiled
    # without it must land on bit-identical params and metrics.
    from jax.sharding import AbstractMesh

    from controller.topology import SubMesh
    from trainer.cpu_heap import CPU_HEAP_LIMIT_BYTES, cpu_heap_options

    assert cpu_heap_options(meshes.trainer) == {
        "xla_multiheap_size_constraint_per_heap": CPU_HEAP_LIMIT_BYTES}
    assert CPU_HEAP_LIMIT_BYTES <= 32 << 20  # glibc reuses freed blocks up to 32 MB
    assert cpu_heap_options(SubMesh("plan", AbstractMesh((2,), ("fsdp",)), {})) == {}
    import trainer.trainer as trainer_module

    capped = _trainer(small_model, meshes, 0.1, beta=0.5)
    monkeypatch.setattr(trainer_module, "cpu_heap_options", lambda submesh: {})
    plain = _trainer(small_model, meshes, 0.1, beta=0.5)
    assert capped._compiler_options and not plain._compiler_options
    aux_c = jax.device_get(capped.update(batch))
    aux_p = jax.device_get(plain.update(batch))
    assert aux_c == aux_p
    for x, y in zip(jax.tree.leaves(_host(capped.params)), jax.tree.leaves(_host(plain.params)),
                    strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("layered", [True, False])
def test_pretraced_update_only_compiles_and_computes_the_same(small_model, meshes, batch,
                                                               layered):
    # The loop traces the first update on a background thread from a placeholder batch of the
    # right shapes (zeros, not the real tokens); the real update must reuse that trace (no
    # second trace) and land exactly where an update that traced for itself lands.
    kw = {"trainer_kw": {"layered": layered}, "beta": 0.5, "reference_offload": True}
    plain = _trainer(small_model, meshes, 0.1, **kw)
    ahead = _trainer(small_model, meshes, 0.1, **kw)
    assert ahead.uses_layered_update() == layered
    placeholder = jax.tree.map(np.zeros_like, batch)
    placeholder = dataclasses.replace(placeholder, prompt_tokens_BxP=batch.prompt_tokens_BxP,
                                      prompt_mask_BxP=batch.prompt_mask_BxP)
    ahead.pretrace(placeholder).join()
    assert ahead.update_traces == 1  # traced on the background thread, before any update
    aux_a = jax.device_get(ahead.update(batch))
    aux_p = jax.device_get(plain.update(batch))
    assert ahead.update_traces == 1 and plain.update_traces == 1
    assert aux_a == aux_p
    for x, y in zip(jax.tree.leaves(_host(ahead.params)), jax.tree.leaves(_host(plain.params)),
                    strict=True):
        np.testing.assert_array_equal(x, y)
    # Shapes traced before cost no new trace; a batch of other shapes is traced for itself.
    ahead.pretrace(placeholder)
    ahead.update(dataclasses.replace(batch, prompt_tokens_BxP=batch.prompt_tokens_BxP[:, 1:],
                                     prompt_mask_BxP=batch.prompt_mask_BxP[:, 1:]))
    assert ahead.update_traces == 2


@pytest.fixture(scope="module")
def gemma_like_model(small_model):
    """Two layers of two kinds (sliding window, then global), sandwich norms, an untied head,
    scaled embeddings and soft-capped logits: every branch of the layered update's pieces."""
    from trainer.model import define_model, init_params

    spec = dataclasses.replace(small_model[0].spec, num_layers=2, sliding_window=2,
                               sliding_layers=(True, False), sandwich_norm=True,
                               tie_embeddings=False, embed_scale=4.0, final_softcap=5.0)
    return define_model(spec), init_params(spec, seed=5)


@pytest.mark.parametrize("variant", ["per-row", "grouped", "gemma-like"])
def test_layered_update_equals_the_monolithic_update(small_model, gemma_like_model, meshes,
                                                     batch, variant):
    # The default update runs as per-layer programs (embedding, each block's forward and
    # backward, head and loss, optimizer); it must land where the one-program update lands:
    # with the reference model's KL and an entropy bonus in the loss, on-policy and then with
    # the off-policy importance weights, per-row and with each group's prompt run once.
    model = gemma_like_model if variant == "gemma-like" else small_model
    g = 4 if variant == "grouped" else 1
    b = _grouped(batch, 4) if variant == "grouped" else batch
    algo = {"beta": 0.5, "entropy_coef": 0.01, "loss_aggregation": AGG}
    share = {"share_min_width": 0}
    layered = _trainer(model, meshes, 0.1, trainer_kw={**share, "layered": True}, **algo)
    mono = _trainer(model, meshes, 0.1, trainer_kw={**share, "layered": False}, **algo)
    assert layered.uses_layered_update() and not mono.uses_layered_update()
    assert layered._group(b) == g
    for off_policy in (False, True):
        aux_l = jax.device_get(layered.update(b, off_policy=off_policy))
        aux_m = jax.device_get(mono.update(b, off_policy=off_policy))
        assert aux_l.keys() == aux_m.keys()
        for k in aux_m:
            assert aux_l[k] == pytest.approx(aux_m[k], rel=1e-5, abs=1e-6), k
        for x, y in zip(jax.tree.leaves(_host(layered.params)),
                        jax.tree.leaves(_host(mono.params)), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    assert aux_m["kl/mean"] > 0 and aux_m["policy/is_weight_mean"] != 1.0  # both terms active
    assert layered.update_traces == 1  # one trace of its programs, reused by the second update


@pytest.mark.parametrize("dtypes", [("float32", "float32"), ("bfloat16", "float32")])
def test_linear_layers_backward_equals_autodiff_of_the_plain_product(dtypes):
    """The model's matmuls carry a custom backward (no transposed copies on XLA:CPU); it must
    give the gradients jax.grad gives the plain x @ w and x @ wᵀ (the tied head), for 2-D and
    3-D inputs and for mixed dtypes (bf16 activations, fp32 weights)."""
    from trainer.model import linear

    rng = np.random.default_rng(1)
    xdt, wdt = (jnp.dtype(d) for d in dtypes)
    tol = 1e-5 if xdt == jnp.float32 else 1e-2
    for x_shape in [(6, 5), (3, 4, 5)]:
        x = jnp.asarray(rng.normal(size=x_shape), xdt)
        w = jnp.asarray(rng.normal(size=(5, 7)), wdt)
        c = jnp.asarray(rng.normal(size=(*x_shape[:-1], 7)), jnp.float32)  # cotangent weights
        for ours, plain, wt in [(linear, lambda x, w: x @ w, w),
                                (lambda x, w: linear(x, w.T), lambda x, w: x @ w.T, w.T)]:
            def loss(x, w, f, c=c):
                return jnp.sum(f(x, w).astype(jnp.float32) * c)

            np.testing.assert_allclose(np.float32(ours(x, wt)), np.float32(plain(x, wt)),
                                       rtol=tol, atol=tol)
            got = jax.grad(loss, argnums=(0, 1))(x, wt, ours)
            want = jax.grad(loss, argnums=(0, 1))(x, wt, plain)
            for g, h in zip(got, want, strict=True):
                assert g.dtype == h.dtype and g.shape == h.shape
                np.testing.assert_allclose(np.float32(g), np.float32(h), rtol=tol, atol=tol)
