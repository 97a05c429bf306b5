"""Tiny random Hugging Face model directories, one per supported family, built offline.

`write_tiny_hf_model(family, path)` writes what a user downloads from the Hub, at toy size:
`config.json`, `model.safetensors` (or shards + index), `generation_config.json` and a small
character-level `tokenizers` tokenizer (with the family's special tokens and a chat template)
that covers the built-in task's characters. Weights are random with a large enough scale that
every parameter (norm weights and biases included) moves the logits, so a mis-mapped tensor
cannot hide behind HF's near-zero init. Needs `torch` and `transformers` (the `dev` extra).
"""

from __future__ import annotations

import os
import string
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FAMILIES = ("qwen2", "qwen3", "llama", "gemma2", "gemma3")

# A ChatML template (Qwen's layout) and a Gemma-style one; both only use plain Jinja.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GEMMA_CHAT = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
LLAMA3_CHAT = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
    "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# family -> (special tokens, bos, eos, pad, chat template)
TOKENS = {
    "qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>",
              "<|endoftext|>", CHATML),
    "qwen3": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>",
              "<|endoftext|>", CHATML),
    "llama": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
               "<|end_header_id|>", "<|eot_id|>"], "<|begin_of_text|>", "<|eot_id|>", None,
              LLAMA3_CHAT),
    "gemma2": (["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>",
               "<pad>", GEMMA_CHAT),
    "gemma3": (["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>",
               "<pad>", GEMMA_CHAT),
}


def build_tokenizer(family: str):
    """A character-level fast tokenizer over digits, letters and punctuation + the specials.

    Its pipeline is the family's own (`transformers` 5 rebuilds it from the model type): byte-level
    BPE for Qwen and Llama 3 (space = "Ġ", newline = "Ċ"), and for Gemma a "▁"-for-space
    normalizer with byte fallback. No merges, so every character is one token.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials, bos, eos, pad, template = TOKENS[family]
    chars = string.digits + string.ascii_letters + " \n=.,:;?!'\"-+*/()"
    if family.startswith("gemma"):
        pieces = [c.replace(" ", "▁") for c in chars]
    else:
        pieces = [{" ": "Ġ", "\n": "Ċ"}.get(c, c) for c in chars]
    vocab = {"<unk>": 0} | {c: i + 1 for i, c in enumerate(pieces)}
    if family.startswith("gemma"):
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse()])
    else:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos,
                                   pad_token=pad, unk_token="<unk>")
    fast.chat_template = template
    return fast


def tiny_config(family: str, vocab_size: int, token_ids: dict[str, int | None]):
    """A 2-layer, d=32 config whose family-specific options are all switched on and matter."""
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        LlamaConfig,
        Qwen2Config,
        Qwen3Config,
    )

    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, rms_norm_eps=1e-6, **token_ids)
    if family == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if family == "qwen3":
        # head_dim != hidden / heads, as in the real Qwen3 models.
        return Qwen3Config(**common, head_dim=16, tie_word_embeddings=False,
                           rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    if family == "llama":
        # head_dim 8 and theta 1e4: wavelengths 6, 63, 628, 6283 fall in all three llama3
        # regimes (kept, smoothed, divided) for original_max_position_embeddings = 64.
        return LlamaConfig(**common, tie_word_embeddings=False, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    gemma = dict(common, head_dim=8, query_pre_attn_scalar=16, sliding_window=4,
                 hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)
    if family == "gemma2":
        # Small caps so soft-capping bends the numbers (the real ones are 50 and 30).
        return Gemma2Config(**gemma, attn_logit_softcapping=3.0, final_logit_softcapping=8.0,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if family == "gemma3":
        return Gemma3TextConfig(**gemma, layer_types=["sliding_attention", "full_attention"],
                                rope_parameters={
                                    "sliding_attention": {"rope_type": "default",
                                                          "rope_theta": 10000.0},
                                    "full_attention": {"rope_type": "linear", "factor": 4.0,
                                                       "rope_theta": 1e6}})
    raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")


def build_tiny_hf_model(family: str, seed: int = 0):
    """(torch model in float32, fast tokenizer), random weights of scale ~0.3."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = build_tokenizer(family)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
           "pad_token_id": tok.pad_token_id}
    cfg = tiny_config(family, len(tok), ids)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager",
                                             dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # norm weights around their identity value, but not at it
                base = 0.0 if family.startswith("gemma") else 1.0
                p.copy_(base + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    model.eval()
    return model, tok


def write_tiny_hf_model(family: str, path: str | Path, *, dtype: str = "float32",
                        max_shard_size: str | None = None, seed: int = 0) -> Path:
    """Saves a tiny random `family` model with its tokenizer to `path`; returns the path."""
    import torch

    path = Path(path)
    model, tok = build_tiny_hf_model(family, seed)
    model = model.to(getattr(torch, dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    tok.save_pretrained(path)
    return path


def torch_logits(model, ids, mask, pos):
    """A transformers model's float32 logits for int ids [B, L], a bool mask and positions."""
    import numpy as np
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor(ids, dtype=torch.long),
                     attention_mask=torch.tensor(mask.astype(np.int64)),
                     position_ids=torch.tensor(pos, dtype=torch.long)).logits.float().numpy()
