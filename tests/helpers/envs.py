"""Environments and tools for the multi-turn tests, named by file path (`.../envs.py:Class`),
so reward worker processes load them as a user's file would be loaded."""

from __future__ import annotations

import os
import time

from rewards.environments import Environment
from rewards.tools import tool


@tool(parameters={"type": "object", "properties": {"a": {"type": "integer"},
                                                   "b": {"type": "integer"}},
                  "required": ["a", "b"], "additionalProperties": False})
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@tool(parameters={"type": "object", "properties": {}})
def boom() -> str:
    """Always raises."""
    raise RuntimeError("kaput")


@tool(parameters={"type": "object", "properties": {}})
def hang() -> str:
    """Never answers (in time)."""
    time.sleep(600)
    return "late"


@tool(parameters={"type": "object", "properties": {}})
def die() -> str:
    """Kills its own process."""
    os._exit(3)


def no_schema(x: str) -> str:
    return x


@tool(parameters={"type": "object", "properties": {"text": {"type": "string"}},
                  "required": ["text"]})
def shout(text: str) -> str:
    """Upper-cases a text."""
    return text.upper()


class Scripted(Environment):
    """A system and a user message; every model turn without a tool call is answered by the
    next scripted user message (per-turn reward 0.5) until the script runs out, then done
    (reward 1.0)."""

    tools = (add, boom, hang, die)

    def __init__(self, script: tuple[str, ...] = ("first reply", "second reply")):
        self.script = list(script)

    def reset(self, row):
        return [{"role": "system", "content": "You are a test."},
                {"role": "user", "content": row["prompt"]}]

    def step(self, assistant_text):
        if self.script:
            return [{"role": "user", "content": self.script.pop(0)}], False, {"reward": 0.5}
        return None, True, {"reward": 1.0}


class NoSchemaTools(Environment):
    tools = (no_schema,)


class Broken(Environment):
    """Its step raises: the row ends, counted."""

    def step(self, assistant_text):
        raise ValueError("environment bug")


class NotAnEnvironment:
    pass


class Chatty(Environment):
    """Answers every model turn with "go on": rows run to env.max_turns or out of tokens."""

    def step(self, assistant_text):
        return [{"role": "user", "content": "go on"}], False, {"reward": 0.1}


def length_reward(prompt, completion, row):
    """A reward for text tasks in tests: shorter last turns score higher."""
    return 1.0 / (1.0 + len(completion))
