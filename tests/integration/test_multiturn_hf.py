"""A multi-turn job on a tiny Hugging Face chat model (`model.path`): the chat template renders
the turns, the model's end-of-turn token ends each turn, and the sampler's and the trainer's
logprobs agree on the model's tokens."""

import json
from pathlib import Path

import numpy as np
import pytest
from helpers.hf_fixtures import write_tiny_hf_model

from controller.api import Job
from controller.config import load_config
from controller.data.hf_tokenizer import HFTokenizer

pytestmark = pytest.mark.e2e  # a whole job

ENVS = Path(__file__).parents[1] / "helpers" / "envs.py"


@pytest.mark.parametrize("history", ["cache", "reprefill"])
def test_multiturn_job_on_a_hugging_face_chat_model(tmp_path, history):
    model = write_tiny_hf_model("qwen2", tmp_path / "model")
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Hi", "Hello there")))
    # The random model seldom draws its end-of-turn token: ten letters end a turn too (the
    # template then writes the end-of-turn itself, as the observation's first token).
    tok = HFTokenizer(model)
    stops = [tok.encode(c, bos=False)[0] for c in "abcdefghij"]
    cfg = load_config(overrides=[f"sampling.stop_tokens={stops}",
        f"model.path={model}", "data.task=jsonl", f"data.path={data}",
        f"rewards.functions=['{ENVS}:length_reward']", f"env.name={ENVS}:Chatty",
        "env.max_turns=3", "env.max_total_tokens=40", f"env.history={history}",
        "sampling.max_new_tokens=8", "sampling.group_size=2", "data.prompts_per_step=2",
        "run.steps=2", "run.progress=false", "status.enabled=false",
        f"run.output_dir={tmp_path / 'run'}", "run.log_samples=4"])
    with Job(cfg) as job:
        history_ = job.run()
        stop_ids = job.tokenizer.stop_ids
    for m in history_:
        assert m["env/turns_mean"] > 1 and m["env/masked_tokens"] > 0
        assert m["loss/tokens"] == m["env/model_tokens"]
        assert m["sampler/logp_abs_diff"] < 1e-4 and np.isfinite(m["loss/total"])
        assert m["reward/env"] > 0  # Chatty's per-turn rewards, summed
    samples = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text()
               .splitlines()]
    for s in samples:
        conv = s["conversation"]
        assert conv[0]["role"] == "user" and conv[1]["role"] == "assistant"
        # Between turns, the template's end of the assistant turn and the next user turn.
        if s["turns"] > 1:
            assert "<|im_end|>\n<|im_start|>user\ngo on<|im_end|>\n<|im_start|>assistant\n" in \
                s["completion"]
    assert any(s["turns"] > 1 for s in samples) and stop_ids
