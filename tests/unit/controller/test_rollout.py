"""Multi-turn rollouts driven by scripted policies: the stored tokens are the chat template's
rendering of the conversation, the loss mask covers exactly the model's tokens, and bad tool
calls (malformed, unknown, bad arguments, raising, hanging, crashing) become error messages
the model reads, counted by kind."""

import re
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers.chat_fixtures import write_chat_tokenizer

from controller.config import ConfigError, load_config
from controller.data.hf_tokenizer import HFTokenizer
from controller.data.tasks import digits_tokenizer
from controller.rollout import MultiTurn
from rewards.registry import RewardSet
from sampler.multiturn import TurnOutput

ENVS = Path(__file__).parents[2] / "helpers" / "envs.py"


class ScriptedTurns:
    """Plays script[row][turn] (ids) as the model's turns, cut to each turn's budget, with
    logprob -0.5 per token; records every id the sampler would have fed (prompt, turns and
    observations), row by row."""

    traces = 0

    def __init__(self, script: list[list[list[int]]]):
        self.script = script

    def start(self, prompts, *, group=1):
        self.fed = [list(p) for p in prompts]
        self.turn_no = 0

    def observe(self, row, ids):
        self.fed[row] += list(ids)

    def turn(self, live, budget, rng):
        out = []
        for r, is_live in enumerate(live):
            ids = self.script[r][self.turn_no][:budget[r]] if is_live else []
            self.fed[r] += ids
            out.append(ids)
        self.turn_no += 1
        return TurnOutput(out, [[-0.5] * len(x) for x in out], max(map(len, out)), False)

    def finish(self):
        pass


def _multiturn(tokenizer, script, *overrides):
    cfg = load_config(overrides=["rewards.timeout_s=1.5", "rewards.num_workers=2", *overrides])
    return MultiTurn(cfg, tokenizer, None, RewardSet(["reverse_digits"]),
                     turns=ScriptedTurns(script))


def _rollout(mt, rows):
    started = mt.begin(rows, group=1)
    try:
        return started, mt.run(started, key=jax.random.key(0))
    finally:
        mt.close()


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    return HFTokenizer(write_chat_tokenizer(tmp_path_factory.mktemp("chat")))


def test_a_scripted_conversation_is_stored_as_the_chat_template_renders_it(chat_tokenizer):
    tok = chat_tokenizer
    eos = tok.stop_ids[0]
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
    texts = [f"Let me add.{call}", "It is 5.", "Ok.", "Bye."]
    script = [[[*tok.encode(t, bos=False), eos] for t in texts]]
    mt = _multiturn(tok, script, f"env.name={ENVS}:Scripted", "env.max_turns=6",
                    "env.max_total_tokens=600", "sampling.max_new_tokens=100")
    row = {"prompt": "What is 2+3?", "target": "5"}
    started, done = _rollout(mt, [row])

    conversation = [
        {"role": "system", "content": "You are a test."},
        {"role": "user", "content": row["prompt"]},
        {"role": "assistant", "content": texts[0]}, {"role": "tool", "name": "add", "content": "5"},
        {"role": "assistant", "content": texts[1]}, {"role": "user", "content": "first reply"},
        {"role": "assistant", "content": texts[2]}, {"role": "user", "content": "second reply"},
        {"role": "assistant", "content": texts[3]}]
    assert done.records[0]["conversation"] == conversation
    assert done.rows[0]["trajectory"] == conversation
    # The whole row: prompt + completion = the template's rendering of the conversation, tools
    # included, up to the newline the template writes after the model's last end-of-turn.
    schemas = [t.schema() for _, t in mt.tools]
    rendered = tok.encode(tok.apply_chat_template(conversation, add_generation_prompt=False,
                                                  tools=schemas), bos=False)
    p = done.packed
    stored = started.prompt_ids[0] + p.tokens_BxT[0][p.mask_BxT[0]].tolist()
    assert stored == rendered[:len(stored)]
    assert tok.decode_all(rendered[len(stored):]) == "\n"
    assert mt.turns.fed[0] == stored  # what the sampler was fed is what the trainer sees

    # Loss mask: exactly the model's ids, in order; observations attended but masked out.
    model_ids = [i for turn in script[0] for i in turn]
    assert p.tokens_BxT[0][p.model_mask_BxT[0]].tolist() == model_ids
    np.testing.assert_array_equal(p.logps_BxT[0][p.model_mask_BxT[0]], -0.5)
    assert (p.logps_BxT[0][~p.model_mask_BxT[0]] == 0).all()
    n = int(p.mask_BxT[0].sum())
    assert p.mask_BxT[0][:n].all() and not p.mask_BxT[0][n:].any()  # contiguous, then padding
    assert done.metrics["env/masked_tokens"] == n - len(model_ids)
    assert done.metrics["env/turns_mean"] == 4 and done.metrics["env/tool_calls"] == 1
    assert done.metrics["env/ended/done_frac"] == 1 and not done.truncated_B[0]
    assert done.final_texts == ["Bye."]
    assert done.env_scored and done.env_scores_B[0] == pytest.approx(0.5 + 0.5 + 1.0)


def test_bad_tool_calls_are_answered_with_errors_and_counted(chat_tokenizer):
    tok = chat_tokenizer
    eos = tok.stop_ids[0]

    def call(name, args):
        return f'<tool_call>{{"name": "{name}", "arguments": {args}}}</tool_call>'

    texts = [call("add", '{"a": 2') + call("nope", "{}") + call("add", '{"a": "x", "b": 1}'),
             call("boom", "{}") + call("hang", "{}") + call("die", "{}") + call("add",
                                                                                '{"a": 1, "b": 1}'),
             "done"]
    script = [[[*tok.encode(t, bos=False), eos] for t in texts]
              + [tok.encode("this turn never stops", bos=False)]]
    mt = _multiturn(tok, script, f"env.name={ENVS}:Scripted", "env.max_turns=6",
                    "env.max_total_tokens=3000", "sampling.max_new_tokens=300")
    _, done = _rollout(mt, [{"prompt": "Hi", "target": "0"}])

    m = done.metrics
    assert m["env/tool_calls"] == 7 and m["env/tool_errors"] == 6
    for kind in ("malformed", "unknown_tool", "bad_arguments", "error", "timeout", "crash"):
        assert m[f"env/tool_errors/{kind}"] == 1, kind
    conv = done.records[0]["conversation"]
    tools = [c for c in conv if c["role"] == "tool"]
    assert [c["content"].split(" (")[0] for c in tools[:6]] == ["error: tool call failed"] + [
        f"error: tool {n!r} failed" for n in ("nope", "add", "boom", "hang", "die")]
    assert "(malformed)" in tools[0]["content"] and "not valid JSON" in tools[0]["content"]
    assert "(unknown_tool)" in tools[1]["content"] and "'add'" in tools[1]["content"]
    assert "(bad_arguments)" in tools[2]["content"] and "arguments.a" in tools[2]["content"]
    assert "RuntimeError: kaput" in tools[3]["content"]
    assert "(timeout)" in tools[4]["content"] and "(crash)" in tools[5]["content"]
    assert tools[6]["content"] == "2"  # the rollout went on: the good call was answered
    # The last turn had no stop token: the row ends there, truncated.
    assert done.records[0]["ended"] == "cut" and done.truncated_B[0]
    assert done.records[0]["turns"] == 4


def test_the_builtin_digit_task_renders_as_one_string_and_ends_rows_for_each_reason():
    tok = digits_tokenizer("?-!")
    enc = lambda text: tok.encode(text, bos=False)  # noqa: E731
    script = [[enc("1243?"), enc("?"), enc("1273.")],  # check, bad call, answer
              [enc("12?"), enc("1?"), enc("9?")],  # out of turns (the last call is not run)
              [enc("1234"), [], []]]  # no stop in the turn's tokens: cut
    mt = _multiturn(tok, script, "env.name=reverse_digits_check", "env.max_turns=3",
                    "sampling.max_new_tokens=5")
    rows = [{"prompt": "3721=", "target": "1273"}] * 3
    started, done = _rollout(mt, rows)
    p = done.packed
    text = [tok.decode(started.prompt_ids[r] + p.tokens_BxT[r][p.mask_BxT[r]].tolist())
            for r in range(3)]
    assert text == ["3721=1243?12-3=?!=1273.", "3721=12?12--=1?1---=9?", "3721=1234"]
    model = [tok.decode(p.tokens_BxT[r][p.model_mask_BxT[r]].tolist()) for r in range(3)]
    assert model == ["1243??1273.", "12?1?9?", "1234"]
    assert [r["ended"] for r in done.records] == ["done", "max_turns", "cut"]
    assert [r["tool_calls"] for r in done.records] == [2, 3, 0]
    assert done.metrics["env/tool_errors/bad_arguments"] == 1
    assert done.final_texts == ["1273.", "12.", "1234"]  # the best attempts
    assert done.truncated_B.tolist() == [False, False, True]
    assert not done.env_scored


def test_out_of_tokens_and_environment_errors_end_rows_and_are_counted():
    tok = digits_tokenizer("?-!")
    enc = lambda text: tok.encode(text, bos=False)  # noqa: E731
    # T = 8: "1243?" (5) + "12-3=" (5) leaves no room: the observation ends the row.
    mt = _multiturn(tok, [[enc("1243?"), enc("1273.")]], "env.name=reverse_digits_check",
                    "env.max_total_tokens=8", "sampling.max_new_tokens=5")
    _, done = _rollout(mt, [{"prompt": "3721=", "target": "1273"}])
    assert done.records[0]["ended"] == "max_total_tokens" and done.truncated_B[0]
    assert done.packed.mask_BxT[0].sum() == 5

    mt = _multiturn(tok, [[enc("12.")]], f"env.name={ENVS}:Broken")
    _, done = _rollout(mt, [{"prompt": "3721=", "target": "1273"}])
    assert done.records[0]["ended"] == "error" and done.metrics["env/step_errors"] == 1


@pytest.mark.parametrize("overrides, message", [
    (["env.max_turns=0"], "env.max_turns=0: Input should be greater than or equal to 1"),
    (["env.name=reverse_digits_check", "sampling.backend=vllm"],
     "env.name='reverse_digits_check' with sampling.backend=vllm"),
    (["env.name=reverse_digits_check", "eval.enabled=true"], "eval.enabled=true with env.name"),
])
def test_bad_env_configs_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(overrides=overrides)
    assert not load_config(overrides=["env.name=reverse_digits_check"]).eval_enabled


@pytest.mark.parametrize("overrides, message", [
    (["env.name=no_such_package_xyz:Env"], "env.name: 'no_such_package_xyz:Env': cannot import"),
    (["env.name=nope"], "env.name: unknown environment 'nope'"),
    (["env.name=reverse_digits_check", "env.tools=['missing.py:fn']"], "env.tools: "),
])
def test_bad_environments_are_found_before_jax_starts(overrides, message):
    from controller.cli.inputs import check_run_inputs

    with pytest.raises(ConfigError, match=re.escape(message)):
        check_run_inputs(load_config(overrides=overrides))


@pytest.mark.parametrize("overrides, message", [
    ([f"env.name={ENVS}:NotAnEnvironment"], "env.name: "),
    ([f"env.name={ENVS}:NoSchemaTools"], "'no_schema' has no JSON schema"),
    (["env.name=reverse_digits_check", f"env.tools=['{ENVS}:no_schema']"],
     "env.tools: "),
    (["env.name=reverse_digits_check", "env.kwargs={x: 1}"], "env.kwargs={'x': 1}: "),
])
def test_environments_that_cannot_be_built_are_config_errors(overrides, message):
    cfg = load_config(overrides=overrides)
    with pytest.raises(ConfigError, match=re.escape(message)):
        MultiTurn(cfg, digits_tokenizer("?-!"), None, RewardSet(["reverse_digits"]),
                  turns=ScriptedTurns([]))


@pytest.mark.parametrize("overlong_filtering", [False, True])
def test_the_train_batch_of_multiturn_rows_trains_on_model_tokens_only(overlong_filtering):
    from controller.loop import Loop, Samples

    loop = Loop.__new__(Loop)  # only what _train_batch reads
    loop.cfg = load_config(overrides=["env.name=reverse_digits_check",
                                      f"algorithm.overlong_filtering={overlong_filtering}"])
    loop.tokenizer, loop.prompt_group = digits_tokenizer("?-!"), 1
    # Row 0: model, observation, model; row 1: model then an observation, truncated.
    mask = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]], bool)
    model = np.array([[1, 1, 0, 0, 1, 0], [1, 0, 0, 0, 0, 0]], bool)
    b = Samples([{}, {}], np.ones((2, 3), np.int32), np.ones((2, 3), bool),
                np.ones((2, 6), np.int32), mask, np.where(model, -0.5, 0.0),
                np.array([False, True]), np.zeros(2), np.zeros(2), np.zeros((2, 1)),
                model_mask_BxT=model)
    train = loop._train_batch(b)
    np.testing.assert_array_equal(train.completion_mask_BxT, mask)  # all attended
    want = model & ~np.array([[False], [overlong_filtering]])
    np.testing.assert_array_equal(train.loss_mask_BxT, want)
    np.testing.assert_array_equal(train.sampled_mask, model)
