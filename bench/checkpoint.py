"""Checkpoint cost: save time, and how much async saving slows the training step.

Runs the default job three ways in one process — no checkpoints, an async save every K steps,
a blocking save every K steps — and prints median step time, the time a save blocks the loop,
and the slowdown against the no-checkpoint run.

    python bench/checkpoint.py [--steps 60] [--every 5] [key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax

from controller.config import load_config


def run(overrides: list[str], steps: int, every: int, mode: str) -> dict[str, float]:
    from controller.api import Job

    with tempfile.TemporaryDirectory() as out:
        extra = [f"run.steps={steps}", "run.progress=false", "eval.enabled=false"]
        if mode != "none":
            extra += [f"run.output_dir={out}", f"checkpoint.every_steps={every}",
                      f"checkpoint.async_save={'true' if mode == 'async' else 'false'}"]
        job = Job(load_config(overrides=[*overrides, *extra]))
        step_times, save_times = [], []
        for _ in range(steps):
            t0 = time.perf_counter()
            job.step()  # saves inside when due
            step_times.append(time.perf_counter() - t0)
            if mode != "none" and job.steps_done % every == 0:
                save_times.append(step_times[-1])
        t0 = time.perf_counter()
        job.close()  # waits for background writes
        drain = time.perf_counter() - t0
        steady = step_times[2:]  # the first steps compile
        plain = [t for i, t in enumerate(step_times) if i >= 2 and (i + 1) % every]
        return {
            "median_step_s": statistics.median(steady),
            "mean_step_s": statistics.mean(steady),
            "save_step_s": statistics.median(save_times) if save_times else float("nan"),
            "plain_step_s": statistics.median(plain),
            "drain_s": drain,
            "bytes": sum(x.nbytes for x in jax.tree.leaves(job.trainer.state)),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("overrides", nargs="*")
    ns = ap.parse_args()
    from controller.topology import configure_devices

    configure_devices(load_config(overrides=ns.overrides).topology)
    rows = {m: run(ns.overrides, ns.steps, ns.every, m) for m in ("none", "async", "sync")}
    base = rows["none"]["mean_step_s"]
    print(f"\ncheckpoint every {ns.every} steps, {ns.steps} steps, state "
          f"{rows['async']['bytes'] / 1e6:.2f} MB")
    print(f"{'mode':<7}{'median s/step':>15}{'mean s/step':>13}{'step w/ save':>14}"
          f"{'close wait':>12}{'mean vs none':>14}")
    for mode, r in rows.items():
        print(f"{mode:<7}{r['median_step_s']:>15.4f}{r['mean_step_s']:>13.4f}"
              f"{r['save_step_s']:>14.4f}{r['drain_s']:>12.3f}"
              f"{r['mean_step_s'] / base:>13.3f}x")


if __name__ == "__main__":
    main()
