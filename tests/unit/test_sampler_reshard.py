"""Sampler vs a full forward pass, stop handling, load_weights checks, and the reshard."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from controller.config import AlgorithmConfig, OptimizerConfig, SamplingConfig
from controller.data import encode_prompts
from reshard.transfer import Resharder, tree_bytes
from sampler.base import WeightMismatchError
from sampler.jax_sampler import JaxSampler
from trainer.optim import build_optimizer
from trainer.trainer import TrainBatch, Trainer


def _prompts(tokenizer, texts, repeat):
    batch = encode_prompts([{"prompt": t} for t in texts], tokenizer)
    return np.repeat(batch.tokens_PxL, repeat, 0), np.repeat(batch.mask_PxL, repeat, 0)


@pytest.fixture(scope="module")
def setup(tiny_model, meshes, tokenizer):
    mdef, params = tiny_model
    trainer = Trainer(mdef, params, build_optimizer(OptimizerConfig()), meshes.trainer,
                      AlgorithmConfig(beta=0.0), temperature=1.0)
    sampler = JaxSampler(mdef, meshes.sampler, SamplingConfig(max_new_tokens=6),
                         pad_id=tokenizer.pad_id, stop_ids=(tokenizer.stop_id,))
    moved, stats = Resharder().transfer(trainer.params, sampler.shardings)
    sampler.load_weights(moved)
    return trainer, sampler, moved, stats


def test_reshard_places_every_leaf_on_the_sampler_and_keeps_values(setup, meshes):
    trainer, sampler, moved, stats = setup
    sampler_devices = set(meshes.sampler.mesh.devices.flat)
    for src, dst, want in zip(jax.tree.leaves(trainer.params), jax.tree.leaves(moved),
                              jax.tree.leaves(sampler.shardings), strict=True):
        assert dst.sharding == want
        assert set(dst.sharding.device_set) == sampler_devices
        np.testing.assert_array_equal(np.asarray(src), np.asarray(dst))
    assert stats.bytes == tree_bytes(trainer.params) == sum(
        x.nbytes for x in jax.tree.leaves(moved))
    # The trainer really is FSDP and the sampler really is tensor-parallel.
    mlp_t = trainer.params["layers"][0]["mlp"]["gate_proj"].sharding.spec
    mlp_s = moved["layers"][0]["mlp"]["gate_proj"].sharding.spec
    assert (tuple(mlp_t), tuple(mlp_s)) == (("fsdp", None), (None, "tp"))


def test_sampler_logprobs_equal_full_forward_logprobs(setup, tokenizer):
    # Mixed prompt lengths exercise left padding; the sampler decodes with its KV cache on the
    # sampler mesh, the trainer scores the same tokens with one full forward on its own mesh.
    trainer, sampler, _, _ = setup
    tokens, mask = _prompts(tokenizer, ["12=", "98765=", "4=", "0123="], repeat=4)
    out = sampler.generate(tokens, mask, jax.random.key(3))
    comp, cmask, slogp = (np.asarray(x) for x in (out.tokens_BxT, out.mask_BxT, out.logps_BxT))
    batch = TrainBatch(tokens, mask, comp, cmask, np.zeros(len(tokens), np.float32), slogp)
    tlogp = np.asarray(trainer.logprobs(batch))
    assert cmask.sum() > len(tokens)  # real completions, not just stop tokens
    np.testing.assert_allclose(np.where(cmask, tlogp, 0.0), slogp, atol=1e-4)


def test_rows_stop_independently_at_the_stop_token(setup, tokenizer):
    _, sampler, _, _ = setup
    tokens, mask = _prompts(tokenizer, ["31=", "2718=", "99="], repeat=16)
    out = sampler.generate(tokens, mask, jax.random.key(0))
    comp, cmask = np.asarray(out.tokens_BxT), np.asarray(out.mask_BxT)
    stop_at = []
    for row, m in zip(comp, cmask, strict=True):
        hits = np.flatnonzero(row == tokenizer.stop_id)
        end = hits[0] + 1 if len(hits) else len(row)  # the stop token itself is kept
        stop_at.append(end)
        assert m[:end].all() and not m[end:].any()
        assert (row[end:] == tokenizer.pad_id).all()
    # With this seed some rows stop early and some run to max_new_tokens.
    assert min(stop_at) < len(comp[0]) and max(stop_at) == len(comp[0])


def test_greedy_is_deterministic_and_seeded_sampling_repeats(setup, tokenizer):
    _, sampler, _, _ = setup
    tokens, mask = _prompts(tokenizer, ["123=", "45="], repeat=2)
    a = sampler.generate(tokens, mask, jax.random.key(5))
    b = sampler.generate(tokens, mask, jax.random.key(5))
    np.testing.assert_array_equal(np.asarray(a.tokens_BxT), np.asarray(b.tokens_BxT))


def test_load_weights_rejects_a_wrong_tree(setup):
    _, sampler, moved, _ = setup
    missing = {k: v for k, v in moved.items() if k != "final_norm"}
    with pytest.raises(WeightMismatchError, match="tree structure"):
        sampler.load_weights(missing)
    bad_shape = jax.tree.map(lambda x: x, moved)
    bad_shape["embed"] = jnp.zeros((3, 3))
    with pytest.raises(WeightMismatchError, match=r"\['embed'\] is float32\[3, 3\]"):
        sampler.load_weights(bad_shape)
    bad_dtype = jax.tree.map(lambda x: x, moved)
    bad_dtype["embed"] = moved["embed"].astype(jnp.bfloat16)
    with pytest.raises(WeightMismatchError, match="bfloat16"):
        sampler.load_weights(bad_dtype)


def test_load_weights_rejects_trainer_layout(setup):
    trainer, sampler, moved, _ = setup
    with pytest.raises(WeightMismatchError, match="reshard the tree"):
        sampler.load_weights(trainer.params)
    sampler.load_weights(moved)  # and the right tree is still accepted
