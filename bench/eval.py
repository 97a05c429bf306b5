"""What held-out evaluation costs: its throughput, and a run's wall time with it and without.

    python bench/eval.py                       # the default job, 2 rounds
    python bench/eval.py --rounds 3 --repeats 10 eval.samples_per_prompt=4 eval.k=4

1. Throughput: one job (the default config unless overridden) evaluates its held-out prompts
   `--repeats` times after one warm-up evaluation (its compilation), and the table gives
   prompts/s and completions/s with the median time of one evaluation.
2. Cost in a run: the whole run (run.steps, default 400) with evaluation every
   eval.every_steps (default 50, plus the baseline and the end) against the same run with
   eval.enabled=false, each in this process, alternated over `--rounds` rounds (A B B A ...).
   The ratio is the median wall time with / without; the target is <= 1.10.

The rows of the run's training metrics are the same with evaluation on and off (a test checks
this bit for bit); only the wall time differs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from controller.config import load_config


def throughput(overrides: list[str], repeats: int) -> dict[str, float]:
    from controller.api import Job

    cfg = load_config(overrides=[*overrides, "run.progress=false", "eval.enabled=true"])
    with Job(cfg) as job:
        job.evaluate()  # compiles the evaluation's sampler program
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            m = job.evaluate()
            times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    return {"prompts": m["eval/prompts"], "samples": m["eval/samples"], "seconds": t,
            "prompts_per_s": m["eval/prompts"] / t, "samples_per_s": m["eval/samples"] / t}


def run_wall(overrides: list[str], eval_on: bool) -> float:
    from controller.api import Job

    cfg = load_config(overrides=[*overrides, "run.progress=false",
                                 f"eval.enabled={'true' if eval_on else 'false'}"])
    t0 = time.perf_counter()
    with Job(cfg) as job:
        job.run()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("overrides", nargs="*", help="config overrides (key=value)")
    ns = ap.parse_args()
    from controller.topology import configure_devices

    configure_devices(load_config(overrides=ns.overrides).topology)
    cfg = load_config(overrides=ns.overrides)
    print(f"machine: {os.cpu_count()} CPUs | job: {cfg.run.steps} steps, eval every "
          f"{cfg.eval.every_steps} steps on {cfg.eval.num_prompts} prompts x "
          f"{cfg.eval.samples_per_prompt} (temperature {cfg.eval.temperature})")

    t = throughput(ns.overrides, ns.repeats)
    print("\n| evaluation | prompts | completions | median s | prompts/s | completions/s |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| held-out, {cfg.eval.split} split | {t['prompts']:.0f} | {t['samples']:.0f} | "
          f"{t['seconds']:.3f} | {t['prompts_per_s']:.0f} | {t['samples_per_s']:.0f} |")

    walls: dict[bool, list[float]] = {True: [], False: []}
    order = []
    for r in range(ns.rounds):
        order += [True, False] if r % 2 == 0 else [False, True]
    for on in order:
        walls[on].append(run_wall(ns.overrides, on))
    on, off = statistics.median(walls[True]), statistics.median(walls[False])
    print("\n| run | wall s (median) | per round |")
    print("|---|---:|---|")
    for label, key in (("eval on", True), ("eval off", False)):
        print(f"| {label} | {statistics.median(walls[key]):.2f} | "
              f"{', '.join(f'{w:.2f}' for w in walls[key])} |")
    ratio = on / off
    print(f"\nwall time with evaluation / without: {ratio:.3f} (target <= 1.10) -> "
          f"{'PASS' if ratio <= 1.10 else 'FAIL'}")


if __name__ == "__main__":
    main()
