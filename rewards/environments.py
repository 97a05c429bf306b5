"""Environments: what a policy talks to over several turns, and the built-in ones.

A multi-turn row is the prompt, then model turns and environment turns in alternation:

    prompt = env.reset(row)  ->  model turn  ->  observation  ->  model turn  ->  ... (done)

An environment is a Python class (one instance per row, built with `env.kwargs`), named in the
config like a reward function: a built-in name (`BUILTIN_ENVIRONMENTS`), `package.module:Class`
or `path/to/file.py:Class`. It subclasses `Environment` and overrides what it needs:

- `reset(row) -> messages`: the first messages (chat format: {"role", "content"}).
- `step(assistant_text) -> (observation messages | None, done, info)`: after a model turn
  with no tool call. `info["reward"]`, when given, is that turn's reward.
- `score(trajectory) -> float | dict | None`: the row's environment reward, `w_env · score`
  added to the reward functions' (default: the per-turn rewards summed, None without any).
- `answer(trajectory) -> str`: what the reward functions score (default: the last model turn).
- `tools`: `@tool` functions offered to the model (rewards/tools.py). A model turn that holds
  tool calls (`parse_tool_calls`, Hermes by default) is answered by the tools, one tool
  message each (`tool_message`), and `step` is not called for it: the row goes on.
- `stop_strings`: texts (one token each) that end a model turn besides the tokenizer's stop
  ids; `alphabet`: the characters its messages need on the built-in character tokenizer.

The environment object lives in the controller (its state is the row's): keep `reset`, `step`
and `score` quick and pure Python. Tools are what may be slow, hang or raise: they run in the
reward backend's worker processes with `rewards.timeout_s` (`run_tool_call` is what a worker
executes), and every failure becomes an error message the model reads as the tool's answer.

No JAX here (the package rule): the controller drives the turns (controller/rollout.py) and
the sampler generates them (sampler/multiturn.py).
"""

from __future__ import annotations

import ast
import math
import operator
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from rewards.base import Outcome, RewardError
from rewards.lookup import check_attribute_spec, load_attribute, normalize_spec
from rewards.tools import ParsedCall, Tool, ToolCall, as_tool, parse_hermes, result_text, tool

Message = dict[str, Any]  # {"role": "system" | "user" | "assistant" | "tool", "content": str}


@dataclass
class Trajectory:
    """A finished row, as `Environment.score` sees it."""

    row: Mapping[str, Any]
    messages: list[Message]  # reset's, then each assistant turn and observation, in order
    turns: int  # model turns
    turn_rewards: list[float] = field(default_factory=list)  # info["reward"] of `step` calls
    infos: list[dict[str, Any]] = field(default_factory=list)  # every `step`'s info
    tool_calls: int = 0
    tool_errors: int = 0
    # Why the row ended: "done" (the environment said so), "max_turns", "max_total_tokens"
    # (no room for another observation and answer), "cut" (the last model turn hit its token
    # budget without a stop), "template" (the chat template could not render the observation).
    ended: str = "done"

    @property
    def final_text(self) -> str:
        """The last model turn's text: what the reward functions score."""
        for m in reversed(self.messages):
            if m.get("role") == "assistant":
                return str(m.get("content", ""))
        return ""


class Environment:
    """The base class of environments; every method has a working default, so a subclass
    overrides only what differs. One instance serves one row from `reset` to `score`."""

    tools: ClassVar[Sequence[Any]] = ()  # @tool functions (or Tool objects) offered to the model
    stop_strings: ClassVar[tuple[str, ...]] = ()  # more one-token texts that end a model turn
    alphabet: ClassVar[str] = ""  # characters it needs on the built-in character tokenizer

    def __init__(self, **kwargs: Any):
        if kwargs:
            raise TypeError(f"{type(self).__name__} takes no arguments, got {sorted(kwargs)}")

    def reset(self, row: Mapping[str, Any]) -> list[Message]:
        """The first messages: the row's own chat `messages`, else its prompt as a user turn."""
        if row.get("messages") is not None:
            return [dict(m) for m in row["messages"]]
        return [{"role": "user", "content": str(row["prompt"])}]

    def step(self, assistant_text: str) -> tuple[list[Message] | None, bool, dict[str, Any]]:
        """After a model turn without tool calls: (observation, done, info). Default: the
        answer ends the row."""
        return None, True, {}

    def score(self, trajectory: Trajectory) -> float | dict[str, float] | None:
        """The environment's reward for a finished row; None: none (the reward functions'
        alone count). Default: the per-turn rewards summed, if `step` gave any."""
        return float(sum(trajectory.turn_rewards)) if trajectory.turn_rewards else None

    def answer(self, trajectory: Trajectory) -> str:
        """What the reward functions score as the row's completion: the last model turn."""
        return trajectory.final_text

    def parse_tool_calls(self, assistant_text: str) -> list[ParsedCall]:
        """The tool calls in a model turn (Hermes `<tool_call>{...}</tool_call>` by default)."""
        return parse_hermes(assistant_text)

    def tool_message(self, name: str, content: str, error: str | None = None) -> Message:
        """The message that answers one call: the tool's text, or, for a failed call, `content`
        is the error text (`error` its kind, one of rewards.tools.TOOL_ERROR_KINDS)."""
        return {"role": "tool", "name": name, "content": content}

    def error_text(self, name: str | None, kind: str, detail: str) -> str:
        """What the model reads when a call failed."""
        who = f"tool {name!r}" if name else "tool call"
        return f"error: {who} failed ({kind}): {detail}"


# ---------------------------------------------------------------------------------------------
# Built-in: reverse_digits with a `check` tool (the tiny default model learns it on the CPU)


@tool("check", description="Check a reversal: for each digit of the expected answer, that "
      "digit where the given answer has it right, '-' where it does not.",
      parameters={"type": "object", "properties": {
          "answer": {"type": "string", "pattern": "^[0-9]+$", "maxLength": 32}},
          "required": ["answer"], "additionalProperties": False})
def check_digits(answer: str, row: Mapping[str, Any]) -> str:
    target = str(row["target"])
    return "".join(t if i < len(answer) and answer[i] == t else "-"
                   for i, t in enumerate(target))


class ReverseDigitsCheck(Environment):
    """`reverse_digits` with a `check` tool and retries. The prompt is `3721=`; a model turn is
    digits ended by '.' (the answer: the row ends) or by '?' (a call of `check` on those
    digits). The tool answers with the digits the attempt got right, '-' for each wrong one,
    and '='; then the model tries again, up to env.max_turns. On the built-in character
    tokenizer a row reads `3721=1243?12-3=1273.`; a call the schema rejects (no digits, or
    other characters) is answered `!=`. The reward functions (`reverse_digits`) score the best
    attempt (`answer`), so a check never lowers the reward and the model learns to take them
    (docs/design.md#multi-turn-rollouts says why)."""

    tools = (check_digits,)
    stop_strings = ("?",)
    alphabet = "?-!"

    def reset(self, row: Mapping[str, Any]) -> list[Message]:
        self.row = row
        return super().reset(row)

    def answer(self, trajectory: Trajectory) -> str:
        """The attempt with the most credit (the first of equals), ended by '.' when the model
        ended it ('.' or '?'): what `reverse_digits` scores."""
        from rewards.builtin import reverse_digits

        attempts = [str(m.get("content", "")) for m in trajectory.messages
                    if m.get("role") == "assistant"]
        attempts = [a[:-1] + "." if a[-1:] in ("?", ".") else a for a in attempts]
        if not attempts:
            return ""
        return max(attempts, key=lambda a: reverse_digits("", a, self.row))

    def parse_tool_calls(self, assistant_text: str) -> list[ParsedCall]:
        if assistant_text.endswith("?"):
            return [ParsedCall("check", {"answer": assistant_text[:-1]})]
        return []

    def tool_message(self, name: str, content: str, error: str | None = None) -> Message:
        return {"role": "tool", "name": name, "content": ("!" if error else content) + "="}


# ---------------------------------------------------------------------------------------------
# Built-in: GSM8K with a calculator tool (for a Hugging Face chat model)

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def _evaluate(node: ast.AST) -> float | int:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 1e12):
            raise ValueError("exponent or base too large")
        return _BINARY[type(node.op)](left, right)
    raise ValueError(f"only numbers, + - * / // % ** and parentheses are allowed, not "
                     f"{ast.unparse(node)!r}")


@tool("calculate", description="Evaluate an arithmetic expression (numbers, + - * / // % ** "
      "and parentheses) and return the result.",
      parameters={"type": "object", "properties": {
          "expression": {"type": "string", "maxLength": 200,
                         "description": "e.g. (48 / 2) * 3 + 5"}},
          "required": ["expression"], "additionalProperties": False})
def calculate(expression: str) -> str:
    text = expression.replace(",", "").replace("$", "").replace("^", "**").strip()
    value = _evaluate(ast.parse(text, mode="eval"))
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"the result is {value}")
        if value.is_integer():
            return str(int(value))
        return f"{value:.10g}"
    return str(value)


GSM8K_CALCULATOR_SYSTEM = (
    "Solve the math word problem. You can call the calculate tool for any arithmetic: write "
    "<tool_call>{\"name\": \"calculate\", \"arguments\": {\"expression\": \"...\"}}</tool_call> "
    "and wait for its answer. When you know the result, give only the final number inside "
    "<answer></answer>.")


class Gsm8kCalculator(Environment):
    """GSM8K with a `calculate` tool: a system message, the question; the model may call the
    calculator (Hermes tool calls, offered through the chat template's tools), and a turn
    without a call is its final answer. Scored by the reward functions (e.g. `gsm8k`) on that
    last turn. For a Hugging Face chat model (Qwen 2.5 / 3 instruct templates take tools)."""

    tools = (calculate,)

    def __init__(self, system: str = GSM8K_CALCULATOR_SYSTEM):
        self.system = system

    def reset(self, row: Mapping[str, Any]) -> list[Message]:
        question = row.get("question") or row["prompt"]
        return [{"role": "system", "content": self.system},
                {"role": "user", "content": str(question)}]


BUILTIN_ENVIRONMENTS: Mapping[str, type[Environment]] = {
    "reverse_digits_check": ReverseDigitsCheck,
    "gsm8k_calculator": Gsm8kCalculator,
}

# Every name `env.name` may use in this process: the built-ins and `register_environment`'s.
_named: dict[str, type[Environment]] = dict(BUILTIN_ENVIRONMENTS)


def register_environment(name: str) -> Any:
    """A class decorator that makes an Environment available as `env.name=<name>` in this
    process (as `rewards.lookup.register_reward` does for rewards). Reward workers know only
    the built-ins, modules and files: a registered environment's tools must be importable
    (give `module:Class` instead) unless rewards run in this process."""

    def deco(cls: type[Environment]) -> type[Environment]:
        if not (isinstance(cls, type) and issubclass(cls, Environment)):
            raise RewardError(f"register_environment({name!r}): {cls!r} is not a subclass of "
                              f"rewards.environments.Environment")
        if name in _named and _named[name] is not cls:
            raise RewardError(f"environment {name!r} is already registered")
        _named[name] = cls
        return cls

    return deco


# ---------------------------------------------------------------------------------------------
# Resolution: spec -> class, tools; what a worker runs


def check_environment_spec(spec: str) -> None:
    """The cheap checks of `load_environment` (no user code runs): a built-in name, an existing
    file, a findable module. Raises RewardError naming `env.name`."""
    if spec in _named:
        return
    if ":" not in spec:
        raise RewardError(f"env.name: unknown environment {spec!r} (fix: one of "
                          f"{sorted(_named)}, 'package.module:Class' or "
                          f"'path/to/file.py:Class')")
    check_attribute_spec(spec, "env.name", "class")


def load_environment(spec: str) -> type[Environment]:
    """The environment class `spec` names (a built-in, `module:Class`, `file.py:Class`).
    Raises RewardError naming `env.name` when it cannot be imported or is no Environment."""
    if spec in _named:
        return _named[spec]
    check_environment_spec(spec)
    cls = load_attribute(spec, "env.name", "class", lambda v: isinstance(v, type))
    if not (isinstance(cls, type) and issubclass(cls, Environment)):
        raise RewardError(f"env.name: {spec!r} is {cls!r}, not a subclass of "
                          f"rewards.environments.Environment (fix: class MyEnv(Environment))")
    return cls


def environment_source(spec: str) -> str:
    """The `ToolCall.source` of an environment's tools: resolvable in any process."""
    return "env:" + normalize_spec(spec)


def offered_tools(spec: str, extra: Sequence[str] = ()) -> list[tuple[str, Tool]]:
    """(source, tool) for every tool the model is offered: the environment class's, then
    `env.tools`' functions. Raises RewardError for a tool without a schema or a name used
    twice, naming the field."""
    cls = load_environment(spec)
    out = [(environment_source(spec), as_tool(t, f"env.name={spec!r} ({cls.__name__}.tools)"))
           for t in cls.tools]
    for fn_spec in extra:
        check_attribute_spec(fn_spec, "env.tools")
        fn = load_attribute(fn_spec, "env.tools")
        out.append((normalize_spec(fn_spec), as_tool(fn, f"env.tools: {fn_spec!r}")))
    seen: set[str] = set()
    for _, t in out:
        if t.name in seen:
            raise RewardError(f"env.tools: two tools are named {t.name!r} (fix: rename one with "
                              f"@tool('other_name', ...))")
        seen.add(t.name)
    return out


_RESOLVED: dict[str, dict[str, Tool]] = {}  # per process: source -> {name: tool}


def _tools_at(source: str) -> dict[str, Tool]:
    if source not in _RESOLVED:
        if source.startswith("env:"):
            cls = load_environment(source.removeprefix("env:"))
            tools = [as_tool(t, cls.__name__) for t in cls.tools]
        else:
            tools = [as_tool(load_attribute(source, "env.tools"), source)]
        _RESOLVED[source] = {t.name: t for t in tools}
    return _RESOLVED[source]


def run_tool_call(call: ToolCall) -> Outcome:
    """Runs one (already validated) tool call in this process; never raises for the tool's
    own errors: they come back as an Outcome of kind "error" whose detail is one line."""
    t0 = time.perf_counter()
    try:
        fn = _tools_at(call.source)[call.name]
    except Exception as e:
        return Outcome("error", None, f"the tool could not be loaded: {type(e).__name__}: {e}",
                       time.perf_counter() - t0)
    kwargs = dict(call.arguments)
    if fn.takes_row:
        kwargs["row"] = call.row
    try:
        value = fn.fn(**kwargs)
    except Exception as e:  # the tool's own failure: the model reads it
        line = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        return Outcome("error", None, f"{type(e).__name__}: {line}".rstrip(": "),
                       time.perf_counter() - t0)
    return Outcome("ok", result_text(value), "", time.perf_counter() - t0)
