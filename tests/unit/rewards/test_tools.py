"""Tools: Hermes call parsing, argument checks against JSON schemas, declarations."""

import json

import pytest

from rewards.base import RewardError
from rewards.tools import (
    ParsedCall,
    Tool,
    as_tool,
    check_arguments,
    format_tool_call,
    parse_hermes,
    result_text,
    tool,
)

SCHEMA = {"type": "object",
          "properties": {"a": {"type": "integer", "minimum": 0}, "op": {"enum": ["+", "-"]},
                         "s": {"type": "string", "pattern": "^[0-9]+$", "maxLength": 3},
                         "xs": {"type": "array", "items": {"type": "number"}}},
          "required": ["a"], "additionalProperties": False}


def test_parse_hermes_reads_every_call_in_order():
    text = ('I will add.<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n'
            '</tool_call> and <tool_call>{"name": "shout", "arguments": "{\\"text\\": \\"hi\\"}"}'
            '</tool_call><tool_call>{"name": "now"}</tool_call>')
    assert parse_hermes(text) == [ParsedCall("add", {"a": 1, "b": 2}),
                                  ParsedCall("shout", {"text": "hi"}),  # arguments as a string
                                  ParsedCall("now", {})]
    assert parse_hermes("no calls at all </tool_call>") == []
    assert parse_hermes(format_tool_call("add", {"a": 3})) == [ParsedCall("add", {"a": 3})]


@pytest.mark.parametrize("body, why", [
    ('{"name": "add", "arguments": {"a": 1}', "not valid JSON"),
    ('["add"]', "must be"),
    ('{"arguments": {}}', "must be"),
    ('{"name": "add", "arguments": [1, 2]}', "must be an object"),
    ('{"name": "add", "arguments": "not json"}', "string that is not JSON"),
])
def test_parse_hermes_reports_malformed_calls(body, why):
    (call,) = parse_hermes(f"<tool_call>{body}</tool_call>")
    assert call.error is not None and why in call.error


def test_an_unclosed_call_is_malformed_and_ends_parsing():
    calls = parse_hermes('<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"na')
    assert calls[0] == ParsedCall("a", {}) and "never closed" in calls[1].error
    assert len(calls) == 2


@pytest.mark.parametrize("args, problem", [
    ({"a": 1}, None),
    ({"a": 2.0, "xs": [1, 2.5]}, None),  # an integral float is an integer
    ({}, "lacks the required 'a'"),
    ({"a": "1"}, "not of type integer"),
    ({"a": True}, "not of type integer"),  # JSON true is not a number
    ({"a": -1}, "below 0"),
    ({"a": 1, "op": "*"}, "not one of"),
    ({"a": 1, "s": "12a"}, "does not match"),
    ({"a": 1, "s": "1234"}, "longer than 3"),
    ({"a": 1, "xs": [1, "x"]}, "arguments.xs[1]"),
    ({"a": 1, "b": 2}, "unknown 'b'"),
])
def test_check_arguments(args, problem):
    why = check_arguments(SCHEMA, args)
    if problem is None:
        assert why is None
    else:
        assert why is not None and problem in why, why


def test_tool_declares_a_schema_and_keeps_the_function():
    @tool(parameters={"type": "object", "properties": {"x": {"type": "string"}}})
    def echo(x: str, row=None) -> str:
        """Echo a text.

        More lines are not the description."""
        return x

    assert echo("hi") == "hi"  # still a plain function
    t = as_tool(echo, "env.tools")
    assert t.name == "echo" and t.description == "Echo a text." and t.takes_row
    assert t.schema() == {"type": "function", "function": {
        "name": "echo", "description": "Echo a text.",
        "parameters": {"type": "object", "properties": {"x": {"type": "string"}}}}}


def test_a_tool_without_a_schema_is_an_error_naming_where_it_came_from():
    def bare(x):
        return x

    with pytest.raises(RewardError, match=r"env.tools: 'bare' has no JSON schema"):
        as_tool(bare, "env.tools")
    with pytest.raises(RewardError, match="not a JSON schema of type 'object'"):
        tool(parameters={"type": "string"})
    with pytest.raises(RewardError, match="not a JSON schema"):
        as_tool(Tool("t", "", {"properties": {}}, bare), "x")


def test_result_text():
    assert result_text("5") == "5"
    assert result_text(5) == "5" and result_text({"a": [1]}) == json.dumps({"a": [1]})
    assert result_text(object()).startswith("<object")
