"""Compare the schedules on the CPU simulation: sync, async (k=1, 2) and colocated.

For each schedule runs the same job (default config unless overridden) for --steps steps after
--warmup steps, in this one process, and prints steps/s, completion tokens/s, and the busy /
idle / overlap fractions the timeline recorded for each mesh.

    python bench/schedule.py [--steps 40] [--warmup 5] [key=value ...]

On the CPU simulation both "meshes" are threads of one process on the same cores, so overlap
cannot buy much wall time here; the idle fractions show what a real topology would gain.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from controller.config import load_config

SCHEDULES = {
    "sync": ["schedule.kind=sync"],
    "async k=1": ["schedule.kind=async", "schedule.max_staleness=1"],
    "async k=2": ["schedule.kind=async", "schedule.max_staleness=2"],
    "colocated": ["schedule.kind=colocated"],
}


def measure(overrides: list[str], steps: int, warmup: int) -> dict[str, float]:
    from controller.api import Job

    cfg = load_config(overrides=[*overrides, f"run.steps={steps + warmup}",
                                 "run.progress=false", "eval.enabled=false"])
    with Job(cfg) as job:
        job.run(warmup)  # compilation and first steps
        t0 = time.perf_counter()
        history = job.run(steps + warmup)[warmup:]
        wall = time.perf_counter() - t0
        tl = job.timeline.summary(since_step=warmup + 1)
    tokens = sum(m["completion/tokens"] for m in history)
    return {
        "steps_per_s": steps / wall,
        "tokens_per_s": tokens / wall,
        "sampler_idle": tl["timeline/sampler_idle_frac"],
        "trainer_idle": tl["timeline/trainer_idle_frac"],
        "overlap": tl["timeline/overlap_frac"],
        "reward_last": history[-1]["reward/mean"],
        "max_staleness_seen": max(m["policy/staleness"] for m in history),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("overrides", nargs="*")
    ns = ap.parse_args()
    from controller.topology import configure_devices

    configure_devices(load_config(overrides=ns.overrides).topology)
    rows = {name: measure([*ns.overrides, *extra], ns.steps, ns.warmup)
            for name, extra in SCHEDULES.items()}
    base = rows["sync"]["steps_per_s"]
    print(f"\n{ns.steps} timed steps after {ns.warmup} warm-up steps, overrides {ns.overrides}")
    print(f"{'schedule':<11}{'steps/s':>9}{'vs sync':>9}{'tokens/s':>10}{'sampler idle':>14}"
          f"{'trainer idle':>14}{'overlap':>9}{'staleness':>11}")
    for name, r in rows.items():
        print(f"{name:<11}{r['steps_per_s']:>9.2f}{r['steps_per_s'] / base:>8.2f}x"
              f"{r['tokens_per_s']:>10.0f}{r['sampler_idle']:>14.0%}{r['trainer_idle']:>14.0%}"
              f"{r['overlap']:>9.0%}{r['max_staleness_seen']:>11.0f}")


if __name__ == "__main__":
    main()
