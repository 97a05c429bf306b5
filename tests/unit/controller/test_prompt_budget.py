"""The prompt budget: data.max_prompt_tokens + sampling.max_new_tokens against model.path's
max_position_embeddings (a config error before any row is read), and data.truncate_prompts
(left truncation to the exact budget, counted in the step's `data/truncated_prompts`)."""

import json

import numpy as np
import pytest

from controller.config import ConfigError, load_config
from controller.data import build_dataset
from controller.data.datasets import DataError
from controller.data.tokenizer import ByteTokenizer
from controller.loop import SyncLoop
from sampler.base import Completions

GSM8K = ["data.task=gsm8k", "data.split=test", "rewards.functions=[gsm8k]"]


def _model_dir(tmp_path, max_positions):
    """A model directory as far as the budget reads it: config.json alone."""
    d = tmp_path / f"model-{max_positions}"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "qwen2",
                                               "max_position_embeddings": max_positions}))
    return d


def _prompts_file(tmp_path, lengths):
    """A JSONL file whose prompt i is `lengths[i]` bytes: "q<i>" then a's up to the length."""
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": (f"q{i}" + "a" * n)[:n]}) + "\n"
                            for i, n in enumerate(lengths)))
    return path


def test_a_set_max_prompt_tokens_past_the_models_positions_is_a_config_error(tmp_path):
    # 512 prompt + 6 new tokens = 518 positions > 128: the error names both fields, their
    # values, the model's limit, and the two fixes (P_max = 128 - 6 = 122, or truncation).
    model = _model_dir(tmp_path, 128)
    cfg = load_config(overrides=[*GSM8K, f"model.path={model}", "data.max_prompt_tokens=512"])
    with pytest.raises(ConfigError) as e:
        build_dataset(cfg, ByteTokenizer())
    msg = str(e.value)
    assert "data.max_prompt_tokens=512 + sampling.max_new_tokens=6 = 518 positions" in msg
    assert "has 128 positions (max_position_embeddings in its config.json)" in msg
    assert "fix: data.max_prompt_tokens=122, or data.truncate_prompts=true" in msg
    # A completion that leaves no position for a prompt is an error even with truncation.
    cfg = load_config(overrides=[*GSM8K, f"model.path={model}", "sampling.max_new_tokens=128",
                                 "data.truncate_prompts=true"])
    with pytest.raises(ConfigError, match="sampling.max_new_tokens=128 leaves no position for "
                                          "a prompt.*fix: e.g. sampling.max_new_tokens=64"):
        build_dataset(cfg, ByteTokenizer())


def test_unset_max_prompt_tokens_is_bounded_by_the_model_and_overlong_prompts_are_bad_rows(
        tmp_path):
    # Unset, P_max = min(1024, 128 - 6) = 122. Every bundled GSM8K prompt is longer than 122
    # bytes, so no row is usable: the error says why, with the fix.
    model = _model_dir(tmp_path, 128)
    cfg = load_config(overrides=[*GSM8K, f"model.path={model}"])
    with pytest.raises(DataError) as e:
        build_dataset(cfg, ByteTokenizer())
    msg = str(e.value)
    assert "1319 of 1319 rows" in msg
    assert ("more than the 122 tokens the model leaves for a prompt (max_position_embeddings=128 "
            "in model.path's config.json - sampling.max_new_tokens=6)") in msg
    assert "fix: data.truncate_prompts=true to keep the end of each prompt" in msg
    # A file with some rows over the budget: those are bad rows, the rest are served.
    path = _prompts_file(tmp_path, [121, 122, 123, 200])  # + BOS: 122, 123, 124, 201 tokens
    cfg = load_config(overrides=["data.task=jsonl", f"data.path={path}", f"model.path={model}",
                                 "rewards.functions=[gsm8k]"])
    with pytest.warns(UserWarning, match="3 of 4 rows of .*p.jsonl are bad"):
        ds = build_dataset(cfg, ByteTokenizer())
    assert [r["line"] for r in ds.rows] == [1]
    assert [(b.line, b.reason.split(",")[0]) for b in ds.bad_rows] == [
        (2, "prompt is 123 tokens"), (3, "prompt is 124 tokens"), (4, "prompt is 201 tokens")]


class _EchoSampler:
    """Records the prompts it is handed; completions are one stop token each."""

    shardings = None

    def __init__(self):
        self.prompts = []

    def generate(self, tokens_BxP, mask_BxP, key, group=1):
        self.prompts.append((np.asarray(tokens_BxP), np.asarray(mask_BxP)))
        b = len(tokens_BxP)
        return Completions(np.full((b, 1), ByteTokenizer.stop_id, np.int32),
                           np.zeros((b, 1), np.float32), np.ones((b, 1), bool))

    def load_weights(self, params):
        pass

    def metrics(self):
        return {}


class _Trainer:
    params = None
    lora = False

    def pretrace(self, batch):
        pass


class _Rewards:
    names = ("zero",)

    def score_each(self, prompts, texts, rows, ids):
        from rewards.registry import Scores

        return Scores([0.0] * len(texts), {"zero": [0.0] * len(texts)}, {})


def _produce(cfg, tokenizer):
    """One step's sampler half on a real dataset; returns (the sampler's prompts, metrics)."""
    sampler = _EchoSampler()
    loop = SyncLoop(cfg, tokenizer, build_dataset(cfg, tokenizer), _Trainer(), sampler,
                    resharder=None, rewards=_Rewards())
    rollout = loop.produce(1)
    (tokens, mask), = sampler.prompts
    return tokens, mask, rollout.metrics


def test_truncate_prompts_keeps_the_end_of_each_prompt_at_the_exact_budget(tmp_path):
    # P_max = 40 - 8 = 32. The prompts are 10, 31, 32 and 60 bytes: with BOS 11, 32, 33 and 61
    # tokens, so the last two are cut to 32 (BOS + their last 31 bytes) and counted.
    model = _model_dir(tmp_path, 40)
    lengths = [10, 31, 32, 60]
    path = _prompts_file(tmp_path, lengths)
    cfg = load_config(overrides=[
        "data.task=jsonl", f"data.path={path}", f"model.path={model}", "data.shuffle=false",
        "data.prompts_per_step=4", "sampling.group_size=2", "sampling.max_new_tokens=8",
        "data.truncate_prompts=true", "rewards.functions=[gsm8k]"])
    tok = ByteTokenizer()
    with pytest.warns(UserWarning, match="2 of 4 prompts of .*p.jsonl are longer than the 32 "
                                         "tokens the model leaves.*left-truncated to 32"):
        tokens, mask, metrics = _produce(cfg, tok)
    assert metrics["data/truncated_prompts"] == 2.0
    texts = [(f"q{i}" + "a" * n)[:n] for i, n in enumerate(lengths)]
    for p, text in enumerate(texts):
        for row in (2 * p, 2 * p + 1):  # G = 2 rows per prompt
            got = tokens[row][mask[row]].tolist()
            want = tok.encode(text)
            if len(want) > 32:
                want = [tok.bos_id, *want[-31:]]
            assert got == want
            assert len(got) == min(len(text) + 1, 32)
    assert mask.sum(axis=1).max() == 32  # no row holds more than the budget
    # BOS is kept first when present; without one the last ids are kept.
    from controller.data.batch import truncate_left

    assert truncate_left([1, 5, 6, 7, 8], 3, bos_id=1) == [1, 7, 8]
    assert truncate_left([5, 6, 7, 8], 3, bos_id=None) == [6, 7, 8]
    assert truncate_left([5, 6], 3, bos_id=None) == [5, 6]


def test_prompts_that_fit_are_unchanged_by_the_budget_and_truncation(tmp_path):
    # max_position_embeddings=4096 leaves P_max = 1024 (the default): nothing is cut, and the
    # batch is the one the built-in model (no position limit) gets without truncation.
    path = _prompts_file(tmp_path, [10, 31, 32, 60])
    common = ["data.task=jsonl", f"data.path={path}", "data.shuffle=false",
              "data.prompts_per_step=4", "sampling.group_size=2", "rewards.functions=[gsm8k]"]
    tok = ByteTokenizer()
    base_tokens, base_mask, base = _produce(load_config(overrides=common), tok)
    model = _model_dir(tmp_path, 4096)
    tokens, mask, metrics = _produce(load_config(overrides=[
        *common, f"model.path={model}", "data.truncate_prompts=true"]), tok)
    assert metrics["data/truncated_prompts"] == 0.0
    assert "data/truncated_prompts" not in base  # reported only with truncation on
    np.testing.assert_array_equal(tokens, base_tokens)
    np.testing.assert_array_equal(mask, base_mask)
    assert tokens.shape[1] == 64  # the dataset's power-of-two width, as before


def test_the_job_checks_the_budget_before_building_anything(tmp_path):
    """`Job` (and so `tandem run`, which reports its ConfigError) stops at the budget check,
    on a real tiny Hugging Face model with 128 positions."""
    pytest.importorskip("transformers")
    from helpers.hf_fixtures import write_tiny_hf_model

    from controller.api import Job

    model = write_tiny_hf_model("qwen2", tmp_path / "tiny-qwen2")
    cfg = load_config(overrides=[*GSM8K, f"model.path={model}", "data.max_prompt_tokens=256",
                                 "status.enabled=false"])
    with pytest.raises(ConfigError, match=r"data.max_prompt_tokens=256 \+ sampling.max_new_"
                                          r"tokens=6 = 262 positions, but the model at "
                                          r"model.path=.* has 128 positions"):
        Job(cfg)
