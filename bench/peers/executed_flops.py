"""The FLOPs a step's compiled XLA programs execute, for bench/grpo_step.py's utilisation lines.

    counter = ProgramCounter.install()   # before the project's modules create their jits
    ...                                  # build the job, run the warm-up steps
    counter.active = True                # the timed steps: every jitted call is counted
    ...
    counter.active = False
    report = counter.report(steps=8, decode_steps=63)

`install` replaces `jax.jit` with a wrapper whose functions count their calls while `active`,
keyed by program (the function and its arguments' shapes, dtypes, shardings and static
values), and keep the abstract arguments of each. `report` lowers and compiles each program
once more for those arguments and sums XLA's `cost_analysis()["flops"]` x the devices the
program runs on (XLA reports one device's share of a partitioned program) x its calls per step.

XLA's cost analysis counts a while loop's body once. The sampler's generate program decodes in
a while loop, so its count is prefill + one decode step; `report` adds `decode_steps - 1`
further decode steps, each costed as a separately compiled `decode_step` + `sample_tokens` on
the same shapes and shardings. Any other program with a while loop is named in the notes: its
count is a lower bound. Eager operations outside `jax.jit` (a few small ones per step) are not
counted.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import jax
import numpy as np

# The sampler's generate program, by its function's name.
GENERATE = "_generate_impl"


def _leaf_key(x: Any) -> Any:
    if isinstance(x, jax.Array | np.ndarray):
        return (np.shape(x), str(x.dtype), getattr(x, "sharding", None))
    try:
        hash(x)
    except TypeError:
        return repr(x)
    return x


def _abstract(x: Any) -> Any:
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, np.ndarray):
        return jax.ShapeDtypeStruct(x.shape, x.dtype)
    return x


class Counted:
    """A jitted function that reports its calls to a `ProgramCounter`; otherwise the same."""

    def __init__(self, counter: ProgramCounter, jitted: Any, fun: Any):
        self._counter = counter
        self._jitted = jitted
        self._name = getattr(fun, "__qualname__", None) or repr(fun)
        self._module = getattr(fun, "__module__", None) or ""
        functools.update_wrapper(self, fun, updated=())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._counter.active:
            try:
                self._counter.record(self, args, kwargs)
            except Exception as e:  # counting must never break the step it watches
                self._counter.failures.append(f"{self._name}: {type(e).__name__}: {e}")
        return self._jitted(*args, **kwargs)

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        return self if obj is None else functools.partial(self, obj)

    def __getattr__(self, name: str) -> Any:  # lower, trace, eval_shape, ...
        return getattr(self._jitted, name)


class ProgramCounter:
    """Counts every jitted program's calls while `active` (see the module docstring)."""

    def __init__(self) -> None:
        self.active = False
        # key -> [Counted, abstract args, abstract kwargs, calls]
        self.calls: dict[Any, list[Any]] = {}
        self.failures: list[str] = []  # calls that could not be recorded

    @classmethod
    def install(cls) -> ProgramCounter:
        counter = cls()
        jit = jax.jit

        def counted_jit(fun: Any = None, /, **options: Any) -> Any:
            fun = options.pop("fun", fun)
            if fun is None:  # used as @jax.jit(static_argnames=...)
                return lambda f: counted_jit(f, **options)
            return Counted(counter, jit(fun, **options), fun)

        jax.jit = counted_jit
        return counter

    def record(self, fn: Counted, args: tuple, kwargs: dict) -> None:
        leaves, tree = jax.tree.flatten((args, kwargs))
        if any(isinstance(x, jax.core.Tracer) for x in leaves):
            return  # called while another function is traced: part of that program
        try:
            key = (id(fn), tree, tuple(_leaf_key(x) for x in leaves))
            hash(key)
        except TypeError:
            key = (id(fn), str(tree), repr([_leaf_key(x) for x in leaves]))
        entry = self.calls.get(key)
        if entry is None:
            abs_args, abs_kwargs = jax.tree.map(_abstract, (args, kwargs))
            entry = self.calls[key] = [fn, abs_args, abs_kwargs, 0]
        entry[3] += 1

    def report(self, steps: int, decode_steps: int | None = None,
               sampler: Any = None) -> dict[str, Any]:
        """FLOPs per step over the `steps` counted steps, by phase ("sample": the sampler's
        programs, "update": the trainer's, reference forward included; "other": the rest).

        decode_steps: decode-loop iterations per generate call (T - 1 for T new tokens);
        sampler: the `JaxSampler` whose generate program those are (its model, mesh, config).
        """
        if self.failures:
            raise RuntimeError(f"{len(self.failures)} calls not counted, e.g. "
                               f"{self.failures[0]}")
        by_phase = {"sample": 0.0, "update": 0.0, "other": 0.0}
        programs, notes = [], []
        for fn, abs_args, abs_kwargs, calls in self.calls.values():
            compiled = fn._jitted.lower(*abs_args, **abs_kwargs).compile()
            cost = compiled.cost_analysis()
            if isinstance(cost, list):  # older JAX: one dict per program
                cost = cost[0] if cost else None
            if not cost or "flops" not in cost:
                raise RuntimeError(f"no cost analysis for {fn._name}")
            devices = len(compiled.runtime_executable().local_devices())
            flops = cost["flops"] * devices
            name = fn._name
            if name.endswith(GENERATE) and decode_steps and decode_steps > 1:
                body = decode_step_flops(sampler, abs_args)
                flops += (decode_steps - 1) * body
                notes.append(f"{name}: + {decode_steps - 1} decode steps of "
                             f"{body / 1e9:.3f} GFLOP (XLA counts the loop body once)")
            elif re.search(r"\bwhile\(", compiled.as_text() or ""):
                notes.append(f"{name}: has a while loop, counted once (a lower bound)")
            phase = ("sample" if fn._module.startswith("sampler.") else
                     "update" if fn._module.startswith("trainer.") else "other")
            by_phase[phase] += flops * calls / steps
            programs.append({"name": name, "phase": phase, "calls_per_step": calls / steps,
                             "gflop_per_call": flops / 1e9, "devices": devices})
        return {"flops_per_step": sum(by_phase.values()), "by_phase": by_phase,
                "programs": sorted(programs, key=lambda p: -p["gflop_per_call"]
                                   * p["calls_per_step"]),
                "notes": notes}


def decode_step_flops(sampler: Any, generate_args: tuple) -> float:
    """FLOPs of one iteration of the sampler's decode loop (all devices): `decode_step` and
    `sample_tokens` compiled alone for the shapes and shardings of a generate call's
    arguments (params, prompts [B, P], mask, rng, cache)."""
    from sampler.jax_sampler import decode_step
    from sampler.sampling import sample_tokens

    params, prompt, _, rng, cache = generate_args[:5]
    cfg, mesh = sampler.cfg, sampler.submesh
    b, p = prompt.shape
    s = p + cfg.max_new_tokens - 1

    def body(params, tok_B, pos_B, valid_BxS, col, cache, rng):
        logits_BxV, cache = decode_step(sampler.decode_mdef, params, tok_B, pos_B, valid_BxS, col,
                                        cache)
        return sample_tokens(logits_BxV, rng, cfg.temperature, cfg.top_k, cfg.top_p), cache

    def vec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=mesh.batch_sharding(b, len(shape)))

    col = jax.ShapeDtypeStruct((), np.int32, sharding=mesh.replicated())
    compiled = jax.jit(body, donate_argnums=(5,)).lower(
        params, vec((b,), np.int32), vec((b,), np.int32), vec((b, s), np.bool_), col, cache,
        rng).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0] if cost else None
    return cost["flops"] * len(compiled.runtime_executable().local_devices())
