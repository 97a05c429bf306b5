"""Multi-turn sampling: packing a row's turns (exact masks), the KV-cache continuation equal
to re-prefilling the history, and the sampler's logprobs equal to the trainer's on the model's
tokens of multi-turn rows."""

import jax
import numpy as np
import optax
import pytest

from controller.config import AlgorithmConfig, SamplingConfig
from sampler.jax_sampler import JaxSampler
from sampler.multiturn import TurnSampler, pack_turns, pad_prompts_left
from trainer.trainer import TrainBatch, Trainer

N_NEW = 5


def test_pack_turns_marks_model_tokens_and_observations_exactly():
    # Row 0: model [5, 6, 2], observation [7, 8], model [9]; row 1: one model token.
    rows = [[([5, 6, 2], [-1.0, -2.0, -3.0]), ([7, 8], None), ([9], [-4.0])],
            [([3], [-0.5])]]
    p = pack_turns(rows, width=8, pad_id=0)
    np.testing.assert_array_equal(p.tokens_BxT, [[5, 6, 2, 7, 8, 9, 0, 0],
                                                 [3, 0, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(p.mask_BxT, [[1, 1, 1, 1, 1, 1, 0, 0],
                                               [1, 0, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(p.model_mask_BxT, [[1, 1, 1, 0, 0, 1, 0, 0],
                                                     [1, 0, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(p.logps_BxT, [[-1, -2, -3, 0, 0, -4, 0, 0],
                                                [-0.5, 0, 0, 0, 0, 0, 0, 0]])
    with pytest.raises(ValueError, match="row 0 has 6 tokens after its prompt, more than the 5"):
        pack_turns(rows, width=5, pad_id=0)


def _turn_sampler(tiny_model, meshes, tokenizer, history, *, temperature, bucket, total):
    mdef, params = tiny_model
    base = JaxSampler(mdef, meshes.sampler,
                      SamplingConfig(max_new_tokens=N_NEW, temperature=temperature,
                                     prompt_bucket=bucket),
                      pad_id=tokenizer.pad_id, stop_ids=(tokenizer.stop_id,))
    base.load_weights(jax.device_put(params, base.shardings))
    return TurnSampler(base, stop_ids=(tokenizer.stop_id,), max_new_tokens=N_NEW,
                       total_tokens=total, history=history)


def _play(ts, tokenizer, seed=0, turns=3):
    """Rows with different budgets (so they stop at different steps and leave masked columns
    in the cache) and observations of different lengths; returns each row's segments."""
    prompts = [tokenizer.encode(t) for t in ("12=", "3456=", "7=", "8901=")]
    ts.start(prompts)
    segments = [[] for _ in prompts]
    budgets = [[2, 5, 3, 1], [4, 1, 5, 2], [5, 3, 2, 4]]
    obs = [tokenizer.encode(t, bos=False) for t in ("0=", "9", "1204=", "=")]
    reprefilled = []
    for t in range(turns):
        out = ts.turn([True] * 4, budgets[t], jax.random.key(seed + t))
        reprefilled.append(out.reprefilled)
        for r in range(4):
            assert 1 <= len(out.ids[r]) <= budgets[t][r]
            segments[r].append((out.ids[r], out.logps[r]))
            if t < turns - 1:
                ids = obs[(r + t) % 4]
                ts.observe(r, ids)
                segments[r].append((ids, None))
    ts.finish()
    return prompts, segments, reprefilled


@pytest.mark.parametrize("bucket, total, refilled", [(16, 40, False), (None, 16, True)])
def test_the_kv_cache_continuation_equals_re_prefilling(tiny_model, meshes, tokenizer, bucket,
                                                        total, refilled):
    # Greedy, so both draw the same tokens; logprobs to float rounding. With exact widths and
    # a short T the cache runs out of columns in the third turn, which re-prefills into it.
    runs = {h: _play(_turn_sampler(tiny_model, meshes, tokenizer, h, temperature=0.0,
                                   bucket=bucket, total=total), tokenizer)
            for h in ("cache", "reprefill")}
    (_, seg_c, re_c), (_, seg_r, _) = runs["cache"], runs["reprefill"]
    for row_c, row_r in zip(seg_c, seg_r, strict=True):
        for (ids_c, lp_c), (ids_r, lp_r) in zip(row_c, row_r, strict=True):
            assert ids_c == ids_r
            if lp_c is not None:
                np.testing.assert_allclose(lp_c, lp_r, atol=1e-5)
    assert re_c == [False, False, refilled]


@pytest.mark.parametrize("history", ["cache", "reprefill"])
def test_sampler_and_trainer_logprobs_agree_on_multiturn_rows(tiny_model, meshes, tokenizer,
                                                              history):
    ts = _turn_sampler(tiny_model, meshes, tokenizer, history, temperature=1.0, bucket=16,
                       total=32)
    prompts, segments, _ = _play(ts, tokenizer, seed=3)
    p = pack_turns(segments, 32, tokenizer.pad_id)
    prompt_BxP, pmask_BxP = pad_prompts_left(prompts, tokenizer.pad_id, 16)
    mdef, params = tiny_model
    trainer = Trainer(mdef, params, optax.sgd(0.1), meshes.trainer, AlgorithmConfig(),
                      temperature=1.0)
    batch = TrainBatch(prompt_BxP, pmask_BxP, p.tokens_BxT, p.mask_BxT,
                       np.zeros(4, np.float32), p.logps_BxT, p.model_mask_BxT,
                       sampled_mask_BxT=p.model_mask_BxT)
    logps = np.asarray(jax.device_get(trainer.logprobs(batch)))
    on = p.model_mask_BxT
    assert on.sum() > 20 and (p.mask_BxT & ~on).sum() > 10  # model turns and observations
    np.testing.assert_allclose(logps[on], p.logps_BxT[on], atol=1e-5)
