"""The compiled KV-cache sampler: decode == forward, stop tokens, truncation, recompiles."""

import jax
import jax.monitoring
import jax.numpy as jnp
import numpy as np
import pytest

from controller.config import SamplingConfig
from controller.data.batch import encode_prompts
from sampler.base import WeightMismatchError
from sampler.jax_sampler import JaxSampler, bucket_width, decode_step, left_pad, prefill
from trainer.model import apply_model, causal_mask, init_cache, init_params, positions_from_mask

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """Counts XLA backend compilations (any function) while active."""

    def __init__(self):
        self.n = 0

    def _listen(self, event, duration, **kw):
        if event == BACKEND_COMPILE:
            self.n += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listen)


def _forward(mdef):
    """One full forward pass, no cache: (params, tokens, mask) -> (logits_BxLxV, None)."""
    return jax.jit(lambda prm, x, m: apply_model(
        mdef, prm, x, positions_from_mask(m), causal_mask(m, 0, x.shape[1])))


def _prompts(tokenizer, texts, repeat=1):
    batch = encode_prompts([{"prompt": t} for t in texts], tokenizer)
    return np.repeat(batch.tokens_PxL, repeat, 0), np.repeat(batch.mask_PxL, repeat, 0)


def _sampler(tiny_model, meshes, tokenizer, **cfg):
    mdef, params = tiny_model
    s = JaxSampler(mdef, meshes.sampler, SamplingConfig(**cfg), pad_id=tokenizer.pad_id,
                   stop_ids=(tokenizer.stop_id,))
    s.load_weights(jax.device_put(params, s.shardings))
    return s


@pytest.fixture(scope="module")
def sampler(tiny_model, meshes, tokenizer):
    """τ = 0.25 (the tiny model's logits are nearly flat), top-5, then the 0.7 nucleus, and an
    extra stop token ("3")."""
    return _sampler(tiny_model, meshes, tokenizer, max_new_tokens=8, temperature=0.25, top_k=5,
                    top_p=0.7, stop_tokens=[tokenizer.encode("3", bos=False)[0]])


def test_bucketing_pads_on_the_left():
    assert [bucket_width(w, 16) for w in (1, 16, 17, 40)] == [16, 16, 32, 64]
    assert bucket_width(7, None) == 7
    tokens, mask = left_pad(np.array([[0, 5, 6]]), np.array([[0, 1, 1]], bool), 5, pad_id=0)
    np.testing.assert_array_equal(tokens, [[0, 0, 0, 5, 6]])
    np.testing.assert_array_equal(mask, [[0, 0, 0, 1, 1]])


def test_cached_decoding_equals_a_full_forward_at_every_position(tiny_model, tokenizer):
    # Teacher-force a fixed completion through prefill + decode_step (the sampler's two phases,
    # with the prompt padded to a wider bucket) and compare every position's logits with one
    # forward pass over the unpadded sequence, no cache.
    mdef, params = tiny_model
    tokens, mask = _prompts(tokenizer, ["12=", "98765=", "4="])
    completion = np.array([[5, 6, 7, 8, 9], [9, 8, 7, 6, 5], [4, 4, 4, 4, 4]], np.int32)
    b, t = completion.shape
    width = 16
    ptok, pmask = left_pad(tokens, mask, width, tokenizer.pad_id)
    s = width + t - 1
    valid = np.concatenate([pmask, np.zeros((b, t - 1), bool)], axis=1)

    run_prefill = jax.jit(lambda prm, x, v, c: prefill(mdef, prm, x, v, c))
    run_decode = jax.jit(
        lambda prm, tok, pos, v, col, c: decode_step(mdef, prm, tok, pos, v, col, c))
    logits, cache = run_prefill(params, ptok, valid, init_cache(mdef.spec, b, s))
    got = [logits]
    pos = np.asarray(positions_from_mask(jnp.asarray(pmask)))[:, -1] + 1
    for i in range(t - 1):
        valid[:, width + i] = True
        step_logits, cache = run_decode(params, completion[:, i], pos + i, valid, width + i, cache)
        got.append(step_logits)
    got_BxTxV = np.stack([np.asarray(x) for x in got], axis=1)

    full = np.concatenate([tokens, completion], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(completion, bool)], axis=1)
    want, _ = _forward(mdef)(params, full, full_mask)
    p = tokens.shape[1]
    want_BxTxV = np.asarray(want)[:, p - 1 : p - 1 + t]
    np.testing.assert_allclose(got_BxTxV, want_BxTxV, atol=1e-4)


def test_rows_stop_independently_on_eos_or_a_stop_token(sampler, tokenizer):
    stops = {tokenizer.stop_id, tokenizer.encode("3", bos=False)[0]}
    assert set(sampler.stop_ids) == stops
    tokens, mask = _prompts(tokenizer, ["31=", "2718=", "99=", "5="], repeat=8)
    out = sampler.generate(tokens, mask, jax.random.key(0))
    comp, cmask = np.asarray(out.tokens_BxT), np.asarray(out.mask_BxT)
    assert comp.shape == (32, 8)  # right-padded to max_new_tokens
    ends, hit = [], set()
    for row, m in zip(comp, cmask, strict=True):
        hits = np.flatnonzero(np.isin(row, list(stops)))
        end = hits[0] + 1 if len(hits) else len(row)  # the stop token itself is kept
        ends.append(end)
        if len(hits):
            hit.add(int(row[hits[0]]))
        assert m[:end].all() and not m[end:].any()
        assert (row[end:] == tokenizer.pad_id).all()
        assert np.asarray(out.logps_BxT)[len(ends) - 1, end:].sum() == 0
    # With this seed both kinds of stop occur, rows end at different steps, and some rows run
    # to max_new_tokens.
    assert hit == stops
    assert len(set(ends)) > 2 and max(ends) == 8


def test_sampler_never_emits_a_token_outside_top_k_then_top_p(sampler, tiny_model, tokenizer):
    # The module sampler draws from softmax(logits / 0.25) cut to the top 5, then to the 0.7
    # nucleus of those (renormalized). Every emitted token must lie in that set, recomputed in
    # NumPy from a full forward of the same prefix, position by position.
    mdef, params = tiny_model
    tokens, mask = _prompts(tokenizer, ["12=", "4567="], repeat=16)
    out = sampler.generate(tokens, mask, jax.random.key(1))
    comp, cmask = np.asarray(out.tokens_BxT), np.asarray(out.mask_BxT)
    full = np.concatenate([tokens, comp], axis=1)
    full_mask = np.concatenate([mask, cmask], axis=1)
    logits, _ = _forward(mdef)(params, full, full_mask)
    p = tokens.shape[1]
    scaled_BxTxV = np.asarray(logits, np.float64)[:, p - 1 : -1] / 0.25
    order = np.argsort(-scaled_BxTxV, axis=-1)[..., :5]  # top-5, most likely first
    top = np.take_along_axis(scaled_BxTxV, order, axis=-1)
    q = np.exp(top - top.max(axis=-1, keepdims=True))
    q /= q.sum(axis=-1, keepdims=True)  # renormalized over the top-5
    before = np.cumsum(q, axis=-1) - q
    # Kept while the mass before is < 0.7; the 1e-4 slack only forgives float32 rounding at
    # an exact boundary, it cannot admit a token the rule excludes by more.
    kept = before < 0.7 + 1e-4
    inside = ((order == comp[..., None]) & kept).any(axis=-1)
    assert inside[cmask].all()
    assert (~kept[cmask]).any()  # the nucleus really cut somewhere
    assert len(np.unique(comp[cmask])) > 2  # rows really differ (not a greedy copy)
    assert 0 < sampler.metrics()["sampler/kept_mass"] < 1  # Z, the mass kept, is reported


@pytest.mark.slow
def test_top_1_sampling_is_greedy_with_the_same_logprobs(tiny_model, meshes, tokenizer):
    # top-k = 1 at τ = 1 is greedy, and reports the same τ = 1 logprobs as greedy does.
    tokens, mask = _prompts(tokenizer, ["12=", "4567="], repeat=16)
    g1 = _sampler(tiny_model, meshes, tokenizer, max_new_tokens=5, top_k=1)
    g0 = _sampler(tiny_model, meshes, tokenizer, max_new_tokens=5, temperature=0.0)
    a = g1.generate(tokens, mask, jax.random.key(2))
    b = g0.generate(tokens, mask, jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(a.tokens_BxT), np.asarray(b.tokens_BxT))
    np.testing.assert_allclose(np.asarray(a.logps_BxT), np.asarray(b.logps_BxT), atol=1e-5)


def test_seeded_sampling_is_deterministic(sampler, tokenizer):
    tokens, mask = _prompts(tokenizer, ["123=", "45="], repeat=16)
    a = sampler.generate(tokens, mask, jax.random.key(5))
    b = sampler.generate(tokens, mask, jax.random.key(5))
    c = sampler.generate(tokens, mask, jax.random.key(6))
    np.testing.assert_array_equal(np.asarray(a.tokens_BxT), np.asarray(b.tokens_BxT))
    np.testing.assert_array_equal(np.asarray(a.logps_BxT), np.asarray(b.logps_BxT))
    assert (np.asarray(a.tokens_BxT) != np.asarray(c.tokens_BxT)).any()


def test_weight_push_and_new_prompt_width_do_not_recompile(sampler, tiny_model, tokenizer):
    mdef, _ = tiny_model
    tokens, mask = _prompts(tokenizer, ["12=", "98765="], repeat=16)
    sampler.generate(tokens, mask, jax.random.key(0))  # compiled for this batch size
    before = sampler.metrics()["sampler/compiles"]
    new = jax.device_put(init_params(mdef.spec, seed=11), sampler.shardings)
    narrow, nmask = _prompts(tokenizer, ["1=", "22="], repeat=16)  # width 3, same bucket
    with CompileCounter() as counter:
        sampler.load_weights(new)
        out = sampler.generate(tokens, mask, jax.random.key(0))
        sampler.generate(narrow, nmask, jax.random.key(0))
        jax.block_until_ready(out.tokens_BxT)
    assert counter.n == 0
    assert sampler.metrics()["sampler/compiles"] == before
    assert sampler.metrics()["sampler/prompt_width"] == 16
    # A prompt wider than the bucket compiles once more, and the count says so.
    wide, wmask = _prompts(tokenizer, ["1234567890123456="], repeat=32)
    with CompileCounter() as counter:
        sampler.generate(wide, wmask, jax.random.key(0))
    assert counter.n >= 1
    assert sampler.metrics()["sampler/compiles"] == before + 1
    assert sampler.metrics()["sampler/prompt_width"] == 32


def test_load_weights_rejects_wrong_trees(sampler, tiny_model):
    _, params = tiny_model
    good = jax.device_put(params, sampler.shardings)
    with pytest.raises(WeightMismatchError, match="tree structure"):
        sampler.load_weights({k: v for k, v in good.items() if k != "final_norm"})
    swapped = dict(good, layers={0: good["layers"][1], 1: good["layers"][0]})
    sampler.load_weights(swapped)  # same structure and shapes: accepted (values are the caller's)
    bad = dict(good, embed=jnp.zeros((3, 3)))
    with pytest.raises(WeightMismatchError, match=r"\['embed'\] is float32\[3, 3\]"):
        sampler.load_weights(bad)
    bad = dict(good, embed=good["embed"].astype(jnp.bfloat16))
    with pytest.raises(WeightMismatchError, match="bfloat16"):
        sampler.load_weights(bad)
    with pytest.raises(WeightMismatchError, match=r"\['embed'\] has sharding ndarray"):
        sampler.load_weights(dict(good, embed=np.asarray(good["embed"])))
    # A weakly typed leaf (built from a Python scalar) would change jit's cache key.
    scale = good["final_norm"]["scale"]
    weak = jax.device_put(jnp.broadcast_to(jnp.asarray(1.0), scale.shape), scale.sharding)
    assert weak.weak_type
    with pytest.raises(WeightMismatchError, match="weakly typed"):
        sampler.load_weights(dict(good, final_norm={"scale": weak}))
    sampler.load_weights(good)  # the right tree is still accepted


def test_stop_token_outside_the_vocabulary_is_rejected(tiny_model, meshes, tokenizer):
    mdef, _ = tiny_model
    with pytest.raises(ValueError, match=r"sampling.stop_tokens=\[999\]: ids \[999\] are outside"):
        JaxSampler(mdef, meshes.sampler, SamplingConfig(stop_tokens=[999]),
                   pad_id=tokenizer.pad_id, stop_ids=(tokenizer.stop_id,))


def test_params_and_cache_live_on_the_sampler_mesh(sampler, meshes):
    sampler_devices = set(meshes.sampler.mesh.devices.flat)
    q = sampler.params["layers"][0]["attn"]["q_proj"]
    assert tuple(q.sharding.spec) == (None, "tp", None)  # heads split over tp
    ((b, s), cache) = sampler._cache
    declared = sampler._cache_sharding(b, s)  # keys [B, K, Dh, S], values [B, K, S, Dh]
    for (k, v), (k_sh, v_sh) in zip(cache, declared, strict=True):
        assert set(k.sharding.device_set) == set(v.sharding.device_set) == sampler_devices
        assert k.sharding.is_equivalent_to(k_sh, k.ndim)
        assert v.sharding.is_equivalent_to(v_sh, v.ndim)


def test_shared_prompt_prefill_draws_the_same_completions(tiny_model, meshes, tokenizer):
    # G rows with one prompt: prefilling it once and sharing its cache (group=G, as the
    # controller passes it) gives the very tokens and logprobs that prefilling every row does.
    sampler = _sampler(tiny_model, meshes, tokenizer, max_new_tokens=6, temperature=1.0,
                       group_size=4)
    tokens, mask = _prompts(tokenizer, ["12=", "98765="], repeat=4)
    a = sampler.generate(tokens, mask, jax.random.key(3), group=4)
    b = sampler.generate(tokens, mask, jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(a.tokens_BxT), np.asarray(b.tokens_BxT))
    np.testing.assert_array_equal(np.asarray(a.mask_BxT), np.asarray(b.mask_BxT))
    np.testing.assert_allclose(np.asarray(a.logps_BxT), np.asarray(b.logps_BxT), atol=1e-5)
    with pytest.raises(ValueError, match="8 rows do not form groups of 3"):
        sampler.generate(tokens, mask, jax.random.key(3), group=3)


def test_first_tokens_follow_the_models_distribution(tiny_model, meshes, tokenizer):
    # 2048 rows of one prompt at τ = 1: token 0's frequencies match softmax of a full forward's
    # last-position logits (each within 4.5 standard errors), and each row's reported logprob
    # is that distribution's log p of its token. A draw off by one token, or from the wrong
    # row's uniform, would miss.
    mdef, params = tiny_model
    n = 2048
    sampler = _sampler(tiny_model, meshes, tokenizer, max_new_tokens=1, temperature=1.0)
    tokens, mask = _prompts(tokenizer, ["98765="], repeat=n)
    out = sampler.generate(tokens, mask, jax.random.key(11))
    logits, _ = _forward(mdef)(params, tokens[:1], mask[:1])
    logp_V = np.asarray(jax.nn.log_softmax(logits[0, -1]))
    p_V = np.exp(logp_V)
    drawn = np.asarray(out.tokens_BxT)[:, 0]
    np.testing.assert_allclose(np.asarray(out.logps_BxT)[:, 0], logp_V[drawn], atol=1e-5)
    freq_V = np.bincount(drawn, minlength=p_V.size) / n
    stderr_V = np.sqrt(p_V * (1 - p_V) / n)
    assert np.all(np.abs(freq_V - p_V) <= 4.5 * stderr_V + 1e-3), (freq_V, p_V)
    assert (p_V > 0.05).sum() >= 2  # a spread-out distribution, so the check has teeth


def test_one_device_sampler_joins_projections_and_draws_the_same(tiny_model, meshes, tokenizer):
    # On one device the sampler holds its weights output-major with q/k/v and gate/up joined
    # (fewer products per step); on the tensor-parallel mesh it keeps them as pushed. Same
    # key, same completions either way, and both hand back the weights they were given, in
    # the model's own layout.
    from jax.sharding import Mesh

    from controller.config import JobConfig
    from controller.topology import SubMesh

    mdef, params = tiny_model
    one = SubMesh("sampler", Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("dp", "tp")),
                  dict(JobConfig().topology.sampler_rules))
    cfg = SamplingConfig(max_new_tokens=6, temperature=1.0)
    tokens, mask = _prompts(tokenizer, ["12=", "98765=", "4="], repeat=2)
    outs = []
    for submesh, fused in ((one, True), (meshes.sampler, False)):
        s = JaxSampler(mdef, submesh, cfg, pad_id=tokenizer.pad_id, stop_ids=())
        assert s.decode_mdef.spec.fused_projections is fused
        s.load_weights(jax.device_put(params, s.shardings))
        outs.append(s.generate(tokens, mask, jax.random.key(4)))
        for got, want in zip(jax.tree.leaves(s.params), jax.tree.leaves(params), strict=True):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(outs[0].tokens_BxT), np.asarray(outs[1].tokens_BxT))
    np.testing.assert_allclose(np.asarray(outs[0].logps_BxT), np.asarray(outs[1].logps_BxT),
                               atol=1e-4)
