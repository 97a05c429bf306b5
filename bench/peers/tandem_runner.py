"""Tandem's side of bench/grpo_step.py: the standard GRPO job through the public Job API.

    python bench/peers/tandem_runner.py SPEC.json PLACEMENT [key.sub=value ...]

Runs `warmup_steps + timed_steps` steps one after another and prints one JSON line: per-step
wall times and phases (from the job's own `time/*_s` metrics), the effective settings, the
first step's time (compilation included), and the FLOPs the step's compiled programs execute
(`executed_flops`, counted over the timed steps by bench/peers/executed_flops.py; null with
`executed_flops_error` when XLA gives no cost analysis). Run from the repository root with the
project's Python, so that this checkout's packages are the ones imported.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

T_START = time.perf_counter()

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from bench.peers.executed_flops import ProgramCounter  # noqa: E402
from bench.peers.overrides import model_overrides, update_overrides  # noqa: E402

# Before any of the project's modules create their jitted functions.
COUNTER = ProgramCounter.install()

from controller.config import ConfigError, load_config  # noqa: E402


def job_overrides(spec: dict) -> list[str]:
    """The standard job as Tandem config overrides (placement overrides come after these)."""
    return [
        "data.task=synthetic",
        "eval.enabled=false",  # the peers' steps do not evaluate either
        f"data.prompt_tokens={spec['prompt_tokens']}",
        f"data.prompts_per_step={spec['prompts_per_step']}",
        f"data.seed={spec['seed']}",
        "rewards.functions=[synthetic_even]",
        *model_overrides(spec["model"]),
        f"sampling.max_new_tokens={spec['new_tokens']}",
        f"sampling.temperature={spec['temperature']}",
        *update_overrides(spec),
        f"run.seed={spec['seed']}",
        "run.progress=false",
    ]


def prompts_digest(prompt_ids: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(prompt_ids).encode()).hexdigest()[:16]


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    placement, extra = sys.argv[2], sys.argv[3:]
    try:
        cfg = load_config(overrides=job_overrides(spec) + extra)
    except ConfigError as e:
        # A placement this build does not have (e.g. no colocated schedule yet) is reported,
        # not raised: the bench prints "n/a" for it.
        problems = [x.strip() for x in str(e).splitlines()[1:]] or [str(e)]
        print(json.dumps({"framework": "tandem", "placement": placement,
                          "unavailable": f"not in this build (overrides {extra} rejected: "
                                         + "; ".join(problems) + ")"}))
        return 0

    from controller.api import Job
    from controller.data.batch import encode_prompts

    job = Job(cfg)
    setup_s = time.perf_counter() - T_START  # imports, meshes, model init, first weight push
    steps = []
    with job:
        # The prompts this run draws (rows are a pure function of (seed, index)): the bench
        # checks they are the ones it gave the peers.
        n_rows = cfg.run.steps * cfg.data.prompts_per_step
        prompt_ids = [job.dataset.row(i)["prompt_ids"] for i in range(n_rows)]
        prompt_cols = encode_prompts([job.dataset.row(0)], job.tokenizer).tokens_PxL.shape[1]
        for i in range(cfg.run.steps):
            COUNTER.active = i >= spec["warmup_steps"]  # count the timed steps' programs
            t = time.perf_counter()
            m = job.step()
            wall = time.perf_counter() - t
            steps.append({
                "step_s": wall,
                "sample_s": m["time/sample_s"],
                "reward_s": m["time/reward_s"],
                "update_s": m["time/update_s"],  # includes the reference forward (same jit)
                "sync_s": m["time/reshard_s"],
                "reward_mean": m["reward/mean"],
                "loss": m["loss/total"],
                "kl": m.get("kl/mean", float("nan")),
                "completion_len_mean": m["completion/len_mean"],
                "stopped_frac": m["completion/stopped_frac"],
            })
        COUNTER.active = False
        executed, executed_error = None, None
        timed = cfg.run.steps - spec["warmup_steps"]
        if timed > 0:
            # Every completion is exactly max_new_tokens long (no stop token can be drawn),
            # so each generate call runs max_new_tokens - 1 decode steps.
            try:
                executed = COUNTER.report(timed, cfg.sampling.max_new_tokens - 1, job.sampler)
            except Exception as e:  # no cost analysis on this backend: the bench prints n/a
                executed_error = f"{type(e).__name__}: {e}"
            if executed is not None and any(s["stopped_frac"] for s in steps[-timed:]):
                executed["notes"].append("some completions stopped early: the decode steps "
                                         "counted are an upper bound")
        meshes = job.meshes.describe()
        num_params = job.num_params
    out = {
        "framework": "tandem",
        "placement": placement,
        "setup_s": setup_s,
        "steps": steps,
        "phases": {"sample": "sample_s", "reference": None, "update": "update_s",
                   "sync": "sync_s", "reward": "reward_s"},
        "phase_notes": {"reference": "computed inside the jitted update (not timed apart)"},
        "executed_flops": executed,
        "executed_flops_error": executed_error,
        "settings": {
            "params": num_params,
            "devices": meshes,
            "prompts_per_step": cfg.data.prompts_per_step,
            "num_generations": cfg.sampling.group_size,
            "rows_per_step": cfg.data.prompts_per_step * cfg.sampling.group_size,
            "prompt_tokens": int(prompt_cols),
            "prompts_sha256": prompts_digest(prompt_ids),
            "max_new_tokens": cfg.sampling.max_new_tokens,
            "stop_ids": list(job.tokenizer.stop_ids),
            "temperature": cfg.sampling.temperature,
            "beta": cfg.algorithm.beta,
            "epsilon": cfg.algorithm.epsilon,
            "loss_aggregation": cfg.algorithm.loss_aggregation,
            "learning_rate": cfg.optimizer.learning_rate,
            "adam_b1_b2": [cfg.optimizer.b1, cfg.optimizer.b2],
            "max_grad_norm": cfg.optimizer.max_grad_norm,
            "optimizer_steps_per_batch": 1,
            "dtype": cfg.model.dtype,
            "reward": cfg.rewards.functions,
            "extra_overrides": extra,
        },
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
