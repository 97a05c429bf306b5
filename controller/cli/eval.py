"""`tandem eval`: the held-out evaluation of a run, on a checkpoint, a Hugging Face model
directory or the built-in model.

    tandem eval --checkpoint runs/exp1                      # the newest checkpoint, its config
    tandem eval --checkpoint runs/exp1 --step 200 eval.samples_per_prompt=8 eval.k=4
    tandem eval examples/gsm8k.yaml model.path=~/models/qwen-grpo eval.split=test
    tandem eval eval.num_prompts=256                         # the built-in model, untrained

The evaluation is the one a run does (controller/eval/evaluator.py), on the same sampler mesh,
with the same eval.* settings and the same eval.seed: on the policy of a run's step N it gives
that run's evaluation at step N. With --checkpoint the config is the one the checkpoint
recorded, and key=value arguments change it (e.g. eval.split, eval.num_prompts). It prints the
metrics and writes one JSON line per prompt (prompt, completions, rewards, extracted answers)
to --out.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from controller.cli.args import fail, input_errors, split_args

EVAL_EPILOG = __doc__.split("\n\n")[1]


def _config(ns: argparse.Namespace) -> tuple[Any, Any]:
    """The config to evaluate with and the checkpoint step directory (or None)."""
    from controller.config import apply_overrides, load_config, model_section, validate_config

    config_path, overrides = split_args(ns.args)
    # Evaluation only: no run directory, checkpoints or status server of its own.
    forced = ["eval.enabled=true", "run.output_dir=null", "checkpoint.dir=null",
              "run.resume=false", "run.export_hf_dir=null", "status.enabled=false"]
    if ns.checkpoint is None:
        if ns.step is not None:
            raise ValueError("--step needs --checkpoint (fix: add --checkpoint RUN_DIR)")
        return load_config(config_path, [*overrides, *forced]), None
    if config_path is not None:
        raise ValueError(f"{config_path}: with --checkpoint the config is the one the "
                         f"checkpoint recorded (fix: drop the file; change fields with "
                         f"key=value)")
    from controller.cli.export import find_step_dirs, read_meta

    step_dir = find_step_dirs(ns.checkpoint, ns.step)[0]
    data = dict(read_meta(step_dir)["config"])
    data["model"] = model_section(dict(data.get("model", {})))  # as the run was configured
    return validate_config(apply_overrides(data, [*overrides, *forced])), step_dir


def cmd_eval(ns: argparse.Namespace) -> int:
    from controller.cli.export import ExportError
    from controller.cli.inputs import check_run_inputs
    from controller.config import ConfigError, as_path

    out = as_path(ns.out)
    if out.exists() and not ns.overwrite:
        return fail(f"--out {ns.out} exists; nothing is overwritten (fix: another --out, or "
                    f"--overwrite)")
    try:
        cfg, step_dir = _config(ns)
        check_run_inputs(cfg)
    except (ConfigError, ExportError, ValueError) as e:
        return fail(e)
    try:
        return _evaluate(cfg, step_dir, ns, out)
    except Exception as e:
        if isinstance(e, (*input_errors(), ExportError)):
            return fail(e)
        raise


def _evaluate(cfg: Any, step_dir: Any, ns: argparse.Namespace, out: Any) -> int:
    from controller.api import Job
    from controller.eval.evaluator import format_eval
    from controller.storage import write_text

    with Job(cfg) as job:
        step = 0
        if step_dir is not None:
            from controller.cli.export import restore_params

            if job.trainer.lora:  # the checkpoint's adapters on the job's base
                import jax

                from trainer.lora import split

                adapters = restore_params(step_dir, split(job.policy_def.shapes())[1])
                job.trainer.state["params"] = jax.device_put(adapters, job.trainer.shardings)
                job.loop.push_weights()
            else:
                job.loop.load_sampler_weights(restore_params(step_dir, job.model_def.shapes()))
            step = int(step_dir.name)
        what = (f"the checkpoint of step {step} in {step_dir.parent}" if step_dir is not None
                else f"model.path={cfg.model.path}" if cfg.model.path
                else "the built-in model (untrained)")
        print(f"tandem eval: {what} on {job.evaluator.num_prompts} prompts of "
              f"{cfg.eval.path or 'the ' + cfg.eval.split + ' split'}", flush=True)
        result = job.evaluator.run(job.loop.sampler_weights()[0])
    print(format_eval(step, result.metrics))
    width = max(len(k) for k in result.metrics)
    for k, v in result.metrics.items():
        print(f"  {k:<{width}}  {v:.4f}")
    write_text(out, "".join(json.dumps({"step": step, **r}) + "\n" for r in result.records))
    print(f"wrote {len(result.records)} prompts with their completions to {ns.out}")
    return 0


def add_eval_parser(sub: Any) -> None:
    p = sub.add_parser(
        "eval", help="evaluate a checkpoint, a Hugging Face model or the built-in model",
        description="Run the held-out evaluation (the eval.* settings) on a checkpoint's "
        "policy, a Hugging Face model directory (model.path) or the built-in model. "
        "Arguments: an optional YAML config (not with --checkpoint), then section.field=value "
        "overrides.",
        epilog="examples:\n" + EVAL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("args", nargs="*", metavar="[config.yaml] [key=value]")
    p.add_argument("--checkpoint", default=None,
                   help="a run's output directory, its checkpoints/ directory or one step "
                   "directory (local or gs://); the run's own config is used")
    p.add_argument("--step", type=int, default=None, help="with --checkpoint: this step "
                   "(default: the newest that restores)")
    p.add_argument("--out", default="eval_samples.jsonl",
                   help="one JSON line per prompt (default: eval_samples.jsonl)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_eval)

