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

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import sys
import traceback
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


def _check_file(path: str, spec: str, field: str = "rewards.functions") -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        what = "is a directory" if p.is_dir() else "does not exist"
        raise RewardError(
            f"{field}: {spec!r}: the file {path!r} {what} (fix: check the path; a "
            f"relative path is read from the current directory, {Path.cwd()})")
    return p


def _unknown(spec: str) -> RewardError:
    close = difflib.get_close_matches(spec, registered_rewards(), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return RewardError(
        f"rewards.functions: unknown reward {spec!r} (fix: {hint}one of "
        f"{registered_rewards()}, 'package.module:function' or 'path/to/file.py:function')")


def check_spec(spec: str) -> None:
    """The checks of `get_reward` that import no user code: a name that is not registered, a
    reward file that does not exist, a module that cannot be found. Cheap, so the CLI runs
    them before JAX starts. Raises RewardError."""
    if spec in _names:
        return
    if _split_file_spec(spec) is None and ":" not in spec:
        raise _unknown(spec)
    check_attribute_spec(spec, "rewards.functions", "function")


def check_attribute_spec(spec: str, field: str, what: str = "function") -> None:
    """`check_spec` for any `package.module:name` or `path/to/file.py:name` spec (an
    environment class, a tool), naming `field` in its errors. Imports no user code."""
    split = _split_file_spec(spec)
    if split is not None:
        _check_file(split[0], spec, field)
        return
    module_name, _, attr = spec.partition(":")
    parts = module_name.split(".")
    if not attr.isidentifier() or not all(p.isidentifier() for p in parts):
        raise RewardError(
            f"{field}: {spec!r} is not 'package.module:{what}' (fix: e.g. "
            f"'my_module:{what}', or 'path/to/file.py:{what}' for a file)")
    # Only the top-level package is looked up: finding a submodule would run its parents.
    if importlib.util.find_spec(parts[0]) is None:
        raise RewardError(_import_message(spec, module_name, f"no module named {parts[0]!r}",
                                          field))


def _import_message(spec: str, module_name: str, why: str,
                    field: str = "rewards.functions") -> str:
    fix = "install it or add its directory to PYTHONPATH, or name the file instead: "
    file = Path(*module_name.split(".")).with_suffix(".py")
    fix += (f"'{file}:{spec.partition(':')[2]}'" if file.is_file()
            else "'path/to/file.py:function'")
    return f"{field}: {spec!r}: cannot import {module_name!r} ({why}) (fix: {fix})"


def _where_in(path: Path, e: BaseException) -> str:
    """` (line N)` of the deepest frame of `e`'s traceback in `path`, if there is one."""
    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__)
             if Path(f.filename) == path]
    return f" (line {lines[-1]})" if lines else ""


def _load_file(path: str, field: str = "rewards.functions") -> Any:
    p = _check_file(path, path, field)
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
            f"{field}: loading {path!r} failed{_where_in(p, e)}: "
            f"{type(e).__name__}: {e} (fix: repair the file; `python {path}` shows the "
            f"traceback)") from e
    return module


def get_reward(spec: str) -> RewardFn:
    """A registered name, `package.module:function`, or `path/to/file.py[:function]`."""
    if spec in _names:
        return _names[spec]
    if _split_file_spec(spec) is None and ":" not in spec:
        raise _unknown(spec)
    return load_attribute(spec, "rewards.functions", "function", inspect.isfunction)


def load_attribute(spec: str, field: str, what: str = "function",
                   kind: Callable[[Any], bool] = inspect.isfunction) -> Any:
    """The callable `package.module:name` or `path/to/file.py[:name]` names (a reward function,
    an environment class, a tool). Errors are RewardErrors naming `field`; `what` and `kind`
    describe what the fix should name (its candidates in the module are listed)."""
    split = _split_file_spec(normalize_spec(spec))
    if split is not None:
        path, attr = split
        module = _load_file(path, field)
        where = path
    else:
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise RewardError(_import_message(spec, module_name, str(e), field)) from e
        except Exception as e:  # the module's own code failed: the user's to repair
            raise RewardError(
                f"{field}: {spec!r}: importing {module_name!r} failed: "
                f"{type(e).__name__}: {e} (fix: repair the module; `python -c 'import "
                f"{module_name}'` shows the traceback)") from e
        where = module_name
    fn = getattr(module, attr, None)
    if not callable(fn):
        why = (f"{where!r} has no {what} {attr!r}" if fn is None else
               f"{attr!r} in {where!r} is a {type(fn).__name__}, not a {what}")
        candidates = sorted(k for k, v in vars(module).items()
                            if kind(v) and not k.startswith("_"))[:8]
        raise RewardError(f"{field}: {spec!r}: {why} (fix: name one of its "
                          f"{what}s: {candidates})")
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
        try:
            fn.warmup()
        except Exception as e:  # the user's set-up code: report it as theirs
            raise RewardError(f"rewards.functions: {spec!r}: its warmup() failed: "
                              f"{type(e).__name__}: {e} (fix: repair the reward's warmup)") from e
    return BoundReward(fn, dict(kwargs or {}), accepts_ids(fn))


def resolve_all(specs: Sequence[RewardSpec], warmup: bool = False) -> list[BoundReward]:
    """`bind_reward` for each spec, in order (a call's `fn_index` indexes this list)."""
    return [bind_reward(s.spec, s.kwargs, warmup=warmup) for s in specs]
