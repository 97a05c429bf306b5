"""The JAX sampler against `transformers` greedy `generate` on the same tiny HF model.

Each family's tiny random model (tests/helpers/hf_fixtures.py) is written as a HF directory,
loaded into Tandem with `load_hf_model` and into torch with
`AutoModelForCausalLM.from_pretrained` (float32, eager attention). A left-padded batch of mixed
prompt lengths goes through both: greedy tokens must be equal token for token up to each row's
first EOS, and the sampler's per-token logprob of each greedy token must equal log_softmax(HF's
raw logits)[token] within 1e-4 (STYLE.md).
"""

import os

import jax
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers: no hub access, ever
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from helpers.hf_fixtures import write_tiny_hf_model  # noqa: E402

from controller.config import SamplingConfig  # noqa: E402
from sampler.jax_sampler import JaxSampler  # noqa: E402
from trainer.hf import load_hf_model  # noqa: E402
from trainer.model import define_model  # noqa: E402

NEW = 8
PROMPT_LENS = (3, 9, 6, 1)  # mixed lengths: rows are left-padded to 9 (and bucketed to 16)


def _prompts(vocab: int, pad_id: int, eos_id: int, seed: int = 0):
    """Left-padded random prompts (EOS excluded, so no prompt ends a row before it starts)."""
    rng = np.random.default_rng(seed)
    width = max(PROMPT_LENS)
    tokens = np.full((len(PROMPT_LENS), width), pad_id, np.int64)
    mask = np.zeros(tokens.shape, bool)
    for i, n in enumerate(PROMPT_LENS):
        ids = rng.integers(1, vocab, size=n)
        ids[ids == eos_id] = 1
        tokens[i, width - n:] = ids
        mask[i, width - n:] = True
    return tokens, mask


def _upto_eos(row: np.ndarray, eos_id: int) -> np.ndarray:
    """The row through its first EOS (inclusive), or the whole row."""
    hits = np.flatnonzero(row == eos_id)
    return row[: hits[0] + 1] if hits.size else row


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_greedy_matches_hf_generate(family, meshes, tmp_path):
    path = write_tiny_hf_model(family, tmp_path / family)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager").eval()
    eos_id = hf.config.eos_token_id
    pad_id = hf.config.pad_token_id if hf.config.pad_token_id is not None else eos_id

    spec, params = load_hf_model(path)
    sampler = JaxSampler(define_model(spec), meshes.sampler,
                         SamplingConfig(temperature=0.0, max_new_tokens=NEW),
                         pad_id=pad_id, stop_ids=(eos_id,))
    sampler.load_weights(jax.device_put(params, sampler.shardings))

    tokens, mask = _prompts(spec.vocab_size, pad_id, eos_id)
    out = sampler.generate(tokens, mask, jax.random.key(0))
    # HOST SYNC: the test reads the completions.
    jtok, jlogp, jmask = (np.asarray(x) for x in (out.tokens_BxT, out.logps_BxT, out.mask_BxT))

    with torch.no_grad():
        ref = hf.generate(input_ids=torch.from_numpy(tokens),
                          attention_mask=torch.from_numpy(mask.astype(np.int64)),
                          do_sample=False, max_new_tokens=NEW, eos_token_id=eos_id,
                          pad_token_id=pad_id, return_dict_in_generate=True,
                          output_logits=True)
    htok = ref.sequences[:, tokens.shape[1]:].numpy()
    # Raw (unprocessed) logits per step -> [B, T', V] log-probabilities.
    hlogp_BxTxV = torch.log_softmax(torch.stack(ref.logits, 1).float(), -1).numpy()

    compared = 0
    for i in range(len(tokens)):
        want = _upto_eos(htok[i], eos_id)
        got = _upto_eos(jtok[i][jmask[i]], eos_id)
        np.testing.assert_array_equal(got, want, err_msg=f"{family} row {i}")
        want_lp = hlogp_BxTxV[i, np.arange(len(want)), want]
        np.testing.assert_allclose(jlogp[i, : len(got)], want_lp, atol=1e-4, rtol=0,
                                   err_msg=f"{family} row {i} logprobs")
        compared += len(want)
    # The rows really generated (not all ended at once): most of B x NEW tokens were compared.
    assert compared >= len(tokens) * NEW // 2, compared
