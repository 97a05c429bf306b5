"""Environments: lookup by name, `module:Class` and file; tools and their checks; tool calls
in worker processes (raising, hanging and crashing tools contained); the built-ins."""

from pathlib import Path

import pytest

from rewards.base import RewardError
from rewards.environments import (
    ReverseDigitsCheck,
    Trajectory,
    calculate,
    check_digits,
    check_environment_spec,
    environment_source,
    load_environment,
    offered_tools,
    run_tool_call,
)
from rewards.pool import ProcessPool
from rewards.tools import ParsedCall, ToolCall

ENVS = Path(__file__).parents[2] / "helpers" / "envs.py"


def test_builtins_and_user_classes_load():
    assert load_environment("reverse_digits_check") is ReverseDigitsCheck
    cls = load_environment(f"{ENVS}:Scripted")
    assert cls.__name__ == "Scripted"
    assert load_environment("helpers.envs:Scripted").__name__ == "Scripted"


@pytest.mark.parametrize("spec, message", [
    ("nope", "env.name: unknown environment 'nope'"),
    ("no_such_module_xyz:Env", "env.name: 'no_such_module_xyz:Env': cannot import"),
    ("missing/file.py:Env", "env.name: 'missing/file.py:Env': the file"),
    (f"{ENVS}:Nope", "has no class 'Nope'"),
    (f"{ENVS}:NotAnEnvironment", "not a subclass of rewards.environments.Environment"),
])
def test_an_environment_that_cannot_be_loaded_is_an_error_naming_env_name(spec, message):
    with pytest.raises(RewardError, match="^env.name") as e:
        load_environment(spec)
    assert message in str(e.value)


def test_cheap_spec_check_imports_nothing():
    check_environment_spec("gsm8k_calculator")
    check_environment_spec(f"{ENVS}:Whatever")  # the file exists; the class is not looked up
    with pytest.raises(RewardError, match="env.name"):
        check_environment_spec("missing/file.py:Env")


def test_offered_tools_and_their_schema_errors():
    tools = offered_tools(f"{ENVS}:Scripted", [f"{ENVS}:shout"])
    assert [t.name for _, t in tools] == ["add", "boom", "hang", "die", "shout"]
    assert tools[0][0] == environment_source(f"{ENVS}:Scripted")
    assert tools[0][0].startswith("env:/")  # an absolute path: any process resolves it
    with pytest.raises(RewardError, match=r"env.name=.*NoSchemaTools.tools.*'no_schema' has no "
                                          r"JSON schema"):
        offered_tools(f"{ENVS}:NoSchemaTools")
    with pytest.raises(RewardError, match=r"^env.tools: .*'no_schema' has no JSON schema"):
        offered_tools("reverse_digits_check", [f"{ENVS}:no_schema"])
    with pytest.raises(RewardError, match="two tools are named 'add'"):
        offered_tools(f"{ENVS}:Scripted", [f"{ENVS}:add"])


def test_run_tool_call_in_this_process():
    src = environment_source(f"{ENVS}:Scripted")
    ok = run_tool_call(ToolCall(src, "add", {"a": 2, "b": 3}, {}))
    assert (ok.kind, ok.value) == ("ok", "5")
    bad = run_tool_call(ToolCall(src, "boom", {}, {}))
    assert bad.kind == "error" and bad.detail == "RuntimeError: kaput"
    gone = run_tool_call(ToolCall("env:nope", "add", {}, {}))
    assert gone.kind == "error" and "could not be loaded" in gone.detail
    row = {"target": "1273"}
    out = run_tool_call(ToolCall(environment_source("reverse_digits_check"), "check",
                                 {"answer": "1243"}, row))
    assert out.value == "12-3"  # the row reaches a tool that takes `row`


def test_tools_that_raise_hang_or_crash_are_contained_in_worker_processes():
    src = environment_source(f"{ENVS}:Scripted")
    calls = [ToolCall(src, "add", {"a": 1, "b": 1}, {}), ToolCall(src, "boom", {}, {}),
             ToolCall(src, "hang", {}, {}), ToolCall(src, "die", {}, {}),
             ToolCall(src, "add", {"a": 40, "b": 2}, {})]
    pool = ProcessPool([], num_workers=2, timeout_s=2.0, chunk_size=1)
    try:
        out = pool.run(calls)
    finally:
        pool.close()
    assert [o.kind for o in out] == ["ok", "error", "timeout", "crash", "ok"]
    assert out[0].value == "2" and out[4].value == "42"
    assert "kaput" in out[1].detail
    assert out[2].elapsed_s < 10


def test_reverse_digits_check():
    env = ReverseDigitsCheck()
    row = {"prompt": "3721=", "target": "1273"}
    assert env.reset(row) == [{"role": "user", "content": "3721="}]
    assert env.parse_tool_calls("12?") == [ParsedCall("check", {"answer": "12"})]
    assert env.parse_tool_calls("1273.") == []
    assert check_digits("1243", row) == "12-3" and check_digits("12", row) == "12--"
    assert env.step("1273.") == (None, True, {})  # an answer ends the row
    assert env.tool_message("check", "12-3") == {"role": "tool", "name": "check",
                                                 "content": "12-3="}
    # The reward functions score the best attempt, ended by '.' when the model ended it.
    msgs = [{"role": "assistant", "content": a} for a in ("1243?", "1273?", "12734")]
    assert env.answer(Trajectory(row, msgs, 3)) == "1273."
    assert env.answer(Trajectory(row, msgs[:1], 1)) == "1243."
    assert env.answer(Trajectory(row, [{"role": "assistant", "content": "12"}], 1)) == "12"
    assert env.tool_message("check", "error: ...", error="bad_arguments")["content"] == "!="
    assert env.score(Trajectory(row, [], 1)) is None  # the reward functions score it


def test_default_score_sums_per_turn_rewards():
    env = load_environment(f"{ENVS}:Scripted")()
    traj = Trajectory({}, [{"role": "assistant", "content": "hi"}], 2, turn_rewards=[0.5, 1.0])
    assert env.score(traj) == 1.5 and traj.final_text == "hi"


@pytest.mark.parametrize("expr, value", [
    ("2 + 3 * 4", "14"), ("7 / 2", "3.5"), ("(48 / 2) * 3 + 5", "77"), ("-2 ** 2", "-4"),
    ("1,000 * 3", "3000"), ("$5 * 2", "10"), ("2^10", "1024"), ("10 / 3", "3.333333333")])
def test_calculate(expr, value):
    assert calculate(expr) == value


@pytest.mark.parametrize("expr", ["1 / 0", "__import__('os')", "2 ** 10000", "a + 1", "1 +"])
def test_calculate_refuses(expr):
    with pytest.raises((ValueError, ZeroDivisionError, SyntaxError)):
        calculate(expr)
