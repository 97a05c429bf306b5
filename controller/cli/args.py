"""Argument handling shared by the commands that take a job config."""

from __future__ import annotations

import sys
from pathlib import Path


def split_args(args: list[str]) -> tuple[str | None, list[str]]:
    """`[config.yaml] [key.sub=value ...]` -> (the config path or None, the overrides).

    The first argument without "=" that names a YAML file (or any existing file) is the config.
    """
    config = None
    overrides = []
    for a in args:
        if "=" not in a and config is None and (a.endswith((".yaml", ".yml")) or Path(a).exists()):
            config = a
        else:
            overrides.append(a)
    return config, overrides


def fail(msg: object, code: int = 2) -> int:
    """Prints `error: msg` to stderr and returns `code` (2: a usage or config error)."""
    print(f"error: {msg}", file=sys.stderr)
    return code
