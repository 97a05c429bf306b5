"""The reshard, and sampler logprobs vs the trainer's (more sampler tests: test_jax_sampler)."""

import jax
import numpy as np
import pytest

from controller.config import AlgorithmConfig, OptimizerConfig, SamplingConfig
from controller.data.batch import encode_prompts
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


def test_load_weights_rejects_trainer_layout(setup):
    trainer, sampler, moved, _ = setup
    with pytest.raises(WeightMismatchError, match="reshard the tree"):
        sampler.load_weights(trainer.params)
    sampler.load_weights(moved)  # and the right tree is still accepted
