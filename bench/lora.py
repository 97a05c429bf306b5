"""Full fine-tuning against LoRA: update time, step time, bytes synced, sync time, peak memory.

    python bench/lora.py                        # both models, full / rank 8 / rank 64, 2 rounds
    python bench/lora.py --models standard --rounds 3 --steps 20
    python bench/lora.py --sampler-modes        # also LoRA's merged vs unmerged sampler

Models: "standard", the default job's model (2 layers, d=64, 124k params), and "larger", 8
layers, d=512, 8 heads (2 KV), SwiGLU 1,536 (~21M params); both on the default
`reverse_digits` job (16 prompts x G=8, the 8-device CPU simulation, evaluation off). Each
configuration runs in its own process (peak RSS from `os.wait4`), `--warmup` steps then
`--steps` timed steps; configurations are interleaved over `--rounds` rounds (each round starts
one place further down the list) and the table shows medians over rounds of each run's median
step. Columns: time/update_s, time/step_s, reshard/bytes and time/reshard_s from the job's own
metrics, and the child's peak RSS. Ratios are against full fine-tuning of the same model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODELS = {
    "standard": [],
    "larger": ["model.num_layers=8", "model.hidden_size=512", "model.num_heads=8",
               "model.num_kv_heads=2", "model.mlp_dim=1536"],
}
VARIANTS = {
    "full": [],
    "lora r8": ["model.lora={rank: 8}"],
    "lora r64": ["model.lora={rank: 64}"],
}
SAMPLER_MODES = {
    "lora r8 unmerged": ["model.lora={rank: 8, sampler: unmerged}"],
    "lora r64 unmerged": ["model.lora={rank: 64, sampler: unmerged}"],
}
KEYS = ("time/update_s", "time/step_s", "reshard/bytes", "time/reshard_s", "time/sample_s")


def child(overrides: list[str], warmup: int, steps: int) -> None:
    """One configuration in this process: prints a JSON line of per-step medians."""
    import jax

    from controller.api import Job
    from controller.config import load_config

    cfg = load_config(overrides=[*overrides, f"run.steps={warmup + steps}", "run.progress=false",
                                 "eval.enabled=false", "status.enabled=false"])
    with Job(cfg) as job:
        history = job.run()[warmup:]
        trained = sum(x.size for x in jax.tree.leaves(job.trainer.params))
    out = {k: statistics.median(m[k] for m in history) for k in KEYS}
    out["trained_params"] = trained
    out["num_params"] = job.num_params
    print(json.dumps(out), flush=True)


def run_child(overrides: list[str], warmup: int, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--warmup", str(warmup), "--steps", str(steps),
           "--", *overrides]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, env=os.environ.copy())
    _, status, usage = os.wait4(proc.pid, 0)
    out, err = proc.stdout.read(), proc.stderr.read()
    if status != 0:
        raise RuntimeError(f"{overrides} failed:\n{err[-3000:]}")
    res = json.loads(out.strip().splitlines()[-1])
    res["peak_rss_gb"] = usage.ru_maxrss * 1024 / 1e9  # Linux: KiB
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--sampler-modes", action="store_true",
                    help="also run LoRA with the unmerged sampler")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="extra config overrides for every run")
    ns = ap.parse_args(argv)
    if ns.child:
        child(ns.overrides, ns.warmup, ns.steps)
        return 0
    from bench.grpo_step import machine

    variants = {**VARIANTS, **(SAMPLER_MODES if ns.sampler_modes else {})}
    runs = [(m, v) for m in ns.models for v in variants]
    results: dict[tuple[str, str], list[dict]] = {r: [] for r in runs}
    for r in range(ns.rounds):
        for i in range(len(runs)):
            model, variant = runs[(i + r) % len(runs)]
            print(f"[bench] round {r + 1}/{ns.rounds}: {model} {variant}", flush=True)
            res = run_child([*MODELS[model], *variants[variant], *ns.overrides], ns.warmup,
                            ns.steps)
            results[(model, variant)].append(res)

    def med(model: str, variant: str, key: str) -> float:
        return statistics.median(x[key] for x in results[(model, variant)])

    print(f"\nmachine: {machine()}")
    print(f"{ns.warmup} warm-up + {ns.steps} timed steps per run, {ns.rounds} round(s), "
          f"medians; overrides {ns.overrides or 'none'}")
    head = ("model", "variant", "trained params", "update ms", "vs full", "step ms", "vs full",
            "synced MB/step", "sync ms", "sample ms", "peak RSS GB")
    rows = []
    for model, variant in runs:
        full_u, full_s = med(model, "full", "time/update_s"), med(model, "full", "time/step_s")
        u, s = med(model, variant, "time/update_s"), med(model, variant, "time/step_s")
        rows.append((model, variant, f"{int(med(model, variant, 'trained_params')):,}",
                     f"{u * 1e3:.1f}", f"{u / full_u:.2f}x", f"{s * 1e3:.1f}", f"{s / full_s:.2f}x",
                     f"{med(model, variant, 'reshard/bytes') / 1e6:.3f}",
                     f"{med(model, variant, 'time/reshard_s') * 1e3:.2f}",
                     f"{med(model, variant, 'time/sample_s') * 1e3:.1f}",
                     f"{med(model, variant, 'peak_rss_gb'):.2f}"))
    widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(len(head))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
