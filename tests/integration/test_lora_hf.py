"""LoRA adapters leave Tandem as PEFT and merged Hugging Face models that reproduce its logits.

For every supported family, random adapters (B drawn too, so they change the logits) on the
tiny HF model of tests/helpers/hf_fixtures.py: `peft.PeftModel` loads the exported
adapter_config.json + adapter_model.safetensors onto the transformers model and gives
Tandem's logits; the merged export loads in transformers alone and gives them too (1e-4).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from helpers.hf_fixtures import FAMILIES, build_tiny_hf_model, torch_logits  # noqa: E402

from controller.storage import save_peft_adapters_at  # noqa: E402
from trainer import lora  # noqa: E402
from trainer.hf import load_hf_model, save_hf_model  # noqa: E402
from trainer.model import apply_model, causal_mask, define_model, positions_from_mask  # noqa: E402

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def _inputs(vocab):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, (3, 10)).astype(np.int32)
    mask = np.ones(ids.shape, bool)
    mask[1, :3] = False
    return ids, mask, np.asarray(positions_from_mask(jnp.asarray(mask)))


def _load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_and_merged_exports_reproduce_tandem_logits(family, tmp_path):
    model, tok = build_tiny_hf_model(family)
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    spec, base = load_hf_model(base_dir, dtype="float32")
    lmdef = define_model(lora.with_lora(spec, 4, 8.0, TARGETS, "float32"))
    rng = np.random.default_rng(1)
    adapters = jax.tree.map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(s.dtype),
                            lora.split(lmdef.shapes())[1])
    ids, mask, pos = _inputs(spec.vocab_size)
    ours = np.asarray(jax.jit(lambda p: apply_model(
        lmdef, p, ids, pos, causal_mask(jnp.asarray(mask), 0, ids.shape[1]))[0])(
        lora.combine(base, adapters)))
    plain = torch_logits(model, ids, mask, pos)
    assert np.abs(ours - plain)[mask].max() > 1e-2  # the adapters move the logits

    save_peft_adapters_at(tmp_path / "adapters", lmdef.spec, adapters, base_model=str(base_dir))
    with_adapters = peft.PeftModel.from_pretrained(_load(base_dir), tmp_path / "adapters").eval()
    assert np.abs(torch_logits(with_adapters, ids, mask, pos) - ours)[mask].max() <= 1e-4

    save_hf_model(tmp_path / "merged", spec, lora.merge(lmdef.spec, base, adapters),
                  source_dir=base_dir)
    merged = torch_logits(_load(tmp_path / "merged"), ids, mask, pos)
    assert np.abs(merged - ours)[mask].max() <= 1e-4
