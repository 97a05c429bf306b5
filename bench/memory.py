"""Peak memory and step time of the GRPO update at a real vocabulary, Tandem against TRL.

    python bench/memory.py                          # T = 256, 1,024, 4,096, then the 16 GiB fits
    python bench/memory.py --skip-fit --lengths 64 256
    python bench/memory.py --only trl --lengths 1024 --skip-fit
    python bench/memory.py trainer.logits_chunk=2048 trainer.remat=block   # Tandem overrides
    python bench/memory.py --json out.json          # also write every run's raw results

The shape: the standard job's model (bench/grpo_step.py's STANDARD_MODEL: d=256, 4 layers,
4 query / 2 KV heads, SwiGLU 688, tied embeddings, q/k/v biases, fp32) at Qwen2.5's vocabulary
V = 151,936 (41,799,936 parameters), B = 4 rows (1 prompt x G = 4 completions, `--rows`,
`--group`), a prompt of 32 random token ids and completions of exactly T random ids (seeded,
the same ids for both frameworks), advantages +1, -1, +1, -1, β = 0.04 with a reference model,
ε = 0.2, one AdamW step per batch (lr 1e-5, grad-norm clip 1.0). B = 4 keeps TRL's peak at
T = 1,024 near 6 GiB (5.6 GiB measured), well below the ~18 GiB a 24 GiB machine can give one
process. Nothing is
generated: a step is the update alone, the reference log-probs, the policy's forward and
backward, and the optimizer step.

Each (framework, T) runs in its own child process, one at a time, TRL and Tandem alternating
which goes first: Tandem through `Trainer.update` with this interpreter on one CPU device
(`bench/peers/tandem_memory_runner.py`), TRL through `GRPOTrainer`'s own reference pass,
`compute_loss`, backward and optimizer step with the Python of the TRL environment that
bench/grpo_step.py creates (`bench/peers/trl_memory_runner.py`; TRL's defaults, so gradient
checkpointing on, unless `--trl-checkpointing`). Each does 1 warm-up step and `--timed-steps`
timed ones. The peak is `ru_maxrss` of that child (`os.wait4`); a watchdog reads the child's
VmRSS every 50 ms and stops it above `--kill-gib`, and the cell reads "> limit (stopped)".

Then the largest completion length each framework fits in 16 GiB (`--fit-gib`, or `--kill-gib`
when that is lower): from the measured lengths, double until a run does not fit, then bisect
to 12.5%, each probe a child of 1 warm-up + 1 timed step with the watchdog at the limit (a run
stopped there does not fit). The search stops at `--fit-max` tokens and after `--fit-budget-s`
seconds per framework and then reports ">= X". Whether the search runs or not, a line under
the table extrapolates each framework's peak linearly from its two longest measured lengths to
the same limit: an estimate, labelled as one.

On an accelerator (`--platform default`, JAX's default backend) Tandem's runner also reports
the device's peak memory in use, and that is the peak its fit is judged by; TRL stays on CPU
(its environment has the CPU build of torch).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.grpo_step import (  # noqa: E402
    STANDARD_JOB,
    STANDARD_MODEL,
    base_env,
    fmt,
    machine,
    peer_envs,
)

GIB = 1 << 30
QWEN25_VOCAB = 151_936
MODEL = {**STANDARD_MODEL, "vocab_size": QWEN25_VOCAB}
MODEL_PARAMS = 41_799_936  # 38,895,616 in the tied embedding; both runners report theirs

# The standard job's update settings (β, ε, AdamW, clip, seed) on 4 rows of one prompt.
JOB = {
    **{k: STANDARD_JOB[k] for k in ("beta", "epsilon", "lr", "adam_b1", "adam_b2",
                                     "weight_decay", "max_grad_norm", "seed", "prompt_tokens")},
    "model": MODEL,
    "rows": 4,  # B
    "group_size": 4,  # G
    "warmup_steps": 1,
    "timed_steps": 3,
}
LENGTHS = [256, 1024, 4096]

# The goals, at T = 1,024 and in 16 GiB.
GOAL_T = 1024
GOAL_PEAK_RATIO = 1 / 3  # Tandem's peak / TRL's, at most
GOAL_TIME_RATIO = 1.0  # Tandem's step / TRL's, at most
GOAL_FIT_RATIO = 4.0  # Tandem's largest length in 16 GiB / TRL's, at least
FIT_RESOLUTION = 1.125  # bisect until the bracket [fits, does not fit] is this narrow
LABELS = {"tandem": "Tandem", "trl": "TRL"}


def job_spec(job: dict, t: int) -> dict:
    """The runners' input for completion length T: the job plus its token ids and advantages.

    Ids are drawn from [0, V - 1) with the job's seed (V - 1 is TRL's <eos>/<pad>): one prompt
    per group, repeated for its G rows; every row's completion its own T ids."""
    rng = np.random.default_rng(job["seed"])
    v, b, g = job["model"]["vocab_size"], job["rows"], job["group_size"]
    prompts = rng.integers(0, v - 1, (b // g, job["prompt_tokens"]))
    completions = rng.integers(0, v - 1, (b, t))
    return {**job, "completion_tokens": t,
            "prompt_ids": np.repeat(prompts, g, axis=0).tolist(),
            "completion_ids": completions.tolist(),
            "advantages": [1.0 if i % 2 == 0 else -1.0 for i in range(b)]}


# ---------------------------------------------------------------------------------------------
# One child, watched


def vm_rss_gib(pid: int) -> float | None:
    """VmRSS of a live process in GiB; None once it has exited (a zombie has no VmRSS)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / GIB
    return None


def run_watched(cmd: list[str], env: dict[str, str], timeout_s: float, limit_gib: float
                ) -> dict:
    """Runs one runner; returns its JSON line plus `peak_rss_gib` (`ru_maxrss` of the child,
    from `os.wait4`) and `status`: "ok", "stopped" (its VmRSS passed `limit_gib` and the
    watchdog killed it), "timeout", "error" (exit code or no JSON line; `stderr_tail` says why),
    "refused" (Tandem's trainer judged the shape too large for the device before running it)
    or "unavailable" (the runner says this build cannot run the cell)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=REPO)
        lock, reaped, stop = threading.Lock(), [False], threading.Event()
        over: list[float] = []

        def watch() -> None:
            while not stop.is_set():
                rss = vm_rss_gib(proc.pid)
                if rss is not None and rss > limit_gib:
                    with lock:  # never signal a pid that wait4 has already reaped
                        if not reaped[0]:
                            over.append(rss)
                            proc.kill()
                    return
                stop.wait(0.05)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        deadline, timed_out = time.monotonic() + timeout_s, False
        while True:
            with lock:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                reaped[0] = bool(pid)
            if pid:
                break
            if time.monotonic() > deadline and not timed_out:
                timed_out = True
                proc.kill()
            time.sleep(0.1)
        stop.set()
        watcher.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    peak = usage.ru_maxrss * 1024 / GIB  # Linux reports KiB
    lines = [x for x in stdout.splitlines() if x.startswith("{")]
    res = json.loads(lines[-1]) if lines else {}
    tail = "\n".join(stderr.splitlines()[-20:])
    if over:
        return {**res, "status": "stopped", "peak_rss_gib": max(peak, over[0]),
                "limit_gib": limit_gib}
    if timed_out:
        return {**res, "status": "timeout", "peak_rss_gib": peak, "stderr_tail": tail}
    if proc.returncode != 0 or not lines:
        return {**res, "status": "error", "peak_rss_gib": peak, "stderr_tail": tail,
                "error": f"exit code {proc.returncode}"}
    if res.get("unavailable"):
        return {**res, "status": "unavailable", "peak_rss_gib": peak}
    if res.get("refused"):
        return {**res, "status": "refused", "peak_rss_gib": peak}
    timed = [s["step_s"] for s in res["steps"] if not s["warmup"]]
    return {**res, "status": "ok", "peak_rss_gib": peak,
            "median_step_s": statistics.median(timed) if timed else None}


class Runners:
    """How to start each framework's runner for a spec, and with which memory limit."""

    def __init__(self, ns: argparse.Namespace, job: dict, work: Path):
        self.ns, self.job, self.work = ns, job, work
        self.trl_python: Path | None = None
        if ns.only in (None, "trl"):
            self.trl_python = peer_envs(ns.cache_dir)["trl"].ensure()

    def command(self, framework: str, spec_path: Path, scratch: Path
                ) -> tuple[list[str], dict[str, str]]:
        env = base_env()
        peers = REPO / "bench" / "peers"
        if framework == "tandem":
            if self.ns.platform == "cpu":
                env["JAX_PLATFORMS"] = "cpu"  # one CPU device: no simulated device count
            else:
                env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # RSS and device peak as used
            return ([sys.executable, str(peers / "tandem_memory_runner.py"), str(spec_path),
                     *self.ns.overrides], env)
        assert self.trl_python is not None
        return ([str(self.trl_python), str(peers / "trl_memory_runner.py"), str(spec_path),
                 "--checkpointing", self.ns.trl_checkpointing, "--scratch", str(scratch)], env)

    def run(self, framework: str, spec: dict, limit_gib: float) -> dict:
        path = self.work / f"{framework}-{spec['completion_tokens']}.json"
        path.write_text(json.dumps(spec))
        # The runner's files (TRL saves the model there); removed here, even after a kill.
        scratch = self.work / f"scratch-{framework}-{spec['completion_tokens']}"
        cmd, env = self.command(framework, path, scratch)
        t0 = time.perf_counter()
        res = run_watched(cmd, env, self.ns.timeout, limit_gib)
        path.unlink()
        shutil.rmtree(scratch, ignore_errors=True)
        return {**res, "framework": framework, "T": spec["completion_tokens"],
                "wall_s": time.perf_counter() - t0}


def peak_of(res: dict) -> float:
    """The peak a cell is judged by: the device's when the runner reports one, else RSS."""
    return res.get("device_peak_gib") or res["peak_rss_gib"]


def describe(res: dict) -> str:
    if res["status"] == "ok":
        return (f"{fmt(res['median_step_s'])} s/step, peak {peak_of(res):.2f} GiB "
                f"({res['wall_s']:.0f} s)")
    if res["status"] == "stopped":
        return f"> {res['limit_gib']:g} GiB (stopped)"
    return f"{res['status']}: {why(res)}"


def why(res: dict) -> str:
    return res.get("unavailable") or res.get("refused") or res.get("error") or res["status"]


# ---------------------------------------------------------------------------------------------
# The largest length that fits


def fits(res: dict, limit_gib: float) -> bool | None:
    """Whether a run shows the length fits in `limit_gib`; None when it shows neither (a
    timeout, or a run stopped at a limit above this one)."""
    if res["status"] == "ok":
        return peak_of(res) <= limit_gib
    if res["status"] == "stopped" and res["limit_gib"] <= limit_gib:
        return False
    if res["status"] in ("error", "refused"):
        return False  # e.g. an allocation failure; the probe list keeps the reason
    return None


def round_length(t: float) -> int:
    """A probe length: a multiple of 32 below 4,096 tokens, of 256 above."""
    q = 32 if t < 4096 else 256
    return max(q, round(t / q) * q)


def search_fit(framework: str, measured: list[dict], runners: Runners, ns: argparse.Namespace,
               limit_gib: float) -> dict:
    """The largest completion length that fits in `limit_gib`, bracketed to FIT_RESOLUTION.

    Returns {"fits": the largest length seen to fit (None if none), "fails": the smallest
    seen not to, "bound": "exact" (bracketed), "at least" (capped by --fit-max or the time
    budget, or a probe timed out), "below" (not even the smallest probe fits), "unknown"
    (no run said either way), "probes"}."""
    lo, hi = None, None
    probes: list[dict] = []
    if any(res["status"] == "unavailable" for res in measured):
        return {"fits": None, "fails": None, "bound": "unavailable", "limit_gib": limit_gib,
                "probes": probes}

    def record(t: int, res: dict) -> bool | None:
        nonlocal lo, hi
        ok = fits(res, limit_gib)
        if ok is True and (lo is None or t > lo):
            lo = t
        if ok is False and (hi is None or t < hi):
            hi = t
        return ok

    for res in measured:
        record(res["T"], res)
    spec_job = {**runners.job, "warmup_steps": 1, "timed_steps": 1}
    t_end = time.monotonic() + ns.fit_budget_s
    bound = "exact"

    def probe(t: int) -> bool | None:
        print(f"[bench] fit {LABELS[framework]} T={t} ...", flush=True)
        res = runners.run(framework, job_spec(spec_job, t), limit_gib)
        probes.append({"T": t, "status": res["status"], "peak_gib": peak_of(res),
                       "why": why(res) if res["status"] != "ok" else None,
                       "stderr_tail": res.get("stderr_tail")})
        print(f"[bench]   {describe(res)}", flush=True)
        return record(t, res)

    while True:
        if time.monotonic() > t_end:
            bound = "at least"
            break
        if lo is None:  # nothing fits yet: halve down from the smallest failure
            t = hi // 2 if hi else min(ns.lengths)
            if t < 32:
                break
        elif hi is None:  # everything fits so far: double up to the cap
            t = lo * 2
            if t > ns.fit_max:
                if lo < ns.fit_max:
                    t = ns.fit_max
                else:
                    bound = "at least"
                    break
        else:
            if hi / lo <= FIT_RESOLUTION:
                break
            t = round_length(math.sqrt(lo * hi))
            if not lo < t < hi:
                break
        if probe(t) is None:
            bound = "at least"  # a timeout: the bracket above it is unknown
            break
    if lo is None:
        bound = "below" if hi else "unknown"
    return {"fits": lo, "fails": hi, "bound": bound, "limit_gib": limit_gib, "probes": probes}


def fit_text(f: dict | None) -> str:
    if f is None:
        return "n/a"
    if f["fits"] is None:
        return f"< {f['fails']:,}" if f["fails"] else f"n/a ({f['bound']})"
    if f["bound"] == "at least":
        return f">= {f['fits']:,}"
    return f"{f['fits']:,}" + (f" (not {f['fails']:,})" if f["fails"] else "")


# ---------------------------------------------------------------------------------------------
# The table


def print_table(cells: list[dict], fit: dict[str, dict], ns: argparse.Namespace,
                limit_fit: float) -> list[str]:
    """The table and the verdicts; returns the verdict lines."""
    by = {(c["framework"], c["T"]): c for c in cells}
    device = any(c.get("device_peak_gib") for c in cells)
    cols = ["framework", "T", "step s", "peak RSS GiB", *(["device peak GiB"] if device else []),
            "step vs TRL", "peak vs TRL"]
    rows = []
    for c in sorted(cells, key=lambda c: (c["T"], c["framework"] != "trl")):
        trl = by.get(("trl", c["T"]))
        step_ratio = peak_ratio = "-"
        if c["framework"] == "tandem" and trl:
            step_ratio = ratio_text(c, trl, "step")
            peak_ratio = ratio_text(c, trl, "peak")
        if c["status"] == "ok":
            step, rss = fmt(c["median_step_s"]), f"{c['peak_rss_gib']:.2f}"
        elif c["status"] == "stopped":
            step, rss = "n/a", f"> {c['limit_gib']:g} (stopped)"
        else:
            step, rss = "n/a", c["status"]
        dev = [fmt(c.get("device_peak_gib"), ".2f")] if device else []
        rows.append([LABELS[c["framework"]], f"{c['T']:,}", step, rss, *dev, step_ratio,
                     peak_ratio])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(cols)]
    print("  ".join(h.ljust(w) for h, w in zip(cols, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
    print(f"(step s: median of {ns.timed_steps} timed steps after 1 warm-up; peak RSS: "
          f"ru_maxrss of the runner's process; 'vs TRL' = Tandem / TRL at the same T, < 1 is "
          f"faster or smaller)")
    for c in cells:
        label = f"  {LABELS[c['framework']]} T={c['T']:,}"
        if c["status"] not in ("ok", "stopped"):
            print(f"{label}: {why(c)}")
            if c.get("stderr_tail"):
                print("    " + c["stderr_tail"].replace("\n", "\n    "))
        plan = (c.get("settings") or {}).get("memory_plan") or c.get("memory_plan")
        if plan:
            print(f"{label}: trainer's plan: {plan['estimate']}")

    measured = {k for k in LABELS
                if len({c["T"] for c in cells if c["framework"] == k and c["status"] == "ok"}) > 1}
    if measured:
        lines = {k: extrapolated_fit(cells, k, limit_fit) for k in sorted(measured)}
        print(f"{limit_fit:g} GiB reached, extrapolating each peak linearly from its two longest "
              f"lengths (an estimate, not a run; the fit search measures it): "
              + ", ".join(f"{LABELS[k]} " + (f"T ~ {t:,.0f}" if t else "no growth between them")
                          for k, t in lines.items()))
    if fit:
        print(f"largest completion length that fits in {limit_fit:g} GiB (bisected to "
              f"{100 * (FIT_RESOLUTION - 1):.1f}%, capped at {ns.fit_max:,} tokens): "
              + ", ".join(f"{LABELS[k]} {fit_text(v)}" for k, v in fit.items()))
    print(f"machine: {machine()}")
    return verdicts(by, fit, limit_fit)


def extrapolated_fit(cells: list[dict], framework: str, limit_gib: float) -> float | None:
    """The completion length at which the line through the peaks of `framework`'s two longest
    measured lengths reaches `limit_gib`; None without two measured lengths or without growth
    between them."""
    ok = sorted((c["T"], peak_of(c)) for c in cells
                if c["framework"] == framework and c["status"] == "ok")
    if len(ok) < 2:
        return None
    (t0, p0), (t1, p1) = ok[-2:]
    if t1 == t0 or p1 <= p0:
        return None
    return t1 + (limit_gib - p1) * (t1 - t0) / (p1 - p0)


def ratio_text(tandem: dict, trl: dict, what: str) -> str:
    r = ratio(tandem, trl, what)
    if r is None:
        return "n/a"
    value, op = r
    return f"{op}{value:.2f}x"


def ratio(tandem: dict, trl: dict, what: str) -> tuple[float, str] | None:
    """Tandem / TRL as (value, bound): bound "" when exact, "<" when the value is an upper
    bound, ">" when a lower one; None if unknown.

    A run stopped at the limit has a peak above the limit: TRL's makes the peak ratio an upper
    bound, Tandem's a lower one. Any other missing number makes the ratio unknown."""
    if what == "step":
        if tandem["status"] == "ok" and trl["status"] == "ok" and trl["median_step_s"]:
            return tandem["median_step_s"] / trl["median_step_s"], ""
        return None
    if tandem["status"] == "ok" and trl["status"] == "ok":
        return peak_of(tandem) / peak_of(trl), ""
    if tandem["status"] == "ok" and trl["status"] == "stopped":
        return peak_of(tandem) / trl["limit_gib"], "<"
    if tandem["status"] == "stopped" and trl["status"] == "ok":
        return tandem["limit_gib"] / peak_of(trl), ">"
    return None


def fit_ratio(tandem: dict, trl: dict) -> tuple[float, str] | None:
    """Tandem's largest fitting length / TRL's, as `ratio` returns it: a length reported as
    ">= X" (the search was capped) makes it a bound."""
    if not tandem["fits"] or not trl["fits"]:
        return None
    capped_a, capped_b = tandem["bound"] == "at least", trl["bound"] == "at least"
    if capped_a and capped_b:
        return None
    return tandem["fits"] / trl["fits"], ">" if capped_a else "<" if capped_b else ""


def verdicts(by: dict, fit: dict[str, dict], limit_fit: float) -> list[str]:
    out = []
    tandem, trl = by.get(("tandem", GOAL_T)), by.get(("trl", GOAL_T))
    at = f"at V={QWEN25_VOCAB:,}, T={GOAL_T:,}: Tandem / TRL"
    if tandem and trl:
        out.append(verdict(f"peak {at}", ratio(tandem, trl, "peak"), GOAL_PEAK_RATIO,
                           smaller_is_better=True))
        out.append(verdict(f"step {at}", ratio(tandem, trl, "step"), GOAL_TIME_RATIO,
                           smaller_is_better=True))
    else:
        out.append(f"goals at T={GOAL_T:,}: n/a (both frameworks must run T={GOAL_T:,})")
    if "tandem" in fit and "trl" in fit:
        out.append(verdict(f"largest length in {limit_fit:g} GiB: Tandem / TRL",
                           fit_ratio(fit["tandem"], fit["trl"]), GOAL_FIT_RATIO,
                           smaller_is_better=False))
    for line in out:
        print(line)
    return out


def verdict(what: str, r: tuple[float, str] | None, goal: float, smaller_is_better: bool
            ) -> str:
    """PASS or FAIL for a ratio against its goal. A bound decides only on one side: an upper
    bound can show that a smaller-is-better ratio passes (or a larger-is-better one fails),
    a lower bound the opposite; otherwise the line says the goal is undecided."""
    goal_text = f"{'<=' if smaller_is_better else '>='} {goal:.2f}"
    if r is None:
        return f"{what}: n/a (goal {goal_text})"
    value, bound = r
    passes = value <= goal if smaller_is_better else value >= goal
    if not bound:
        result = "PASS" if passes else "FAIL"
    elif (bound == "<") == smaller_is_better:
        result = "PASS" if passes else "undecided (only a bound is known)"
    else:
        result = "FAIL" if not passes else "undecided (only a bound is known)"
    return f"{what} {bound}{value:.2f}x (goal {goal_text}): {result}"


# ---------------------------------------------------------------------------------------------


def total_ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value",
                    help="Tandem config overrides (e.g. trainer.logits_chunk=2048), before the "
                         "options or after --")
    ap.add_argument("--lengths", type=int, nargs="+", default=LENGTHS,
                    help="completion lengths T to measure (default: %(default)s)")
    ap.add_argument("--rows", type=int, default=JOB["rows"], help="B (default: %(default)s)")
    ap.add_argument("--group", type=int, default=None, help="G (default: --rows, one prompt)")
    ap.add_argument("--timed-steps", type=int, default=JOB["timed_steps"])
    ap.add_argument("--skip-fit", action="store_true",
                    help="skip the search for the largest length that fits")
    ap.add_argument("--only", choices=["tandem", "trl"], help="run one framework only")
    ap.add_argument("--json", type=Path, help="write every run's raw results here")
    ap.add_argument("--kill-gib", type=float, default=20.0,
                    help="stop a runner whose RSS passes this (default: %(default)s)")
    ap.add_argument("--fit-gib", type=float, default=16.0,
                    help="the memory the fit search fits into (default: %(default)s; "
                         "--kill-gib if lower)")
    ap.add_argument("--fit-max", type=int, default=65536,
                    help="longest completion the fit search tries (default: %(default)s)")
    ap.add_argument("--fit-budget-s", type=float, default=7200.0,
                    help="wall time of each framework's fit search (default: %(default)s)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per runner")
    ap.add_argument("--trl-checkpointing", choices=["default", "on", "off"], default="default",
                    help="TRL's gradient checkpointing (default: TRL's own default, on)")
    ap.add_argument("--platform", choices=["cpu", "default"], default="cpu",
                    help="Tandem on one CPU device, or on JAX's default backend (an "
                         "accelerator, when there is one)")
    ap.add_argument("--cache-dir", type=Path,
                    default=Path(os.environ.get("TANDEM_BENCH_CACHE",
                                                Path.home() / ".cache" / "tandem-bench")),
                    help="where the TRL virtual environment lives")
    ns = ap.parse_args(argv)
    group = ns.group or ns.rows
    if ns.rows % group:
        ap.error(f"--rows={ns.rows} is not a multiple of --group={group}")
    ram = total_ram_gib()
    if ram is not None and ns.kill_gib > ram - 2:
        print(f"[bench] --kill-gib={ns.kill_gib:g} is above this machine's {ram:.1f} GiB less "
              f"2 GiB; using {ram - 2:.1f}", flush=True)
        ns.kill_gib = ram - 2
    limit_fit = min(ns.fit_gib, ns.kill_gib)

    job = {**JOB, "rows": ns.rows, "group_size": group, "timed_steps": ns.timed_steps}
    work = Path(tempfile.mkdtemp(prefix="tandem-memory-"))
    try:
        return measure(ns, job, group, limit_fit, Runners(ns, job, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(ns: argparse.Namespace, job: dict, group: int, limit_fit: float,
            runners: Runners) -> int:
    """The table's runs, the fit searches, the table and the verdicts."""
    frameworks = [ns.only] if ns.only else ["trl", "tandem"]
    print(f"[bench] V={QWEN25_VOCAB:,}, {MODEL_PARAMS:,} params, B={ns.rows} rows (G={group}), "
          f"prompt {job['prompt_tokens']} + T in {ns.lengths}; 1 warm-up + {ns.timed_steps} "
          f"timed steps; watchdog at {ns.kill_gib:g} GiB; Tandem overrides {ns.overrides}",
          flush=True)

    # MEASURE: every (framework, T) in its own child, the frameworks alternating first place.
    cells = []
    for i, t in enumerate(ns.lengths):
        spec = job_spec(job, t)
        order = frameworks if i % 2 == 0 else frameworks[::-1]
        for fw in order:
            print(f"[bench] {LABELS[fw]} T={t} ...", flush=True)
            res = runners.run(fw, spec, ns.kill_gib)
            print(f"[bench]   {describe(res)}", flush=True)
            cells.append(res)
    for c in cells:
        s = c.get("settings") or {}
        if s and (s.get("params"), s.get("vocab_size"), s.get("rows"),
                  s.get("completion_tokens")) != (MODEL_PARAMS, QWEN25_VOCAB, ns.rows, c["T"]):
            print(f"WARNING {LABELS[c['framework']]} T={c['T']} ran params {s.get('params')}, "
                  f"V {s.get('vocab_size')}, rows {s.get('rows')}, T "
                  f"{s.get('completion_tokens')}")

    # FIT: the largest length in `limit_fit` GiB, per framework.
    fit: dict[str, dict] = {}
    if not ns.skip_fit:
        for fw in frameworks:
            fit[fw] = search_fit(fw, [c for c in cells if c["framework"] == fw], runners, ns,
                                 limit_fit)

    print()
    lines = print_table(cells, fit, ns, limit_fit)
    print("\neffective settings:")
    seen = set()
    for c in cells:
        if c.get("settings") and c["framework"] not in seen:
            seen.add(c["framework"])
            s = {k: v for k, v in c["settings"].items()
                 if k not in ("completion_tokens", "memory_plan")}
            print(f"  {LABELS[c['framework']]}: {json.dumps(s, sort_keys=True)}")
    if ns.json:
        ns.json.write_text(json.dumps({"job": job, "lengths": ns.lengths, "cells": cells,
                                       "fit": fit, "verdicts": lines, "machine": machine(),
                                       "overrides": ns.overrides}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
