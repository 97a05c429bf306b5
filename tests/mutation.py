"""Mutation testing of the numerics and control-flow modules, on their fast tests (mutmut).

    python tests/mutation.py                                  # every module below
    python tests/mutation.py --module trainer.loss --module sampler.sampling
    python tests/mutation.py --report-only                    # the last run's report again

mutmut ([tool.mutmut] in pyproject.toml) copies the packages into mutants/, rewrites each
function of the listed modules into a trampoline over its mutants (one changed operator,
constant or argument each), and runs, for every mutant, the selected tests that call that
function, stopping at the first failure. A mutant no test fails on "survived": either the tests
miss a behaviour, or the change is invisible (an equivalent mutant). The report gives per
module the mutants, killed, survived and timed out, the kill rate (killed / mutants), and the
diff of every survivor. The working tree is never written to; docs/testing.md has the numbers.

What this script adds to a plain `mutmut run`:
- The JAX setup of tests/conftest.py (CPU, 8 simulated devices), in the environment before jax
  is imported here, and one persistent compilation cache (mutants/jax-cache) for every
  mutant's process. jax and the other libraries the tests use are imported (no backend
  started) before mutmut forks, so a mutant's process does not pay for the imports.
- This file, loaded into every mutmut pytest run as a plugin (PYTEST_PLUGINS):
  while mutmut records which tests call which function, JAX's trace caches are cleared before
  each test, or a test that hits a program traced by an earlier test would never call the
  function and would not be run against its mutants; and each mutant runs its tests
  cheapest first, so a kill is usually found before test_off_policy compiles its model.
- Only the chosen functions of controller/loop.py, a fresh mutants/ each run (mutmut would
  otherwise keep earlier verdicts and stale test timings), and the report.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "mutants"
JAX_CACHE = WORK / "jax-cache"
PLUGIN = "tandem_mutation_plugin"

# module -> (file, mutant-name globs). A mutant is named module.x_function__mutmut_N, or
# module.xǁClassǁmethod__mutmut_N for a method.
MODULES: dict[str, tuple[str, tuple[str, ...]]] = {
    "controller.advantages": ("controller/advantages.py", ("controller.advantages.*",)),
    "trainer.loss": ("trainer/loss.py", ("trainer.loss.*",)),
    "sampler.sampling": ("sampler/sampling.py", ("sampler.sampling.*",)),
    # The trainer half of a step; the sampler half needs a real sampler and reward pool.
    "controller.loop": ("controller/loop.py", tuple(
        f"controller.loop.{f}__mutmut_*" for f in (
            "xǁLoopǁconsume", "xǁLoopǁ_train_batch", "x_concat_samples",
            "x_merge_reward_metrics"))),
}
MAX_CHILDREN = 2  # the machine has 2 cores, shared with other work
# What the selected tests import from outside the repo (~2 s a process): imported once here,
# inherited by every mutant's process through the fork.
PRELOAD = ("jax", "jax.numpy", "numpy", "flax.nnx", "optax", "pydantic", "yaml", "rich",
           "pytest_timeout")


# -- pytest plugin: active in mutmut's pytest runs only (registered by main) -----------------

def _phase() -> str:
    from mutmut.mutation.trampoline import get_mutant_under_test

    return get_mutant_under_test()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if _phase() == "stats":
        import jax

        jax.clear_caches()  # retrace: the test calls (and is recorded for) every function


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if _phase() in ("", "stats", "fail"):
        return
    # A mutant's run stops at its first failing test: cheapest first, by the durations mutmut
    # measured (inherited through the fork), a file's tests kept together so that module
    # fixtures (test_off_policy's trainer) are set up once.
    from mutmut.state import state

    durations = state().duration_by_test
    per_file: Counter[str] = Counter()
    for it in items:
        per_file[_file(it)] += durations.get(it.nodeid, 0.0)
    items.sort(key=lambda it: (per_file[_file(it)], _file(it), durations.get(it.nodeid, 0.0)))


def _file(item: pytest.Item) -> str:
    return item.nodeid.partition("::")[0]


# -- the run -----------------------------------------------------------------------------------

def _jax_environment() -> None:
    """tests/conftest.py's JAX settings, set before jax is imported, and a shared cache."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()
    # conftest makes a temporary cache per session and removes it at exit, but mutmut's
    # processes end with os._exit: without this each mutant would leave one behind. Every
    # program is cached, down to single eager ops: the unmutated ones are the same in every
    # mutant's process (a mutant's tests take ~2.5x less CPU). A size limit turns on JAX's
    # file lock, so two mutant processes never read an entry while it is being written.
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(JAX_CACHE)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(2 << 30)


def _run_mutmut(globs: list[str], max_children: int) -> None:
    _jax_environment()
    for name in PRELOAD:  # no backend is started, so forking after this is safe
        importlib.import_module(name)

    sys.modules[PLUGIN] = sys.modules[__name__]
    plugins = [p for p in os.environ.get("PYTEST_PLUGINS", "").split(",") if p]
    os.environ["PYTEST_PLUGINS"] = ",".join([*plugins, PLUGIN])

    from mutmut.__main__ import cli

    try:
        cli.main(["run", "--max-children", str(max_children), *globs], standalone_mode=False)
    except SystemExit as e:
        if e.code not in (None, 0):
            raise


def report(modules: list[str]) -> str:
    """The per-module table and the survivors' diffs, from the meta files in mutants/."""
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.stats import status_by_exit_code

    rows = ["| module | mutants | killed | survived | timed out | other | kill rate |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    details = []
    for name in modules:
        path, globs = MODULES[name]
        data = SourceFileMutationData(path=path)
        data.load()
        keys = sorted((k for k in data.exit_code_by_key
                       if any(fnmatch.fnmatchcase(k, g) for g in globs)), key=_natural)
        status = {k: status_by_exit_code[data.exit_code_by_key[k]] for k in keys}
        n = Counter(status.values())
        other = len(keys) - n["killed"] - n["survived"] - n["timeout"]
        rate = f"{100 * n['killed'] / len(keys):.1f}%" if keys else "-"
        rows.append(f"| `{path}` | {len(keys)} | {n['killed']} | {n['survived']} | "
                    f"{n['timeout']} | {other} | {rate} |")
        for k in keys:
            if status[k] != "killed":
                details.append(f"# {k}: {status[k]}\n{get_diff_for_mutant(k, path=path)}\n")
    return "\n".join([*rows, "", *details])


def _natural(key: str) -> tuple[str, int]:
    stem, _, n = key.rpartition("__mutmut_")
    return stem, int(n) if n.isdigit() else 0


def _module_name(arg: str) -> str:
    name = arg.removesuffix(".py").replace("/", ".")
    if name not in MODULES:
        raise SystemExit(f"--module={arg}: not one of {', '.join(MODULES)} "
                         "(e.g. --module trainer.loss)")
    return name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--module", action="append", type=_module_name,
                    help=f"repeatable; default all: {', '.join(MODULES)}")
    ap.add_argument("--max-children", type=int, default=MAX_CHILDREN,
                    choices=range(1, MAX_CHILDREN + 1), help="mutants tested at once")
    ap.add_argument("--report-only", action="store_true",
                    help="print the last run's report from mutants/ without running")
    args = ap.parse_args()
    modules = args.module or list(MODULES)
    os.chdir(REPO)  # mutmut reads pyproject.toml and writes mutants/ relative to the cwd

    start = time.monotonic()
    if not args.report_only:
        shutil.rmtree(WORK, ignore_errors=True)  # fresh: mutmut would keep old verdicts
        _run_mutmut([g for m in modules for g in MODULES[m][1]], args.max_children)
    print(f"\n## Mutation report ({', '.join(modules)})\n")
    print(report(modules))
    if not args.report_only:
        print(f"wall time: {time.monotonic() - start:.0f} s with --max-children "
              f"{args.max_children}")


if __name__ == "__main__":
    main()
