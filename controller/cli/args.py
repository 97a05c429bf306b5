"""Argument handling shared by the commands that take a job config."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


def split_args(args: list[str]) -> tuple[str | None, list[str]]:
    """`[config.yaml] [key.sub=value ...]` -> (the config path or None, the overrides).

    The first argument without "=" that names a YAML file (or any existing file) is the config.
    """
    config = None
    overrides = []
    for a in args:
        if "=" not in a and config is None and (a.endswith((".yaml", ".yml"))
                                                or Path(a).expanduser().exists()):
            config = a
        else:
            overrides.append(a)
    return config, overrides


def fail(msg: object, code: int = 2) -> int:
    """Prints `error: msg` to stderr and returns `code` (2: a usage or config error)."""
    print(f"error: {msg}", file=sys.stderr)
    return code


def input_errors() -> tuple[type[Exception], ...]:
    """The exception types that mean a bad input: a config, data file, reward, model directory
    or checkpoint the user gave. Each message names the field or file, the value and a fix.

    Imported here, when asked for: some of these modules import JAX, and the CLI must not
    import it before the config is checked. Ask only once JAX is loaded, or an error is in hand.
    """
    from controller.config import ConfigError
    from controller.data.datasets import DataError
    from controller.data.hf_tokenizer import TokenizerFilesError
    from rewards.base import RewardError
    from trainer.hf import HFCheckpointError

    return ConfigError, DataError, TokenizerFilesError, RewardError, HFCheckpointError


def is_input_error(e: BaseException) -> bool:
    return isinstance(e, input_errors())


def describe(e: Any) -> str:
    """An error for the `error:` line: the message of a Tandem error (it names field, value
    and fix), else the type and the message's first line."""
    text = str(e).strip()
    if is_input_error(e):
        return text
    first = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__
