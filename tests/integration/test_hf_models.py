"""Hugging Face families: parity with transformers, save/load round trips, sharded loading,
tokenizers, and a GRPO step on each family's tiny model.

The reference is `transformers` itself on CPU (torch, float32, eager attention): a tiny random
model per family (2 layers, d=32) whose family options are all switched on (q/k norm, llama3
RoPE scaling, soft-capping with small caps, sliding window 4 on sequences longer than 4, ...).
Whole-model tolerance: 1e-4 (STYLE.md), never loosened.
"""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers: no hub access, ever
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from helpers.hf_fixtures import (  # noqa: E402
    FAMILIES,
    build_tiny_hf_model,
    torch_logits,
    write_tiny_hf_model,
)

from controller.config import (  # noqa: E402
    AlgorithmConfig,
    ConfigError,
    OptimizerConfig,
    SamplingConfig,
    load_config,
)
from controller.data.batch import encode_prompts  # noqa: E402
from controller.data.hf_tokenizer import TokenizerFilesError, load_hf_tokenizer  # noqa: E402
from controller.topology import simulation_env  # noqa: E402
from reshard.transfer import Resharder  # noqa: E402
from sampler.jax_sampler import JaxSampler  # noqa: E402
from trainer.hf import (  # noqa: E402
    HFCheckpointError,
    load_hf_model,
    load_hf_params,
    load_hf_spec,
    save_hf_model,
    spec_from_hf_config,
)
from trainer.logprobs import token_logprobs  # noqa: E402
from trainer.model import (  # noqa: E402
    apply_model,
    causal_mask,
    define_model,
    param_shardings,
    positions_from_mask,
)
from trainer.optim import build_optimizer  # noqa: E402
from trainer.trainer import TrainBatch, Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """family -> (directory, torch model, HF tokenizer), each written once for the module."""
    out = {}
    for fam in FAMILIES:
        path = tmp_path_factory.mktemp(f"hf_{fam}")
        model, tok = build_tiny_hf_model(fam)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        out[fam] = (path, model, tok)
    return out


def _batch(vocab_size, seed=0, rows=3, length=12):
    """Random ids, row 1 left-padded by 3 and the last row by 5 (positions restart at 0)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, size=(rows, length)).astype(np.int32)
    mask = np.ones((rows, length), bool)
    mask[1, :3] = False
    mask[-1, :5] = False
    return ids, mask, np.asarray(positions_from_mask(jnp.asarray(mask)))


_FORWARDS = {}  # spec -> jitted forward: one compile per family for the whole module


def _tandem_logits(mdef, params, ids, mask, pos):
    if mdef.spec not in _FORWARDS:
        _FORWARDS[mdef.spec] = jax.jit(lambda p, t, m, q: apply_model(
            mdef, p, t, q, causal_mask(m, 0, t.shape[1]))[0])
    return np.asarray(_FORWARDS[mdef.spec](params, ids, mask, pos))


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_logprobs_match_transformers(hf_dirs, family):
    path, model, _ = hf_dirs[family]
    spec, params = load_hf_model(path, dtype="float32")
    assert spec.hf_model_type == ("gemma3_text" if family == "gemma3" else family)
    mdef = define_model(spec)
    ids, mask, pos = _batch(spec.vocab_size)
    ref = torch_logits(model, ids, mask, pos)
    out = _tandem_logits(mdef, params, ids, mask, pos)
    assert np.abs(ref).max() > 1.0  # logits that a mapping bug would visibly move
    assert np.abs(out - ref)[mask].max() <= 1e-4

    # Per-token logprobs of a "completion" (the last 5 columns) given the prompt before it,
    # as the trainer computes them (the logits at column j score the token at j + 1).
    p = ids.shape[1] - 5
    logps = np.asarray(token_logprobs(jnp.asarray(out[:, p - 1:-1]), ids[:, p:], 1.0))
    ref_lp = torch.log_softmax(torch.tensor(ref), -1).numpy()
    want = np.take_along_axis(ref_lp[:, p - 1:-1], ids[:, p:, None], axis=-1)[..., 0]
    np.testing.assert_allclose(logps, want, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_reload_in_transformers(hf_dirs, family, tmp_path):
    src, model, _ = hf_dirs[family]
    spec, params = load_hf_model(src, dtype="float32")
    ids, mask, pos = _batch(spec.vocab_size, seed=1)

    # Unchanged weights: transformers computes exactly what it computed from the original.
    out_dir = save_hf_model(tmp_path / "same", spec, params, source_dir=src)
    same = transformers.AutoModelForCausalLM.from_pretrained(
        out_dir, attn_implementation="eager", dtype=torch.float32)
    np.testing.assert_array_equal(torch_logits(same, ids, mask, pos),
                                  torch_logits(model, ids, mask, pos))
    assert (out_dir / "tokenizer.json").is_file() and (out_dir / "chat_template.jinja").is_file()

    # Changed weights, config written from the spec alone (no source_dir): transformers and
    # Tandem agree on the new model.
    keys = iter(jax.random.split(jax.random.key(5), 10_000))
    moved = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), params)
    new_dir = save_hf_model(tmp_path / "moved", spec, moved, max_shard_bytes=20_000)
    assert (new_dir / "model.safetensors.index.json").is_file()  # several shards
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        new_dir, attn_implementation="eager", dtype=torch.float32)
    ref = torch_logits(reloaded, ids, mask, pos)
    out = _tandem_logits(define_model(spec), moved, ids, mask, pos)
    assert np.abs(out - ref)[mask].max() <= 1e-4
    # And Tandem reads its own output back to the same spec and params.
    spec2, params2 = load_hf_model(new_dir, dtype="float32")
    assert spec2 == spec
    jax.tree.map(np.testing.assert_array_equal, params2, moved)


def test_multi_file_bf16_and_fp16_checkpoints_load_exactly(tmp_path):
    # bf16 / fp16 on disk, several shards with an index; the values must arrive exactly (both
    # widen to float32 losslessly) and in the requested dtype.
    for dtype in ("bfloat16", "float16"):
        d = write_tiny_hf_model("qwen3", tmp_path / dtype, dtype=dtype, max_shard_size="20KB")
        assert len(list(d.glob("model-*.safetensors"))) > 1
        model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
        state = {k: v.numpy() for k, v in model.state_dict().items()}
        _, p32 = load_hf_model(d, dtype="float32")
        assert p32["embed"].dtype == jnp.float32
        np.testing.assert_array_equal(p32["embed"], state["model.embed_tokens.weight"])
        np.testing.assert_array_equal(
            p32["layers"][1]["attn"]["o_proj"],
            state["model.layers.1.self_attn.o_proj.weight"].T.reshape(4, 16, 32))
        np.testing.assert_array_equal(p32["lm_head"], state["lm_head.weight"].T)
        _, p16 = load_hf_model(d, dtype="bfloat16")
        assert {x.dtype for x in jax.tree.leaves(p16)} == {jnp.dtype(jnp.bfloat16)}
        if dtype == "bfloat16":  # bf16 -> bf16 is bit-exact
            jax.tree.map(lambda a, b: np.testing.assert_array_equal(
                np.asarray(a, np.float32), np.asarray(b)), p16, p32)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_loaded_params_land_in_the_trainer_sharding(hf_dirs, family, meshes):
    path = hf_dirs[family][0]
    spec, params = load_hf_model(path, dtype="float32",
                                 shardings=lambda m: param_shardings(m, meshes.trainer))
    want = param_shardings(define_model(spec), meshes.trainer)
    trainer_devices = set(meshes.trainer.mesh.devices.flat)
    for leaf, sh in zip(jax.tree.leaves(params), jax.tree.leaves(want), strict=True):
        assert leaf.sharding == sh
        assert set(leaf.sharding.device_set) == trainer_devices
    # FSDP over the 4 trainer devices: each holds a quarter of the embedding's D columns.
    embed = params["embed"]
    assert tuple(embed.sharding.spec) == (None, "fsdp")
    assert {s.data.shape for s in embed.addressable_shards} == {(spec.vocab_size, 8)}
    assert tuple(params["layers"][0]["attn"]["q_proj"].sharding.spec) == ("fsdp", None, None)
    # Same values as an unsharded load.
    _, plain = load_hf_model(path, dtype="float32")
    jax.tree.map(np.testing.assert_array_equal, params, plain)


def _hf_trainer(path, meshes, beta):
    spec = load_hf_spec(path, "float32")
    mdef = define_model(spec)
    params = load_hf_params(path, mdef, shardings=param_shardings(mdef, meshes.trainer))
    return Trainer(mdef, params, build_optimizer(OptimizerConfig()), meshes.trainer,
                   AlgorithmConfig(beta=beta), temperature=1.0)


def _assert_update_moves_weights(trainer, batch):
    before = np.asarray(trainer.params["layers"][1]["mlp"]["down_proj"])
    aux = jax.device_get(trainer.update(batch))
    assert np.isfinite(aux["loss/total"]) and aux["grad/norm"] > 0
    assert not np.allclose(before, np.asarray(trainer.params["layers"][1]["mlp"]["down_proj"]))
    return aux


# Every supported family runs a GRPO update by default (~5-8 s each on 2 cores, mostly the
# compile); the whole step through the sampler below runs on Gemma 3 by default and on the
# others with `pytest -m slow`.
@pytest.mark.parametrize("family", FAMILIES)
def test_grpo_update_on_each_family(hf_dirs, family, meshes):
    # One GRPO update (clipped surrogate + KL to the reference, AdamW) on the trainer mesh of
    # each family's model, from a fixed batch: finite loss, non-zero gradient, weights move.
    path = hf_dirs[family][0]
    tok = load_hf_tokenizer(path)
    trainer = _hf_trainer(path, meshes, beta=0.02)
    prompts = encode_prompts([{"prompt": t} for t in ("12=", "98765=")], tok)
    tokens, mask = np.repeat(prompts.tokens_PxL, 2, 0), np.repeat(prompts.mask_PxL, 2, 0)
    comp = np.array([[*tok.encode("21.", bos=False), tok.stop_id]] * 4, np.int32)
    cmask = np.ones_like(comp, bool)
    cmask[1, 2:] = False
    adv = np.array([1.0, -1.0, 0.5, -0.5], np.float32)
    _assert_update_moves_weights(
        trainer, TrainBatch(tokens, mask, comp, cmask, adv, np.zeros(comp.shape, np.float32)))


@pytest.mark.parametrize("family", [
    "gemma3", *(pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES if f != "gemma3")])
def test_grpo_step_samples_and_updates(hf_dirs, family, meshes):
    # The whole step: sample on the sampler mesh (KV cache), update on the trainer mesh. The
    # sampler's logprobs must equal the trainer's (the sliding window, q/k norms and soft-caps
    # agree between the cache path and the full forward). Gemma 3 has all of them; the other
    # families run with -m slow.
    path = hf_dirs[family][0]
    tok = load_hf_tokenizer(path)
    trainer = _hf_trainer(path, meshes, beta=0.0)
    sampler = JaxSampler(trainer.mdef, meshes.sampler, SamplingConfig(max_new_tokens=5),
                         pad_id=tok.pad_id, stop_ids=tok.stop_ids)
    sampler.load_weights(Resharder().transfer(trainer.params, sampler.shardings)[0])
    prompts = encode_prompts([{"prompt": t} for t in ("12=", "98765=")], tok)
    tokens, mask = np.repeat(prompts.tokens_PxL, 4, 0), np.repeat(prompts.mask_PxL, 4, 0)
    out = sampler.generate(tokens, mask, jax.random.key(0))
    comp, cmask, slogp = (np.asarray(x) for x in (out.tokens_BxT, out.mask_BxT, out.logps_BxT))
    assert cmask.sum() > len(tokens)
    # Prompt + completion are longer than the sliding window (W=4), so a cache path that
    # ignored the window would score differently from the full forward.
    window = trainer.mdef.spec.sliding_window
    assert window is None or window < mask.sum(1).max() + cmask.sum(1).max()
    adv = np.tile(np.array([1.0, -1.0, 0.5, -0.5], np.float32), 2)
    aux = _assert_update_moves_weights(trainer, TrainBatch(tokens, mask, comp, cmask, adv, slogp))
    assert aux["sampler/logp_abs_diff"] < 1e-4


@pytest.mark.slow  # the Gemma 3 step above checks the same through the sampler
def test_sliding_window_cache_decode_matches_full_forward(hf_dirs):
    # Token-by-token decoding through the KV cache, past the window (W=4) of the sliding layer,
    # gives the full forward's logits.
    path = hf_dirs["gemma2"][0]
    spec, params = load_hf_model(path, dtype="float32")
    assert spec.sliding_window == 4 and spec.sliding_layers == (True, False)
    mdef = define_model(spec)
    ids, mask, pos = _batch(spec.vocab_size, seed=3, rows=2, length=10)
    full = _tandem_logits(mdef, params, ids, mask, pos)
    from trainer.model import init_cache

    step = jax.jit(lambda p, c, t, q, m, i: apply_model(mdef, p, t, q, m, c, i))
    cache = init_cache(spec, 2, 10)
    for t in range(10):
        m = causal_mask(jnp.asarray(mask), t, 1)
        logits, cache = step(params, cache, ids[:, t:t + 1], pos[:, t:t + 1], m, t)
        np.testing.assert_allclose(np.asarray(logits)[:, 0][mask[:, t]], full[:, t][mask[:, t]],
                                   atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Tokenizers


@pytest.mark.parametrize("family", ["qwen2", "llama", "gemma3"])
def test_tokenizer_matches_transformers(hf_dirs, family):
    path, _, _ = hf_dirs[family]
    ours = load_hf_tokenizer(path)
    ref = transformers.AutoTokenizer.from_pretrained(path)
    text = "Reverse 3721, then stop."
    assert ours.encode(text, bos=False) == ref(text, add_special_tokens=False)["input_ids"]
    assert ours.vocab_size == len(ref)
    # BOS only where the family has one (Qwen has none).
    assert (ours.encode(text)[0] == ref.bos_token_id) == (family != "qwen2")
    msgs = [{"role": "user", "content": "12="}]
    assert ours.apply_chat_template(msgs) == ref.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True)
    ids = ref.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ours.encode_chat(msgs) == list(ids)
    # pad falls back to EOS where the tokenizer has none (Llama 3); stop = EOS.
    assert ours.stop_id == ref.eos_token_id
    assert ours.pad_id == (ref.pad_token_id if ref.pad_token_id is not None else ref.eos_token_id)
    # decode stops after the stop token and drops special tokens.
    body = ours.encode("21.", bos=False)
    assert ours.decode([*body, ours.stop_id, *ours.encode("junk", bos=False)]) == "21."


def test_chat_rows_use_the_chat_template(hf_dirs):
    tok = load_hf_tokenizer(hf_dirs["qwen2"][0])
    batch = encode_prompts([{"index": 0, "messages": [{"role": "user", "content": "12="}]},
                            {"index": 1, "prompt": "345="}], tok)
    row0 = batch.tokens_PxL[0][batch.mask_PxL[0]].tolist()
    assert row0 == tok.encode("<|im_start|>user\n12=<|im_end|>\n<|im_start|>assistant\n")
    assert batch.tokens_PxL[1][batch.mask_PxL[1]].tolist() == tok.encode("345=")


def test_generation_config_eos_ids_are_stop_ids(hf_dirs, tmp_path):
    import json
    import shutil

    d = tmp_path / "tok"
    shutil.copytree(hf_dirs["llama"][0], d)
    tok = load_hf_tokenizer(d)
    end_of_text = tok._tok.token_to_id("<|end_of_text|>")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [
        tok.stop_id, end_of_text]}))
    tok = load_hf_tokenizer(d)
    assert tok.stop_ids == (tok.stop_id, end_of_text)
    assert tok.decode([*tok.encode("12", bos=False), end_of_text, 5, 6]) == "12"


# ---------------------------------------------------------------------------------------------
# Errors name the file and the fix


def test_missing_files_are_clear_errors(hf_dirs, tmp_path):
    with pytest.raises(TokenizerFilesError, match=str(tmp_path / "tokenizer.json")):
        load_hf_tokenizer(tmp_path)
    with pytest.raises(HFCheckpointError, match=str(tmp_path / "config.json")):
        load_hf_spec(tmp_path)
    (tmp_path / "config.json").write_text((hf_dirs["qwen2"][0] / "config.json").read_text())
    with pytest.raises(HFCheckpointError, match="neither model.safetensors"):
        load_hf_model(tmp_path)


def test_wrong_weights_for_the_config_are_errors(hf_dirs, tmp_path):
    import shutil

    d = tmp_path / "mixed"
    shutil.copytree(hf_dirs["qwen2"][0], d)
    # Qwen3's config (untied, q/k norms) over Qwen2's weights (tied, none).
    (d / "config.json").write_text((hf_dirs["qwen3"][0] / "config.json").read_text())
    with pytest.raises(HFCheckpointError, match="the checkpoint has no tensor 'lm_head.weight'"):
        load_hf_model(d)


def test_config_parsing_old_and_new_rope_formats_agree():
    base = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 128}
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    old = spec_from_hf_config(base | {"rope_theta": 5e5, "rope_scaling": scaling | {
        "rope_type": "llama3"}})
    new = spec_from_hf_config(base | {"rope_parameters": scaling | {
        "rope_type": "llama3", "rope_theta": 5e5}})
    assert old == new and new.rope_theta == 5e5 and new.rope_scaling.kind == "llama3"
    with pytest.raises(HFCheckpointError, match="rope_type='yarn' is not supported"):
        spec_from_hf_config(base | {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(HFCheckpointError, match="model_type='mistral' is not supported"):
        spec_from_hf_config(base | {"model_type": "mistral"})


def test_model_path_config_errors(hf_dirs, tmp_path):
    with pytest.raises(ConfigError, match="model.path=.*does not exist"):
        load_config(overrides=[f"model.path={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match="fix: drop model.num_layers"):
        load_config(overrides=[f"model.path={hf_dirs['qwen2'][0]}", "model.num_layers=4"])
    cfg = load_config(overrides=[f"model.path={hf_dirs['qwen2'][0]}", "model.dtype=bfloat16"])
    assert cfg.model.path == str(hf_dirs["qwen2"][0])
    with pytest.raises(ConfigError, match="run.export_hf_dir=.*already exists"):
        load_config(overrides=[f"run.export_hf_dir={hf_dirs['qwen2'][0]}"])


def test_cli_run_from_a_hf_model_dir(tmp_path):
    # `tandem run model.path=<dir>`, in a fresh process with 8 simulated devices; the trained
    # policy is exported and transformers loads it. Weight decay changes every weight on each
    # update, whatever the rewards: with 4 groups of 2 a random model's advantages can all be 0.
    model_dir = write_tiny_hf_model("qwen3", tmp_path / "qwen3")
    export = tmp_path / "trained"
    env = {**os.environ, **simulation_env(8), "COLUMNS": "120"}
    out = subprocess.run(
        [sys.executable, "-m", "controller.cli", "run", f"model.path={model_dir}",
         "run.steps=2", "run.progress=false", "data.prompts_per_step=4",
         "sampling.group_size=2", "optimizer.weight_decay=0.1", f"run.export_hf_dir={export}"],
        capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"from {model_dir} (qwen3), 2 layers, d=32" in out.stdout
    assert "done: 2 steps" in out.stdout
    trained = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    start = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert type(trained).__name__ == "Qwen3ForCausalLM"
    assert not torch.equal(trained.model.layers[1].mlp.down_proj.weight,
                           start.model.layers[1].mlp.down_proj.weight)
    assert (export / "tokenizer.json").read_text() == (model_dir / "tokenizer.json").read_text()


def test_builtin_model_exports_to_transformers(tiny_model, tmp_path):
    # The built-in tiny model (Qwen2 layout: q/k/v biases, tied embeddings) becomes a Qwen2
    # directory that transformers computes the same logits from.
    mdef, params = tiny_model
    out_dir = save_hf_model(tmp_path / "builtin", mdef.spec, params)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        out_dir, attn_implementation="eager", dtype=torch.float32)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    ids, mask, pos = _batch(mdef.spec.vocab_size, seed=2)
    ref = torch_logits(model, ids, mask, pos)
    assert np.abs(_tandem_logits(mdef, params, ids, mask, pos) - ref)[mask].max() <= 1e-4


def test_failed_save_leaves_nothing_behind(hf_dirs, tmp_path):
    spec, params = load_hf_model(hf_dirs["llama"][0], dtype="float32")
    broken = {k: v for k, v in params.items() if k != "lm_head"}  # a tree missing a tensor
    with pytest.raises(KeyError):
        save_hf_model(tmp_path / "out", spec, broken, max_shard_bytes=20_000)
    assert list(tmp_path.iterdir()) == []  # no target, no partial directory
    # An existing non-empty target is refused unless overwrite=True.
    save_hf_model(tmp_path / "out", spec, params)
    with pytest.raises(HFCheckpointError, match="exists and is not empty"):
        save_hf_model(tmp_path / "out", spec, params)
    save_hf_model(tmp_path / "out", spec, params, overwrite=True)
    assert (tmp_path / "out" / "model.safetensors").is_file()
