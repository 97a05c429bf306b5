"""Held-out evaluation in a job: it never changes training, runs when it should (also across a
resume), survives a failing reward, and `tandem eval` reproduces it from an exported Hugging
Face directory and from a checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from controller.api import Job
from controller.config import load_config
from controller.topology import simulation_env

ROOT = Path(__file__).parents[2]
SMALL = ["data.prompts_per_step=4", "sampling.group_size=4", "run.progress=false",
         "status.enabled=false"]
# Sampled (not greedy) evaluation with n > k, so the eval stream's randomness is exercised.
EVAL = ["eval.every_steps=2", "eval.num_prompts=6", "eval.samples_per_prompt=3", "eval.k=2",
        "eval.temperature=1.0"]
USER = ROOT / "tests" / "helpers" / "user_rewards.py"


def _training(rows):
    """Each step's metrics without timings and evaluation: what training computed."""
    return [{k: v for k, v in m.items() if not k.startswith(("time/", "throughput/", "eval/",
                                                             "timeline/", "reshard/gbps",
                                                             "rewards/call_s"))}
            for m in rows]


# async with max_staleness >= 1 trains on whichever batches thread timing makes stale, with or
# without evaluation, so its trajectory is not reproducible run to run; k=0 is (it equals sync
# bit for bit) and still runs the sampler thread beside the evaluation.
@pytest.mark.parametrize("schedule", [["schedule.kind=sync"],
                                      ["schedule.kind=async", "schedule.max_staleness=0"],
                                      ["schedule.kind=colocated"]], ids=str)
def test_eval_on_or_off_leaves_the_training_trajectory_bit_identical(schedule):
    def run(*extra):
        cfg = load_config(overrides=[*SMALL, "run.steps=4", *schedule, *EVAL, *extra])
        with Job(cfg) as job:
            job.run()
            return job.metrics, jax.device_get(job.trainer.params), job.evals

    on, params_on, evals = run()
    off, params_off, none = run("eval.enabled=false")
    assert [s for s, _ in evals] == [0, 2, 4] and none == []
    assert _training(on) == _training(off)
    jax.tree.map(np.testing.assert_array_equal, params_on, params_off)
    assert all("eval/pass@2" in m for s, m in evals)
    assert "eval/pass@2" in on[1] and "eval/pass@2" not in on[0]  # step 2's row, not step 1's


def test_evaluations_run_at_0_every_k_and_the_end_and_a_resume_neither_repeats_nor_skips(
        tmp_path):
    common = [*SMALL, "run.steps=5", "checkpoint.every_steps=2", "run.log_samples=2", *EVAL]
    with Job(load_config(overrides=[*common, f"run.output_dir={tmp_path / 'whole'}"])) as job:
        job.run()
        want = job.evals
    assert [s for s, _ in want] == [0, 2, 4, 5]

    out = tmp_path / "resumed"
    with Job(load_config(overrides=[*common, f"run.output_dir={out}"])) as job:
        job.run(steps=3)  # stopped after step 3; the last checkpoint is step 2's
    with Job(load_config(overrides=[*common, f"run.output_dir={out}", "run.resume=true"])
             ) as job:
        assert job.resumed_from == 3
        job.run()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], {k: v for k, v in r.items() if k.startswith("eval/")})
             for r in rows if "eval/accuracy" in r]
    assert [s for s, _ in evals] == [0, 2, 4, 5]  # each once: none repeated, none skipped
    for (s, got), (_, m) in zip(evals, want, strict=True):
        assert {k: v for k, v in got.items() if k != "eval/time_s"} == {
            k: v for k, v in m.items() if k != "eval/time_s"}, s
    lines = [json.loads(x) for x in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [s for s in (0, 2, 4, 5) for _ in range(6)]
    assert len(lines[0]["completions"]) == 3
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in samples] == [s for s in range(1, 6) for _ in range(2)]
    for r in samples:
        assert set(r) == {"step", "prompt", "completion", "reward", "rewards", "advantage",
                          "length", "truncated", "policy_version"}
        assert r["reward"] == pytest.approx(r["rewards"]["reverse_digits"])
        assert r["prompt"].endswith("=") and 0 <= r["length"] <= 6


def test_a_failing_reward_is_counted_in_the_evaluation_not_raised():
    cfg = load_config(overrides=[*SMALL, "run.steps=1", "eval.num_prompts=8",
                                 f"rewards.functions=[{USER}:fails_on_held_out]"])
    with Job(cfg) as job:
        m = job.run()[-1]
        assert m["rewards/failures"] == 0  # training never draws a held-out number
        _, ev = job.evals[-1]
    assert ev["eval/rewards/failures"] == 8 and ev["eval/rewards/failure_frac"] == 1.0
    assert ev["eval/reward/mean"] == 0.0  # rewards.fallback_score


def _tandem(*args: str, cwd: Path) -> str:
    env = {**os.environ, **simulation_env(8)}
    out = subprocess.run([sys.executable, "-m", "controller.cli", *args], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


def _records(path: Path, step: int) -> list[dict]:
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "step"} for r in rows if r["step"] == step]


def test_tandem_eval_on_the_export_and_the_checkpoint_equals_the_in_job_evaluation(tmp_path):
    from helpers.hf_fixtures import write_tiny_hf_model

    model = write_tiny_hf_model("qwen2", tmp_path / "qwen2")
    for name, numbers in (("train.jsonl", range(0, 40)), ("test.jsonl", range(40, 50))):
        (tmp_path / name).write_text("".join(
            json.dumps({"prompt": f"{a}+{a}=", "target": str(2 * a)}) + "\n" for a in numbers))
    task = ["data.task=jsonl", f"data.path={tmp_path / 'train.jsonl'}",
            f"eval.path={tmp_path / 'test.jsonl'}", "rewards.functions=[gsm8k]",
            "sampling.max_new_tokens=8", *EVAL]
    run = tmp_path / "run"
    _tandem("run", *SMALL, *task, f"model.path={model}", "run.steps=2",
            f"run.output_dir={run}", f"run.export_hf_dir={tmp_path / 'hf'}", cwd=tmp_path)
    want = _records(run / "eval_samples.jsonl", 2)
    assert len(want) == 6 and all(len(r["completions"]) == 3 for r in want)

    _tandem("eval", *task, f"model.path={tmp_path / 'hf'}", "--out", "from_hf.jsonl",
            cwd=tmp_path)
    assert _records(tmp_path / "from_hf.jsonl", 0) == want
    printed = _tandem("eval", "--checkpoint", str(run), "--out", "from_ckpt.jsonl",
                      cwd=tmp_path)
    assert _records(tmp_path / "from_ckpt.jsonl", 2) == want
    assert "the checkpoint of step 2" in printed and "pass@2" in printed
