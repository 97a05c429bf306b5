"""One standard GRPO step in Tandem, TRL and Tunix, side by side, in one invocation.

    python bench/grpo_step.py                 # Tandem (default placements), then TRL, Tunix
    python bench/grpo_step.py --only tandem   # skip the peers
    python bench/grpo_step.py --json out.json # also write every runner's raw results
    python bench/grpo_step.py --rounds 3      # every runner 3 times, interleaved; medians
    python bench/grpo_step.py --only tandem --placement disaggregated --placement disaggregated-2+2
                                              # what the 8-device split costs on few cores

The standard job: a Qwen2-layout decoder (d=256, 4 layers, 4 query / 2 KV heads,
SwiGLU 688, vocab 1024, tied embeddings, q/k/v biases, fp32, random init: 3,166,464 params);
8 prompts x G=8 completions per step, prompts of 32 random token ids, exactly 64 new tokens
(no stop token can be sampled), temperature 1, β = 0.04 with a reference model, ε = 0.2, one
AdamW step per batch at lr 1e-5, reward = fraction of even completion ids
(`rewards/synthetic.py`, imported by every runner).

Each framework runs in its own process, one after another (never concurrently): Tandem with
this interpreter (`bench/peers/tandem_runner.py`), TRL and Tunix each with the Python of a
virtual environment this script creates on first use under `--cache-dir` (never in the
project's dependencies). Each runner does 2 warm-up + 8 timed steps and prints one JSON line;
its peak RSS comes from `os.wait4` on that child. The same prompts (drawn here from the
synthetic task's seed) go to every framework, and each reports the settings it actually ran
with, which this script checks against the job before printing the table.

The utilisation lines divide the job's model FLOPs (`job_flops`) by Tandem's step time and
compare that with a jitted fp32 matmul's FLOP/s (`bench/peers/matmul_peak.py`), measured before
every round and once after the last: each round's step time is set against the higher of the
two readings around that round, so one low reading (another load passing by) cannot push the
utilisation up, and the line gives the median over rounds. Beside the model FLOPs, each Tandem
placement reports the FLOPs its compiled programs execute per step (XLA's cost analysis of each
program the timed steps ran, times its calls; `bench/peers/executed_flops.py`): fewer where
Tandem skips work the model count includes (each prompt runs once per group), more where work
is repeated (replicated computation on every device, recomputation).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from controller.data.synthetic import synthetic_prompt_ids  # noqa: E402
from controller.startup import JAX_CACHE_ENV  # noqa: E402

# ---------------------------------------------------------------------------------------------
# The standard job

STANDARD_MODEL = {
    "vocab_size": 1024,
    "hidden_size": 256,
    "num_layers": 4,
    "num_heads": 4,
    "num_kv_heads": 2,
    "head_dim": 64,
    "mlp_dim": 688,
    "rope_theta": 10000.0,
    "norm_eps": 1e-6,
    "tie_embeddings": True,
    "qkv_bias": True,
}

STANDARD_JOB = {
    "model": STANDARD_MODEL,
    "prompts_per_step": 8,
    "group_size": 8,  # G
    "prompt_tokens": 32,
    "new_tokens": 64,
    "temperature": 1.0,
    "beta": 0.04,  # β
    "epsilon": 0.2,  # ε
    "lr": 1e-5,
    "adam_b1": 0.9,
    "adam_b2": 0.999,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "warmup_steps": 2,
    "timed_steps": 8,
    "seed": 0,
}

# Tandem placements: name -> config overrides. A placement whose overrides this build rejects
# (e.g. before the colocated schedule lands) is reported as unavailable, not skipped silently.
# Each side's layout is a choice within the placement. A 3M-parameter model fits every device
# many times over, so the fast layout is data parallel on both sides: params replicated, rows
# split (the trainer all-reduces its gradients once per step; the sampler needs no collective).
# The FSDP trainer / tensor-parallel sampler layout (Tandem's default, for models that need
# sharding) is kept as a row to show what the layout costs on this job.
DATA_PARALLEL = ["topology.trainer_rules={batch: fsdp}", "topology.sampler_mesh={dp: -1, tp: 1}"]
TANDEM_PLACEMENTS = {
    "disaggregated": ["topology.simulated_devices=8", "topology.trainer_devices=4",
                      *DATA_PARALLEL],
    "disaggregated-fsdp-tp": ["topology.simulated_devices=8", "topology.trainer_devices=4"],
    "colocated": ["topology.simulated_devices=8", "schedule.kind=colocated", *DATA_PARALLEL],
    # Not the standard split: 2 trainer + 2 sampler devices, to show what the 8-device split
    # costs on a machine with fewer cores than devices (XLA:CPU sizes its thread pool to
    # max(cores, devices), so 8 simulated devices on 2 cores run 4 busy threads per phase).
    "disaggregated-2+2": ["topology.simulated_devices=4", "topology.trainer_devices=2",
                          *DATA_PARALLEL],
}
DEFAULT_PLACEMENTS = ["disaggregated", "disaggregated-fsdp-tp", "colocated"]

# Peer environments, pinned to the versions this bench was written against.
TORCH_PIN = "torch==2.13.0"  # the CPU wheel; any other torch pulls a multi-GB CUDA build
TRL_PIN = "trl==1.16.0"
TUNIX_PIN = "google-tunix==0.1.7"


def param_count(m: dict) -> int:
    """All parameters: embedding (tied head), per layer q/k/v/o (+ q/k/v biases), SwiGLU, norms."""
    d, h, k, dh, f, v = (m["hidden_size"], m["num_heads"], m["num_kv_heads"], m["head_dim"],
                         m["mlp_dim"], m["vocab_size"])
    attn = d * h * dh + 2 * d * k * dh + h * dh * d
    bias = (h * dh + 2 * k * dh) if m["qkv_bias"] else 0
    layer = attn + bias + 3 * d * f + 2 * d
    head = 0 if m["tie_embeddings"] else d * v
    return v * d + m["num_layers"] * layer + d + head


def matmul_params(m: dict) -> int:
    """P_mm: weights a token multiplies through: per layer q, k, v, o and the three SwiGLU
    matrices, plus the LM head (D x V, the tied embedding). The embedding lookup, biases and
    norms do no matmul and are left out."""
    d, h, k, dh, f, v = (m["hidden_size"], m["num_heads"], m["num_kv_heads"], m["head_dim"],
                         m["mlp_dim"], m["vocab_size"])
    per_layer = d * h * dh + 2 * d * k * dh + h * dh * d + 3 * d * f
    return m["num_layers"] * per_layer + d * v


def forward_flops(m: dict, rows: int, length: int) -> int:
    """Model FLOPs of one causal forward over `rows` sequences of `length` tokens.

    F = rows * (2 P_mm S + L * 4 H Dh * S(S+1)/2): a multiply-add per weight per token, and per
    layer the two attention products (q·k and p·v, 2 H Dh FLOPs each per key) where query i sees
    i + 1 keys. A KV-cache decode of the same tokens does the same model FLOPs.
    """
    s = length
    attn = m["num_layers"] * 4 * m["num_heads"] * m["head_dim"] * s * (s + 1) // 2
    return rows * (2 * matmul_params(m) * s + attn)


def job_flops(job: dict) -> dict[str, int]:
    """Model FLOPs of one GRPO step, by phase (B rows, prompt P, completion T tokens).

    - sample: the forward over the P + T - 1 positions whose next token is drawn (prefill of P,
      then T - 1 decode steps; the last sampled token is never fed back);
    - reference: one forward of π_ref over P + T tokens;
    - update: forward + backward of π_θ over P + T tokens, counted as 3 forwards (the backward
      is twice the forward).
    """
    m = job["model"]
    b = job["prompts_per_step"] * job["group_size"]
    p, t = job["prompt_tokens"], job["new_tokens"]
    full = forward_flops(m, b, p + t)
    out = {"sample": forward_flops(m, b, p + t - 1), "update": 3 * full}
    if job["beta"] > 0:
        out["reference"] = full
    out["total"] = sum(out.values())
    return out


def job_prompts(job: dict) -> list[list[int]]:
    """Every prompt of the run, in order: the synthetic task's rows 0, 1, 2, ... (data.seed)."""
    n = (job["warmup_steps"] + job["timed_steps"]) * job["prompts_per_step"]
    return [synthetic_prompt_ids(job["seed"], i, job["prompt_tokens"],
                                 job["model"]["vocab_size"]) for i in range(n)]


def prompts_digest(prompt_ids: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(prompt_ids).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Peer virtual environments


@dataclass(frozen=True)
class PeerEnv:
    name: str
    path: Path
    installs: tuple[tuple[str, ...], ...]  # pip install argument lists, in order

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    @property
    def stamp(self) -> Path:
        return self.path / ".tandem-bench-ready"

    def ensure(self) -> Path:
        """Creates the venv and installs the pinned packages once; returns its python."""
        want = json.dumps(self.installs)
        if self.stamp.is_file() and self.stamp.read_text() == want:
            return self.python
        print(f"[bench] creating {self.name} environment at {self.path} (first use; minutes)",
              flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(self.path)], check=True)
        for args in self.installs:
            cmd = [str(self.python), "-m", "pip", "install", "-q", *args]
            print(f"[bench]   {' '.join(cmd[2:])}", flush=True)
            subprocess.run(cmd, check=True)
        self.stamp.write_text(want)
        return self.python


def peer_envs(cache: Path) -> dict[str, PeerEnv]:
    return {
        # torch first, pinned to the CPU build, so trl's dependency on torch is already met.
        "trl": PeerEnv("trl", cache / "trl-venv", ((TORCH_PIN,), (TRL_PIN, TORCH_PIN))),
        "tunix": PeerEnv("tunix", cache / "tunix-venv", ((TUNIX_PIN,),)),
    }


# ---------------------------------------------------------------------------------------------
# Running one framework


def run_child(cmd: list[str], env: dict[str, str], timeout_s: float) -> tuple[dict, float, str]:
    """Runs a runner to completion; returns (its JSON line, its peak RSS in GB, its stderr tail).

    Peak RSS is `ru_maxrss` of that child alone (`os.wait4`), not of earlier children.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=REPO)
        deadline = time.monotonic() + timeout_s
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    lines = [x for x in stdout.splitlines() if x.startswith("{")]
    rss_gb = usage.ru_maxrss * 1024 / 1e9  # Linux reports KiB
    tail = "\n".join(stderr.splitlines()[-30:])
    if proc.returncode != 0 or not lines:
        return {"error": f"exit code {proc.returncode}", "stderr_tail": tail}, rss_gb, tail
    return json.loads(lines[-1]), rss_gb, tail


def warm_first_step(cmd: list[str], env: dict[str, str], timeout_s: float) -> float | None:
    """Tandem's first step when started again on the same job (same command, so the same
    run.compile_cache_dir): one step, its programs loaded from the cache the run before
    wrote. None if that run fails."""
    res, _, _ = run_child([*cmd, "run.steps=1"], env, timeout_s)
    return res["steps"][0]["step_s"] if res.get("steps") else None


def base_env() -> dict[str, str]:
    # No JAX compilation cache from the caller's environment: every framework compiles cold
    # (Tandem's own cache directory is set per run, below).
    drop = ("XLA_FLAGS", "JAX_PLATFORMS", "PYTHONPATH", *JAX_CACHE_ENV)
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONUNBUFFERED"] = "1"
    return env


# ---------------------------------------------------------------------------------------------
# Summaries and the table


def summarize(res: dict, job: dict) -> dict:
    """Median step and phase times over the timed steps, tokens/s, first-step time."""
    if "steps" not in res:
        return res
    warm = job["warmup_steps"]
    timed = res["steps"][warm:]
    med = statistics.median(s["step_s"] for s in timed)
    phases = {}
    for phase, key in res.get("phases", {}).items():
        phases[phase] = statistics.median(s[key] for s in timed) if key else None
    rows = job["prompts_per_step"] * job["group_size"]
    lens = [s.get("completion_len_mean") for s in timed if s.get("completion_len_mean")]
    tokens = rows * (statistics.mean(lens) if lens else job["new_tokens"])
    return {
        **res,
        "median_step_s": med,
        "phase_median_s": phases,
        "completion_tokens_per_s": tokens / med,
        "first_step_s": res["steps"][0]["step_s"],
        "reward_mean": statistics.mean(s["reward_mean"] for s in res["steps"]),
    }


def combine_rounds(rounds: list[dict]) -> dict:
    """One runner's rounds as one result: medians over the rounds' medians (step, phases,
    tokens/s, first step, setup), the largest peak RSS, every round's settings problems.
    A round that failed makes the runner's result that failure."""
    failed = [r for r in rounds if "median_step_s" not in r]
    if failed or len(rounds) == 1:
        return failed[0] if failed else rounds[0]
    med = statistics.median
    out = dict(rounds[0])
    for key in ("median_step_s", "completion_tokens_per_s", "first_step_s", "setup_s",
                "first_step_warm_s"):
        if all(r.get(key) is not None for r in rounds):
            out[key] = med(r[key] for r in rounds)
    out["phase_median_s"] = {
        k: med(r["phase_median_s"][k] for r in rounds) if v is not None else None
        for k, v in rounds[0]["phase_median_s"].items()}
    out["rss_gb"] = max(r["rss_gb"] for r in rounds)
    out["settings_mismatch"] = sorted({p for r in rounds for p in r.get("settings_mismatch")
                                       or []})
    out["round_step_s"] = [r["median_step_s"] for r in rounds]
    out["round_first_step_s"] = [r["first_step_s"] for r in rounds]
    return out


def print_rounds(results: list[dict]) -> None:
    """Each round's s/step per runner and, for Tandem, its speedup over each peer that round."""
    by_name = {r["label"]: r for r in results if "round_step_s" in r}
    print("per round (s/step; first step):")
    for label, r in by_name.items():
        steps = ", ".join(f"{s:.3f}" for s in r["round_step_s"])
        firsts = ", ".join(f"{s:.1f}" for s in r["round_first_step_s"])
        print(f"  {label}: {steps}; first step {firsts} s")
    for label, r in by_name.items():
        if r.get("framework") != "tandem":
            continue
        for peer in ("TRL", "Tunix"):
            if peer in by_name:
                x = [p / t for p, t in zip(by_name[peer]["round_step_s"], r["round_step_s"],
                                           strict=True)]
                print(f"  {label} faster than {peer} by " + ", ".join(f"{v:.2f}x" for v in x)
                      + f" (median {statistics.median(x):.2f}x)")


def check_settings(res: dict, job: dict, digest: str) -> list[str]:
    """Differences between what a runner reports it ran and the standard job."""
    s = res.get("settings", {})
    want = {
        "params": param_count(job["model"]),
        "prompts_per_step": job["prompts_per_step"],
        "num_generations": job["group_size"],
        "prompt_tokens": job["prompt_tokens"],
        "max_new_tokens": job["new_tokens"],
        "temperature": job["temperature"],
        "beta": job["beta"],
        "learning_rate": job["lr"],
        "prompts_sha256": digest,
    }
    problems = [f"{k}: ran {s.get(k)!r}, job has {v!r}" for k, v in want.items()
                if s.get(k) != v]
    lens = [st.get("completion_len_mean") for st in res.get("steps", [])]
    if any(x is not None and x != job["new_tokens"] for x in lens):
        problems.append(f"completion lengths {sorted(set(lens))} != {job['new_tokens']}")
    return problems


def fmt(x: float | None, spec: str = ".3f", unit: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{unit}"


def machine(cpuinfo: str | None = None) -> str:
    """CPU model, cores and vector ISA: results from an AVX-512 Xeon and an AVX2 EPYC differ.

    cpuinfo: the text of /proc/cpuinfo (None: read it; unreadable means no model or flags)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    model, flags = platform.processor() or platform.machine(), set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
    isa = ("AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags
           else "no AVX2" if flags else "ISA unknown")
    return f"{model}, {os.cpu_count()} CPUs, {isa}"


def adjacent_peaks(peaks: list[dict | None]) -> list[float | None]:
    """For each round r, the higher of the matmul readings taken before it (r) and after it
    (r + 1), in GFLOP/s; None where neither reading succeeded."""
    gf = [p.get("gflops") if p else None for p in peaks]
    out = []
    for r in range(len(gf) - 1):
        both = [x for x in (gf[r], gf[r + 1]) if x is not None]
        out.append(max(both) if both else None)
    return out


def print_utilisation(rounds: dict[str, list[dict]], results: list[dict], flops: dict[str, int],
                      peaks: list[dict | None]) -> None:
    """The matmul readings, and per Tandem placement the model and executed FLOPs per step,
    each round's utilisation against the peak read around that round, and their median."""
    gf = flops["total"] / 1e9
    readings = [p["gflops"] for p in peaks if p and "gflops" in p]
    if not readings:
        why = next((p.get("error") for p in peaks if p), "not run")
        print(f"matmul peak: n/a ({why})")
        return
    first = next(p for p in peaks if p and "gflops" in p)
    median_peak = statistics.median(readings)
    print(f"matmul peak (jitted fp32 {first['n']}x{first['n']} on {first['device']}, best of "
          f"{first['repeats']}), read before each round and after the last: "
          + ", ".join(f"{x:.1f}" for x in readings)
          + f" GFLOP/s (median {median_peak:.1f}) -> floor {gf / median_peak:.3f} s/step")
    around = adjacent_peaks(peaks)
    for r in results:
        if r.get("framework") != "tandem" or "median_step_s" not in r:
            continue
        label = r["label"]
        per_round = [(x["median_step_s"], peak) for x, peak in zip(rounds[label], around,
                                                                   strict=True)
                     if "median_step_s" in x and peak]
        if per_round:
            utils = [gf / step / peak for step, peak in per_round]
            util = statistics.median(utils)
            achieved = statistics.median(gf / step for step, _ in per_round)
            high = " (above 100%: the peak readings are low; rerun on an idle machine)" \
                if util > 1 else ""
            print(f"utilisation {label}: {achieved:.1f} GFLOP/s = {100 * util:.1f}% of the "
                  f"matmul peak (per round: " + ", ".join(f"{100 * u:.1f}%" for u in utils)
                  + "; each round's step time against the higher of the two peak readings "
                  f"around it){high}")
        ex = r.get("executed_flops")
        if ex is None:
            print(f"executed {label}: n/a ({r.get('executed_flops_error') or 'not reported'})")
            continue
        exe = ex["flops_per_step"] / 1e9
        ph = {k: v / 1e9 for k, v in ex["by_phase"].items()}
        line = (f"executed {label}: {exe:.1f} GFLOP per step (sample {ph['sample']:.1f}, "
                f"update and reference {ph['update']:.1f}, other {ph['other']:.1f}) against "
                f"{gf:.1f} model GFLOP: {exe / gf:.2f}x")
        if per_round:
            exe_util = statistics.median(exe / step / peak for step, peak in per_round)
            line += f"; {100 * exe_util:.1f}% of the matmul peak executed"
        print(line)
        for note in ex.get("notes", []):
            print(f"  {label}: {note}")


def print_table(results: list[dict], flops: dict[str, int]) -> None:
    cols = ["framework", "s/step", "sample", "reference", "update", "sync", "tok/s",
            "setup", "first step", "warm first", "peak RSS", "vs TRL", "vs Tunix"]
    by_name = {r["label"]: r for r in results if "median_step_s" in r}
    trl, tunix = by_name.get("TRL"), by_name.get("Tunix")
    lines = []
    for r in results:
        if "median_step_s" not in r:
            lines.append([r["label"], "n/a (see below)"])
            continue
        ph = r["phase_median_s"]
        med = r["median_step_s"]
        lines.append([
            r["label"], fmt(med), fmt(ph.get("sample")), fmt(ph.get("reference")),
            fmt(ph.get("update")), fmt(ph.get("sync")),
            fmt(r["completion_tokens_per_s"], ".0f"), fmt(r.get("setup_s"), ".1f", " s"),
            fmt(r["first_step_s"], ".1f", " s"), fmt(r.get("first_step_warm_s"), ".1f", " s"),
            fmt(r["rss_gb"], ".2f", " GB"),
            fmt(med / trl["median_step_s"], ".2f", "x") if trl else "n/a",
            fmt(med / tunix["median_step_s"], ".2f", "x") if tunix else "n/a",
        ])
    widths = [max([len(c), *(len(x[i]) for x in lines if len(x) > 2 or i == 0)])
              for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for x in lines:
        if len(x) == 2:
            print(f"{x[0].ljust(widths[0])}  {x[1]}")
        else:
            print("  ".join(v.ljust(w) for v, w in zip(x, widths, strict=True)))
    print("(seconds are medians of the timed steps; 'vs' = Tandem or peer s/step divided by "
          "TRL's / Tunix's, < 1 is faster; phases a framework does not expose say n/a)")
    print("('first step' includes compilation, cold for every framework; 'warm first' is "
          "Tandem started again on the same job, its programs loaded from the compile cache "
          "the first run wrote: run.compile_cache_dir)")
    for r in results:
        if "median_step_s" not in r:
            why = r.get("unavailable") or r.get("error") or "not run"
            print(f"  {r['label']}: n/a: {why}")
        for k, v in (r.get("phase_notes") or {}).items():
            print(f"  {r['label']}: {k}: {v}")
    print(f"machine: {machine()}")
    gf = {k: v / 1e9 for k, v in flops.items()}
    print(f"job model FLOPs per step: {gf['total']:.1f} GFLOP (sample {gf['sample']:.1f}, "
          f"reference {gf.get('reference', 0):.1f}, update {gf['update']:.1f})")


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["tandem", "trl", "tunix"], action="append",
                    help="run only these frameworks (repeatable); default: all three")
    ap.add_argument("--placement", choices=sorted(TANDEM_PLACEMENTS), action="append",
                    help="Tandem placements to run (repeatable); default: "
                         + ", ".join(DEFAULT_PLACEMENTS))
    ap.add_argument("--cache-dir", type=Path,
                    default=Path(os.environ.get("TANDEM_BENCH_CACHE",
                                                Path.home() / ".cache" / "tandem-bench")),
                    help="where the peers' virtual environments live")
    ap.add_argument("--timed-steps", type=int, default=STANDARD_JOB["timed_steps"])
    ap.add_argument("--warmup-steps", type=int, default=STANDARD_JOB["warmup_steps"])
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per runner")
    ap.add_argument("--json", type=Path, help="write every runner's raw results here")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every runner this many times, interleaved; the table shows the "
                         "median over rounds and each round's ratios are listed (runs on one "
                         "machine drift by up to ~35%%, so one round's ratio is only so good)")
    ns = ap.parse_args(argv)
    only = ns.only or ["tandem", "trl", "tunix"]

    job = {**STANDARD_JOB, "timed_steps": ns.timed_steps, "warmup_steps": ns.warmup_steps}
    prompts = job_prompts(job)
    digest = prompts_digest(prompts)
    assert param_count(job["model"]) == 3_166_464, param_count(job["model"])
    flops = job_flops(job)

    work = Path(tempfile.mkdtemp(prefix="tandem-bench-"))
    spec_path = work / "job.json"
    spec_path.write_text(json.dumps({**job, "prompts": prompts, "prompts_sha256": digest,
                                     "repo": str(REPO)}))
    print(f"[bench] standard job: {param_count(job['model']):,} params, "
          f"{job['prompts_per_step']}x{job['group_size']} rows, prompt {job['prompt_tokens']} + "
          f"{job['new_tokens']} new tokens, {job['warmup_steps']} warm-up + "
          f"{job['timed_steps']} timed steps; prompts {digest}", flush=True)

    peers_dir = REPO / "bench" / "peers"

    # The matmul peak, in its own process on JAX's default CPU device (all cores): read before
    # every round and after the last, so each run has a reading on either side.
    peak_env = base_env()
    peak_env["JAX_PLATFORMS"] = "cpu"
    peaks: list[dict | None] = []

    def read_peak() -> None:
        res, _, _ = run_child([sys.executable, str(peers_dir / "matmul_peak.py")], peak_env, 600)
        peaks.append(res)
        print("[bench] matmul peak: " + (f"{res['gflops']:.1f} GFLOP/s" if "gflops" in res
                                          else f"n/a ({res.get('error')})"), flush=True)

    # Every runner: (label, command, environment). Peers' environments are made first.
    runners: list[tuple[str, list[str], dict]] = []
    if "tandem" in only:
        for name in ns.placement or DEFAULT_PLACEMENTS:
            runners.append((f"Tandem {name}",
                            [sys.executable, str(peers_dir / "tandem_runner.py"),
                             str(spec_path), name, *TANDEM_PLACEMENTS[name]], base_env()))
    envs = peer_envs(ns.cache_dir)
    for key, label, script in (("trl", "TRL", "trl_runner.py"),
                               ("tunix", "Tunix", "tunix_runner.py")):
        if key in only:
            env = base_env()
            if key == "tunix":
                env["JAX_PLATFORMS"] = "cpu"
            runners.append((label, [str(envs[key].ensure()), str(peers_dir / script),
                                    str(spec_path)], env))

    # Round r runs every runner once, starting r places further down the list, so that no
    # framework always runs first (or right after the same one) while the machine drifts.
    by_label: dict[str, list[dict]] = {label: [] for label, _, _ in runners}
    read_peak()
    for r in range(ns.rounds):
        for i in range(len(runners)):
            label, cmd, env = runners[(i + r) % len(runners)]
            print(f"[bench] {label} ..." + (f" (round {r + 1}/{ns.rounds})"
                                           if ns.rounds > 1 else ""), flush=True)
            cache_dir = None
            if label.startswith("Tandem "):
                # A fresh compile cache: this run compiles cold, like the peers.
                cache_dir = work / f"xla-cache-{label.split()[1]}-r{r}"
                cmd = [*cmd, f"run.compile_cache_dir={cache_dir}"]
            res, rss, _ = run_child(cmd, env, ns.timeout)
            res = summarize({**res, "label": label, "rss_gb": rss}, job)
            if cache_dir is not None and "median_step_s" in res:
                res["first_step_warm_s"] = warm_first_step(cmd, env, ns.timeout)
            if "median_step_s" in res:
                res["settings_mismatch"] = check_settings(res, job, digest)
            by_label[label].append(res)
            status = (f"{res['median_step_s']:.3f} s/step" if "median_step_s" in res
                      else res.get("unavailable") or res.get("error"))
            print(f"[bench] {label}: {status}", flush=True)
            if res.get("error"):
                print(res.get("stderr_tail", ""), file=sys.stderr)
        read_peak()
    results = [combine_rounds(rounds) for rounds in by_label.values()]

    print()
    print_table(results, flops)
    print_utilisation(by_label, results, flops, peaks)
    if ns.rounds > 1:
        print_rounds(results)
    for r in results:
        for p in r.get("settings_mismatch") or []:
            print(f"WARNING {r['label']} did not run the standard job: {p}")
    print("\neffective settings:")
    for r in results:
        if "settings" in r:
            print(f"  {r['label']}: {json.dumps(r['settings'], sort_keys=True)}")
    if ns.json:
        ns.json.write_text(json.dumps({"job": job, "flops": flops, "matmul_peaks": peaks,
                                       "results": results, "rounds": by_label}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
