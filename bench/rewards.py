"""Reward scoring throughput: a plain loop vs the backends, on 1,000 GSM8K completions.

    python bench/rewards.py [--n 1000] [--workers 1 2] [--ray] [--busy-ms 0]

Completions are built from the bundled GSM8K test split: reference solutions, tagged right
answers, wrong numbers and number-free text, in turn. Rows: the plain loop (the baseline: the
function called directly), `LocalBackend` (in process, with SIGALRM timeouts), `ProcessPool`
with 1..N workers, and optionally `RayBackend`. Overhead per call is measured with a reward that
returns at once: (backend time − plain-loop time) / calls. Each backend is warmed with one
batch first (worker start-up is reported separately). `--busy-ms` adds a CPU-bound reward that
spins that long per call, where parallel workers pay off.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from controller.data.datasets import gsm8k_path
from rewards.builtin import gsm8k
from rewards.pool import LocalBackend, ProcessPool
from rewards.registry import RewardSet, build_specs

HERE = Path(__file__).resolve()


def noop(prompt, completion, row):
    return 0.0


def busy(prompt, completion, row, *, ms: float = 1.0):
    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        pass
    return 1.0


def make_batch(n: int) -> tuple[list[str], list[str], list[dict]]:
    with open(gsm8k_path("test")) as f:
        rows = [json.loads(line) for line in f]
    prompts, completions, out_rows = [], [], []
    for i in range(n):
        r = dict(rows[i % len(rows)])
        r["target"] = r["answer"].rsplit("####", 1)[1].strip()
        kind = i % 4
        if kind == 0:
            c = r["answer"]
        elif kind == 1:
            c = f"<think>work</think><answer>{r['target']}</answer>"
        elif kind == 2:
            c = f"<answer>{int(r['target'].replace(',', '')) + 1}</answer>"
        else:
            c = "I am not sure about this one."
        prompts.append(r["question"])
        completions.append(c)
        out_rows.append(r)
    return prompts, completions, out_rows


def timed(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--ray", action="store_true", help="also time the Ray backend (local Ray)")
    ap.add_argument("--busy-ms", type=float, default=0.0)
    args = ap.parse_args()
    prompts, completions, rows = make_batch(args.n)
    cases = [("gsm8k", "gsm8k", {}), ("noop", f"{HERE}:noop", {})]
    if args.busy_ms > 0:
        cases.append((f"busy {args.busy_ms}ms", f"{HERE}:busy", {"busy": {"ms": args.busy_ms}}))

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"reward scoring, {args.n} GSM8K completions, {os.cpu_count()} CPUs, load average "
          f"{load} (best of 3 after a warm-up batch; a loaded machine makes these noisy)")
    header = (f"{'reward':<14}{'backend':<18}{'start s':>9}{'batch s':>10}{'calls/s':>11}"
              f"{'vs loop':>9}{'overhead/call':>15}")
    print(header)
    print("-" * len(header))
    for name, spec, kwargs in cases:
        specs = build_specs([spec], kwargs=kwargs)
        fn = {"gsm8k": gsm8k, "noop": noop}.get(name) or (
            lambda p, c, r: busy(p, c, r, ms=args.busy_ms))

        def plain(fn=fn):
            return [fn(p, c, r) for p, c, r in zip(prompts, completions, rows, strict=True)]

        plain()
        t_loop = timed(plain)
        print(f"{name:<14}{'plain loop':<18}{'':>9}{t_loop:>10.4f}{args.n / t_loop:>11,.0f}"
              f"{1.0:>9.2f}{'(baseline)':>15}")
        backends = [("local", lambda specs=specs: LocalBackend(specs, timeout_s=10))]
        for w in args.workers:
            backends.append((f"process x{w}", lambda specs=specs, w=w: ProcessPool(
                specs, num_workers=w, timeout_s=10)))
        if args.ray:
            from rewards.ray_backend import RayBackend

            backends.append(("ray x2", lambda specs=specs: RayBackend(
                specs, num_workers=2, timeout_s=10, num_cpus=0)))
        for label, make in backends:
            t0 = time.perf_counter()
            backend = make()
            rs = RewardSet([spec], kwargs=kwargs, backend=backend, max_failure_fraction=0.0)
            rs.score(prompts[:8], completions[:8], rows[:8])  # workers up and warm
            t_start = time.perf_counter() - t0
            rs.score(prompts, completions, rows)
            t = timed(lambda rs=rs: rs.score(prompts, completions, rows))
            rs.close()
            overhead_us = (t - t_loop) / args.n * 1e6
            print(f"{name:<14}{label:<18}{t_start:>9.2f}{t:>10.4f}{args.n / t:>11,.0f}"
                  f"{t_loop / t:>9.2f}{overhead_us:>12.1f} us")
    if args.ray:
        import ray

        ray.shutdown()


if __name__ == "__main__":
    main()
