"""From a spec string to a reward function: a name, `module:function` or a file path.

A spec is one of
- a name: a built-in (the `BUILTINS` table below) or one added with `register_reward`;
- `package.module:function`, imported;
- `path/to/file.py` (its function `reward`) or `path/to/file.py:function`, loaded from the file.

The backends resolve specs again in every worker process, so this module sits below them and
imports only `rewards.base` and the modules that define the built-ins. A name added with
`register_reward` exists in the process that registered it, so use it with the in-process
backend; workers know the built-ins and anything importable or on disk.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rewards import builtin, synthetic
from rewards.base import BoundReward, RewardError, RewardFn, RewardSpec

BUILTINS: Mapping[str, RewardFn] = {
    "reverse_digits": builtin.reverse_digits,
    "gsm8k": builtin.gsm8k,
    "format": builtin.format_reward,
    "length_penalty": builtin.length_penalty,
    "code": builtin.code_reward,
    # The `synthetic` benchmark task's reward (a function of the completion's token ids).
    "synthetic_even": synthetic.synthetic_even,
}

# Every name a spec may use in this process: the built-ins and what `register_reward` added.
_names: dict[str, RewardFn] = dict(BUILTINS)


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """A decorator that makes `fn` available as the spec `name` in this process."""

    def deco(fn: RewardFn) -> RewardFn:
        if name in _names and _names[name] is not fn:
            raise RewardError(f"reward {name!r} is already registered")
        _names[name] = fn
        return fn

    return deco


def registered_rewards() -> list[str]:
    return sorted(_names)


def _split_file_spec(spec: str) -> tuple[str, str] | None:
    """`a/b.py` -> ("a/b.py", "reward"); `a/b.py:fn` -> ("a/b.py", "fn"); else None."""
    if spec.endswith(".py"):
        return spec, "reward"
    path, sep, attr = spec.rpartition(":")
    return (path, attr) if sep and path.endswith(".py") and attr else None


def normalize_spec(spec: str) -> str:
    """A spec that resolves the same in any process: file paths made absolute."""
    split = _split_file_spec(spec)
    if split is None:
        return spec
    return f"{Path(split[0]).expanduser().resolve()}:{split[1]}"


def _load_file(path: str) -> Any:
    p = Path(path)
    if not p.is_file():
        raise RewardError(f"rewards.functions: file {path!r} does not exist (fix: check the path)")
    # One module per file path, reused: loading twice would re-run the file's top level.
    name = "tandem_reward_" + hashlib.sha1(str(p).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, p)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as e:
        del sys.modules[name]
        raise RewardError(
            f"rewards.functions: loading {path!r} failed: {type(e).__name__}: {e}") from e
    return module


def get_reward(spec: str) -> RewardFn:
    """A registered name, `package.module:function`, or `path/to/file.py[:function]`."""
    if spec in _names:
        return _names[spec]
    split = _split_file_spec(normalize_spec(spec))
    if split is not None:
        path, attr = split
        module = _load_file(path)
        where = path
    elif ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise RewardError(f"rewards.functions: cannot import {module_name!r} ({e})") from e
        where = module_name
    else:
        raise RewardError(
            f"rewards.functions: unknown reward {spec!r} (fix: one of {registered_rewards()}, "
            f"'module:function' or 'path/to/file.py:function')"
        )
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardError(f"rewards.functions: {where!r} has no function {attr!r}")
    return fn


def reward_label(spec: str) -> str:
    """The short name a reward's metrics and kwargs go by: the registered or function name."""
    if spec in _names:
        return spec
    split = _split_file_spec(spec)
    if split is not None:
        return split[1]
    return spec.rpartition(":")[2] if ":" in spec else spec


def accepts_ids(fn: RewardFn) -> bool:
    """Whether `fn` takes `completion_ids=` (by name or through **kwargs)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "completion_ids" or p.kind is p.VAR_KEYWORD for p in params)


def bind_reward(spec: str, kwargs: Mapping[str, Any] | None = None, *,
                warmup: bool = False) -> BoundReward:
    """The function `spec` names, with its call options.

    With `warmup`, also runs the function's `fn.warmup()` if it has one: slow one-time set-up,
    such as imports, that must not count against a call's timeout. Backends warm up once per
    worker.
    """
    fn = get_reward(spec)
    if warmup and callable(getattr(fn, "warmup", None)):
        fn.warmup()
    return BoundReward(fn, dict(kwargs or {}), accepts_ids(fn))


def resolve_all(specs: Sequence[RewardSpec], warmup: bool = False) -> list[BoundReward]:
    """`bind_reward` for each spec, in order (a call's `fn_index` indexes this list)."""
    return [bind_reward(s.spec, s.kwargs, warmup=warmup) for s in specs]
