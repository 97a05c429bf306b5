"""`tandem run [config.yaml] [key.sub=value ...]`: run a GRPO job with a progress display."""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from typing import Any

from controller.cli.args import describe, fail, input_errors, split_args
from controller.cli.inputs import check_run_inputs
from controller.config import ConfigError, JobConfig, as_path, load_config
from controller.storage import append_text

RUN_EPILOG = """\
examples:
  tandem run                                   # the embedded default: 8 simulated CPU devices,
                                               # 4 trainer + 4 sampler, the reverse_digits task
  tandem run run.steps=50 sampling.group_size=4
  tandem run my_job.yaml optimizer.learning_rate=1e-3
  tandem run topology.trainer_devices=6        # 6 trainer + 2 sampler devices

Any field of the config can be overridden as section.field=value (values are YAML).
Sections: model, topology, sampling, algorithm, optimizer, rewards, data, run, schedule,
checkpoint, trainer, reshard, status, eval. Every field: docs/configuration.md.
"""


def cmd_run(ns: argparse.Namespace) -> int:
    config_path, overrides = split_args(ns.args)
    try:
        cfg = load_config(config_path, overrides)  # validated before any JAX work
        if not ns.print_config:
            check_run_inputs(cfg)  # the files and names it points at, also before JAX
    except ConfigError as e:
        return fail(e)
    try:
        return _run(cfg, ns)
    except ConfigError as e:  # device split, existing run directory, ...
        return fail(e)


def _run(cfg: JobConfig, ns: argparse.Namespace) -> int:
    if ns.print_config:
        print(cfg.to_yaml())
        return 0

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from controller.api import Job
    from controller.eval.evaluator import format_eval
    from controller.startup import cache_hits

    console = Console(stderr=False)
    console.print(f"[bold]tandem[/bold] run '{cfg.run.name}' (config {cfg.digest()})")
    try:
        job = Job(cfg)
    except Exception as e:  # a bad input found while building: rows, reward code, model files
        if isinstance(e, input_errors()) or (isinstance(e, ImportError)
                                             and "pip install" in str(e)):  # a missing extra
            return fail(e)
        raise  # anything else is a bug in Tandem: its traceback is the report
    console.print(f"devices: {job.meshes.describe()}")
    if job.compile_cache_dir:
        console.print(f"compile cache: {job.compile_cache_dir} (run.compile_cache_dir)",
                      highlight=False, soft_wrap=True)
    if job.resumed_from is not None:
        console.print(f"resumed from the checkpoint of step {job.resumed_from} in "
                      f"{cfg.checkpoint_dir}")
    if job.pathways:  # JAX_PLATFORMS=proxy: the proxy address and persistence in the log
        console.print(job.pathways.describe())
    spec = job.model_def.spec
    source = f" from {cfg.model.path} ({spec.hf_model_type})" if cfg.model.path else ""
    if job.status_address is not None:
        console.print(f"status: {job.status_address} (tandem status --address "
                      f"{job.status_address} --watch)", highlight=False)
    console.print(
        f"model: {job.num_params:,} params{source}, {spec.num_layers} layers, "
        f"d={spec.hidden_size} | task: {cfg.data.task}, {cfg.data.prompts_per_step} prompts "
        f"x G={cfg.sampling.group_size} per step | schedule: {job.loop.schedule}"
        + (f" (max_staleness={cfg.schedule.max_staleness})" if cfg.schedule.kind == "async"
           else " (one mesh)" if cfg.schedule.kind == "colocated" else "")
    )
    progress = Progress(
        TextColumn("step {task.completed:>4.0f}/{task.total:.0f}"), BarColumn(),
        TextColumn("reward {task.fields[reward]:.3f}"), TextColumn("{task.fields[dt]:.2f}s/step"),
        TimeElapsedColumn(), console=console, disable=not cfg.run.progress,
    )
    every = max(1, cfg.run.steps // 10)
    try:
        with job, progress:  # on an error, the job closes (and finishes its saves) first
            bar = progress.add_task("run", total=cfg.run.steps, completed=job.steps_done,
                                    reward=0.0, dt=0.0)

            def on_step(m: dict[str, float]) -> None:
                progress.update(bar, advance=1, reward=m["reward/mean"], dt=m["time/step_s"])
                s = int(m["step"])
                if s == 1 or s % every == 0:
                    progress.console.print(
                        f"step {s:>4}  reward {m['reward/mean']:.3f}  loss "
                        f"{m['loss/total']:+.4f}  kl {m.get('kl/mean', 0.0):.4f}  len "
                        f"{m['completion/len_mean']:.1f}  "
                        + (f"turns {m['env/turns_mean']:.2f}  " if "env/turns_mean" in m else "")
                        + f"{m['time/step_s']:.2f}s")
                if "eval/accuracy" in m:  # this step's policy was evaluated
                    progress.console.print(format_eval(s, m), highlight=False, soft_wrap=True)

            def on_baseline(step: int, m: dict[str, float]) -> None:
                if step == 0:  # later evaluations come with their step's metrics
                    progress.console.print(format_eval(step, m), highlight=False,
                                           soft_wrap=True)

            job.eval_listeners.append(on_baseline)
            job.run(on_step=on_step)
            s = job.summary()
    except Exception as e:
        return _report_stop(job, cfg, e)
    if job.stop_requested:
        console.print(f"stopped at step {job.steps_done} on request; checkpoint saved in "
                      f"{cfg.checkpoint_dir or '(checkpointing off)'}")
    if not s:
        return 0
    hits = cache_hits()
    reused = f", {hits} programs from the compile cache" if hits else ""
    console.print(
        f"done: {s['steps']} steps | reward first {s['window']} steps {s['reward_first']:.3f} -> "
        f"last {s['window']} steps {s['reward_last']:.3f} | {s['step_s_mean']:.3f} s/step "
        f"(first step {s['first_step_s']:.1f}s incl. compile{reused}) | weight sync "
        f"{s['reshard_bytes'] / 1e6:.2f} MB at {s['reshard_gbps']:.2f} GB/s"
    )
    if "timeline/overlap_frac" in s:
        console.print(
            f"timeline: sampler busy {s['timeline/sampler_busy_frac']:.0%}, trainer busy "
            f"{s['timeline/trainer_busy_frac']:.0%}, both at once "
            f"{s['timeline/overlap_frac']:.0%} of the wall time")
    if len(job.evals) >= 2:
        (s0, first), (s1, last) = job.evals[0], job.evals[-1]
        console.print(f"eval: held-out accuracy {first['eval/accuracy']:.3f} at step {s0} -> "
                      f"{last['eval/accuracy']:.3f} at step {s1} ({int(last['eval/prompts'])} "
                      f"prompts of {_held_out(cfg)})", soft_wrap=True)
    if cfg.run.output_dir:
        out = as_path(cfg.run.output_dir)
        console.print(f"metrics: {out / 'metrics.jsonl'} | trace: {out / 'trace.json'} "
                      f"(open in ui.perfetto.dev)")
    if cfg.run.export_hf_dir:
        try:
            path = job.save_hf_model(cfg.run.export_hf_dir)
        except Exception as e:
            if not isinstance(e, (*input_errors(), OSError)):
                raise
            kept = (f"the trained policy is in the checkpoints in {cfg.checkpoint_dir} (fix: "
                    f"tandem export {cfg.checkpoint_dir} NEW_DIR)" if cfg.checkpoint_dir else
                    "set run.output_dir to keep checkpoints a policy can be exported from")
            return fail(f"run.export_hf_dir={cfg.run.export_hf_dir!r}: saving the model failed: "
                        f"{describe(e)}; {kept}", code=1)
        console.print(f"saved Hugging Face model: {path}")
    return 0


def _held_out(cfg: JobConfig) -> str:
    return cfg.eval.path if cfg.eval.path else f"the {cfg.eval.split} split"


def _report_stop(job: Any, cfg: JobConfig, e: Exception) -> int:
    """A run that had to stop: one `error:` line naming the step and the cause, then what
    was kept. Exit status 1. A reward's own traceback (user code) is part of its cause; a
    traceback inside Tandem goes to <run.output_dir>/error.log, not the terminal."""
    from rewards.base import RewardFailureError

    f = job.failure
    where = (f"step {f.step} failed" if f is not None
             else f"the run failed after step {job.steps_done}")
    cause = str(e).strip() if isinstance(e, RewardFailureError) else describe(e)
    print(f"error: {where}: {cause}", file=sys.stderr)
    out = as_path(cfg.run.output_dir) if cfg.run.output_dir else None
    if not isinstance(e, RewardFailureError):
        if out is not None and out.is_dir():
            log = out / "error.log"
            # Appended: an earlier failure's record stays.
            append_text(log, f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {where}\n"
                        + "".join(traceback.format_exception(e)))
            print(f"  the full traceback: {log}", file=sys.stderr)
        else:
            print("  (set run.output_dir to keep the full traceback in <dir>/error.log)",
                  file=sys.stderr)
    done = job.steps_done
    if out is not None and done:
        steps = "step 1" if done == 1 else f"steps 1-{done}"
        print(f"  kept: the metrics of {steps} in {out / 'metrics.jsonl'}", file=sys.stderr)
    if f is not None and f.saved_step is not None:
        print(f"  kept: the checkpoint of step {f.saved_step} in {f.directory} (fix the cause, "
              f"then continue with run.resume=true)", file=sys.stderr)
    if f is not None and f.not_saved:
        print(f"  not saved: {f.not_saved}", file=sys.stderr)
    return 1


def add_run_parser(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser(
        "run", help="run a GRPO job (default: the embedded CPU-simulation job)",
        description="Run a GRPO job. Arguments: an optional YAML config, then any number of "
        "section.field=value overrides.",
        epilog=RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("args", nargs="*", metavar="[config.yaml] [key=value]")
    run.add_argument("--print-config", action="store_true",
                     help="print the resolved config as YAML and exit")
    run.set_defaults(func=cmd_run)
