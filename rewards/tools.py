"""Tools a policy may call in a multi-turn rollout: JSON-schema signatures, calls parsed from
the model's text, argument checks, and the unit of work the reward backends run.

A tool is a plain Python function declared with `@tool`:

    @tool(description="Evaluate an arithmetic expression.",
          parameters={"type": "object",
                      "properties": {"expression": {"type": "string"}},
                      "required": ["expression"]})
    def calculate(expression: str) -> str: ...

The schema is what the chat template shows the model (`Tool.schema()`, the OpenAI / Hugging
Face `tools=` format) and what a call's arguments are checked against before the function
runs. A function that names a `row` parameter also gets the dataset row (e.g. a target to check
an answer against); that argument is not part of the schema.

Calls come out of the model's text in the Hermes / Qwen form (`parse_hermes`):

    <tool_call>{"name": "calculate", "arguments": {"expression": "2+3"}}</tool_call>

Every call ends in an answer the model sees, never an exception: text that does not parse is a
`malformed` call, a name the job does not offer is `unknown_tool`, arguments that break the
schema are `bad_arguments`; the function itself runs in the reward backend (worker processes
with `rewards.timeout_s`), where it may end as `error` (it raised), `timeout` or `crash`.
Those six kinds are `TOOL_ERROR_KINDS`; the rollout counts each in `env/tool_errors/<kind>`.

No JAX and nothing of the rest of the package but `rewards.base`: calls cross into worker
processes, so `ToolCall` is a plain frozen dataclass.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rewards.base import RewardError

TOOL_ERROR_KINDS = ("malformed", "unknown_tool", "bad_arguments", "error", "timeout", "crash")


@dataclass(frozen=True)
class Tool:
    """A function offered to the model, with the JSON schema of its arguments."""

    name: str
    description: str
    parameters: Mapping[str, Any]  # a JSON schema of type "object"
    fn: Callable[..., Any]

    @property
    def takes_row(self) -> bool:
        """Whether the function also gets the dataset row (a parameter named `row`)."""
        try:
            return "row" in inspect.signature(self.fn).parameters
        except (TypeError, ValueError):
            return False

    def schema(self) -> dict[str, Any]:
        """The tool as chat templates take it (`tools=[...]`, the OpenAI function format)."""
        return {"type": "function", "function": {
            "name": self.name, "description": self.description,
            "parameters": dict(self.parameters)}}


def tool(name: str | None = None, *, parameters: Mapping[str, Any],
         description: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declares a function as a tool: attaches a `Tool` as its `.tool` attribute and returns the
    function itself (so it stays importable, picklable and callable as before).

    Args:
      name: the name the model calls it by; default the function's name.
      parameters: the JSON schema of the arguments (type "object").
      description: what the model is told it does; default the docstring's first line.
    """
    check_schema(parameters, name or "tool")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        doc = (inspect.getdoc(fn) or "").strip().splitlines()
        fn.tool = Tool(name or fn.__name__, description or (doc[0] if doc else ""),  # type: ignore[attr-defined]
                       dict(parameters), fn)
        return fn

    return deco


def check_schema(schema: Any, name: str) -> None:
    """Raises RewardError unless `schema` is a JSON schema for an arguments object."""
    if not isinstance(schema, Mapping) or schema.get("type") != "object":
        raise RewardError(f"tool {name!r}: parameters={schema!r} is not a JSON schema of type "
                          f"'object' (fix: e.g. parameters={{'type': 'object', 'properties': "
                          f"{{'x': {{'type': 'string'}}}}, 'required': ['x']}})")
    props = schema.get("properties", {})
    if not isinstance(props, Mapping) or not all(isinstance(v, Mapping) for v in props.values()):
        raise RewardError(f"tool {name!r}: 'properties' must map each argument name to its "
                          f"schema, got {props!r}")


def as_tool(obj: Any, where: str) -> Tool:
    """A `Tool`, or a function declared with `@tool`, as a Tool; `where` names the config field
    (or class) it came from for the error, raised for anything without a schema."""
    if isinstance(obj, Tool):
        check_schema(obj.parameters, obj.name)
        return obj
    declared = getattr(obj, "tool", None)
    if callable(obj) and isinstance(declared, Tool):
        return declared
    what = getattr(obj, "__name__", repr(obj))
    raise RewardError(
        f"{where}: {what!r} has no JSON schema, so the model cannot be told how to call it "
        f"(fix: declare it with @rewards.tools.tool(parameters={{'type': 'object', "
        f"'properties': {{...}}}}))")


# ---------------------------------------------------------------------------------------------
# Arguments against a schema: the subset of JSON Schema tool signatures use.

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
    "array": (list, tuple), "object": (dict,), "null": (type(None),),
}


def check_arguments(schema: Mapping[str, Any], value: Any, path: str = "arguments"
                    ) -> str | None:
    """The first way `value` breaks `schema` (type, enum, required, unknown properties when
    additionalProperties is false, pattern, length and numeric bounds, array items), or None."""
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        ok = False
        for t in names:
            py = _JSON_TYPES.get(t)
            if py is None:
                continue
            # JSON has no separate bool: true is not an integer or number here.
            if isinstance(value, bool) and t in ("integer", "number"):
                continue
            if isinstance(value, py) or (t == "integer" and isinstance(value, float)
                                         and value.is_integer()):
                ok = True
                break
        if not ok:
            return f"{path} is {json.dumps(value)[:60]}, not of type {' or '.join(names)}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{path} is {json.dumps(value)[:60]}, not one of {schema['enum']}"
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            return f"{path} is shorter than {schema['minLength']} characters"
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            return f"{path} is longer than {schema['maxLength']} characters"
        if "pattern" in schema and re.search(schema["pattern"], value) is None:
            return f"{path}={value[:60]!r} does not match {schema['pattern']!r}"
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            return f"{path}={value} is below {schema['minimum']}"
        if "maximum" in schema and value > schema["maximum"]:
            return f"{path}={value} is above {schema['maximum']}"
    if isinstance(value, list | tuple) and isinstance(schema.get("items"), Mapping):
        for i, item in enumerate(value):
            if (why := check_arguments(schema["items"], item, f"{path}[{i}]")) is not None:
                return why
    if isinstance(value, dict):
        props = schema.get("properties", {})
        missing = [k for k in schema.get("required", []) if k not in value]
        if missing:
            return f"{path} lacks the required {', '.join(map(repr, missing))}"
        if schema.get("additionalProperties", True) is False:
            extra = sorted(set(value) - set(props))
            if extra:
                return f"{path} has unknown {', '.join(map(repr, extra))} (known: {sorted(props)})"
        for k, v in value.items():
            if k in props and (why := check_arguments(props[k], v, f"{path}.{k}")) is not None:
                return why
    return None


# ---------------------------------------------------------------------------------------------
# Calls in the model's text

_CALL_OPEN, _CALL_CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class ParsedCall:
    """One call found in a model turn: a name and arguments, or why it could not be read."""

    name: str | None
    arguments: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None  # set: a malformed call (the text did not parse)


def parse_hermes(text: str) -> list[ParsedCall]:
    """The `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` calls in `text`, in order
    (Hermes / Qwen 2.5 / Qwen 3 form). `arguments` may also be a JSON string holding the object
    (some models write it so); a call without it has no arguments. An unclosed tag, text that
    is not JSON or an object without a string "name" is a malformed call."""
    out: list[ParsedCall] = []
    pos = 0
    while (start := text.find(_CALL_OPEN, pos)) != -1:
        body_at = start + len(_CALL_OPEN)
        end = text.find(_CALL_CLOSE, body_at)
        if end == -1:
            out.append(ParsedCall(None, error=f"{_CALL_OPEN} is never closed by {_CALL_CLOSE}"))
            break
        out.append(_parse_call_body(text[body_at:end].strip()))
        pos = end + len(_CALL_CLOSE)
    return out


def _parse_call_body(body: str) -> ParsedCall:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        return ParsedCall(None, error=f"the call is not valid JSON ({e.msg} at character "
                                      f"{e.pos}): {body[:80]!r}")
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return ParsedCall(None, error=f'the call must be {{"name": ..., "arguments": {{...}}}}, '
                                      f"got {body[:80]!r}")
    args = obj.get("arguments", {})
    if isinstance(args, str):  # arguments written as a JSON string
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            return ParsedCall(obj["name"], error=f"arguments is a string that is not JSON: "
                                                 f"{args[:80]!r}")
    if not isinstance(args, dict):
        return ParsedCall(obj["name"], error=f"arguments must be an object, got "
                                             f"{json.dumps(args)[:80]}")
    return ParsedCall(obj["name"], args)


def format_tool_call(name: str, arguments: Mapping[str, Any]) -> str:
    """A call as `parse_hermes` reads it (for scripted policies and tests)."""
    return f"{_CALL_OPEN}\n{json.dumps({'name': name, 'arguments': dict(arguments)})}\n" \
           f"{_CALL_CLOSE}"


# ---------------------------------------------------------------------------------------------
# The unit a reward backend runs


@dataclass(frozen=True)
class ToolCall:
    """One tool call for a reward backend: where to find the tool in any process, the
    arguments (already checked against the schema) and the dataset row.

    `source` is "env:<spec>" for a tool of an environment class (`<spec>` as `env.name` gives
    it, file paths made absolute) or the spec of a `@tool` function (`env.tools`).
    `rewards.environments.run_tool_call` runs it; a backend returns an `Outcome` whose value
    is the tool's answer as text.
    """

    source: str
    name: str
    arguments: Mapping[str, Any]
    row: Mapping[str, Any]


def result_text(value: Any) -> str:
    """A tool's return value as the text the model sees: strings as they are, anything else
    as JSON (numbers, lists, dicts), or its str() when JSON cannot hold it."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)


def tool_names(tools: Sequence[Tool]) -> list[str]:
    return [t.name for t in tools]
