"""`tandem export <checkpoint> <out_dir>`: a Tandem checkpoint as a Hugging Face directory.

    tandem export runs/exp1 exported/            # the run's newest checkpoint that restores
    tandem export runs/exp1/checkpoints out/ --step 200
    tandem export runs/exp1/checkpoints/200 out/
    tandem export gs://bucket/exp1 gs://bucket/exp1-hf

The model is rebuilt from the config the checkpoint records (its `meta`), only the params are
read (an orbax partial restore of `state.params`, onto one CPU device: no optimizer state and
no device split needed), and `trainer.hf.save_hf_model` writes config.json, safetensors and,
for a job that started from `model.path`, that directory's tokenizer files.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from etils import epath

from controller.config import absolute_path, as_path, expand_path, is_url, model_section
from controller.storage import save_hf_model_at, save_peft_adapters_at, stage

log = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """A checkpoint that cannot be exported; the message names the path and the fix."""


class _Unreadable(ExportError):
    """One step's files are incomplete or corrupt: an earlier step may still export."""

    def __init__(self, what: str, fix: str):
        super().__init__(f"{what} (fix: {fix})")
        self.what = what  # one line without the fix: the warning when an earlier step is used


@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
    """Reading `<step>/state` on its own makes orbax warn that the step-level metadata file is
    not in it (it is one level up); that is expected here, so absl warnings are muted."""
    from trainer.checkpoint import mute_closed_loop_noise

    mute_closed_loop_noise()  # a failed read's leftovers, printed as tracebacks otherwise
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)


def _is_step_dir(p: epath.Path) -> bool:
    # Orbax renames `<step>.orbax-checkpoint-tmp*` to `<step>` once a save is complete; on GCS,
    # which has no atomic rename, it writes `<step>` in place and adds commit_success.txt last.
    return (p.is_dir() and p.name.isdigit() and (p / "state").is_dir() and (p / "meta").is_dir()
            and (not is_url(p) or (p / "commit_success.txt").exists()))


def find_step_dirs(checkpoint: str | os.PathLike, step: int | None = None
                   ) -> list[epath.Path]:
    """Candidate step directories, newest first, for a run dir, checkpoint dir or step dir,
    local or gs://.

    Local paths are absolute (orbax's metadata reader needs them so); a relative `checkpoint`
    is taken from the current directory.
    """
    path = as_path(absolute_path(checkpoint))
    if not path.exists():
        raise ExportError(f"checkpoint {str(checkpoint)!r} does not exist (fix: pass a run's "
                          f"run.output_dir, its checkpoints/ directory, or one step directory; "
                          f"a relative path is read from the current directory, {Path.cwd()})")
    if not path.is_dir():
        raise ExportError(f"checkpoint {str(checkpoint)!r} is a file, not a checkpoint "
                          f"directory (fix: pass a run's run.output_dir, its checkpoints/ "
                          f"directory, or one step directory)")
    if _is_step_dir(path):
        if step is not None and int(path.name) != step:
            raise ExportError(f"{path} is the checkpoint of step {path.name}, not --step {step} "
                              f"(fix: drop --step or pass the checkpoint directory {path.parent})")
        return [path]
    if (path / "checkpoints").is_dir() and not any(_is_step_dir(p) for p in path.iterdir()):
        path = path / "checkpoints"  # a run's output directory
    steps = sorted((p for p in path.iterdir() if _is_step_dir(p)), key=lambda p: int(p.name),
                   reverse=True)
    if step is not None:
        steps = [p for p in steps if int(p.name) == step]
        if not steps:
            have = sorted(int(p.name) for p in path.iterdir() if _is_step_dir(p))
            raise ExportError(f"{path} has no checkpoint of --step {step} (it has steps {have}; "
                              f"fix: pick one of them or drop --step for the newest)")
    if not steps:
        raise ExportError(f"no complete checkpoint in {path} (fix: pass a run's output directory "
                          f"or checkpoint directory that holds <step>/state and <step>/meta; a "
                          f"run saves them with run.output_dir or checkpoint.dir set)")
    return steps


def read_meta(step_dir: epath.Path) -> dict[str, Any]:
    file = step_dir / "meta" / "metadata"
    try:
        meta = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise _Unreadable(f"{file} is unreadable ({type(e).__name__}: {e}); this step's "
                          f"checkpoint is incomplete or corrupt",
                          "pass --step with an earlier step") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise ExportError(f"{file} records no run config; {step_dir} was not written by a Tandem "
                          f"job (fix: pass a checkpoint a `tandem run` saved)")
    return meta


def _model_for(cfg: Any, model_dir: Path | None) -> Any:
    """The ModelDef the job trained, rebuilt from its config as `Job` builds it (`model_dir`:
    the local copy of its model.path)."""
    from trainer.model import ModelSpec, define_model

    if model_dir is not None:
        from trainer.hf import load_hf_spec

        return define_model(load_hf_spec(model_dir, cfg.model.dtype))
    from controller.data import build_tokenizer

    return define_model(ModelSpec.from_config(cfg.model, build_tokenizer(cfg).vocab_size))


def lora_model_for(cfg: Any, base: Any) -> Any:
    """The ModelDef with the adapters a LoRA config (cfg.model.lora) puts on `base`."""
    from trainer.lora import configured
    from trainer.model import define_model

    return define_model(configured(base.spec, cfg.model.lora))


def base_params_for(cfg: Any, base: Any, model_dir: Path | None) -> Any:
    """The base model's params, as the job built them: from model.path, or from the seed."""
    if model_dir is not None:
        from trainer.hf import load_hf_params

        return load_hf_params(model_dir, base)
    from trainer.model import init_params

    return init_params(base.spec, cfg.model.init_seed)


def check_shapes(step_dir: epath.Path, shapes: Any) -> None:
    """The checkpoint's params must be exactly the tree the config's model defines (shapes:
    its `ModelDef.shapes()`, or the adapters' for a LoRA run)."""
    import jax
    import orbax.checkpoint as ocp

    from trainer.checkpoint import short_reason

    try:
        with _quiet_orbax():
            stored = ocp.PyTreeCheckpointer().metadata(step_dir / "state")
    except Exception as e:  # unreadable metadata: a corrupt checkpoint
        stored, why = None, short_reason(e)
    else:
        why = "no params in its metadata"
    tree = getattr(stored, "item_metadata", stored)
    tree = getattr(tree, "tree", tree)
    if not isinstance(tree, dict) or "params" not in tree:
        raise _Unreadable(f"{step_dir / 'state'} is incomplete or corrupt ({why})",
                          "pass --step with an earlier checkpoint")
    def leaves(t: Any) -> dict[str, tuple[tuple[int, ...], str]]:  # orbax keys are strings
        return {"/".join(str(getattr(k, "key", k)) for k in path): (tuple(v.shape), str(v.dtype))
                for path, v in jax.tree_util.tree_leaves_with_path(t)}

    want, got = leaves(shapes), leaves(tree["params"])
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:4]
        raise ExportError(
            f"the params in {step_dir / 'state'} do not match the model its recorded config "
            f"defines (first differences, as (name, (shape, dtype)): {diff}); the checkpoint was "
            f"written by another config or model (fix: export it with the config it was trained "
            f"with, i.e. its own meta, untouched)")


def restore_params(step_dir: epath.Path, shapes: Any) -> Any:
    """`state.params` of one step directory (shaped as `shapes`: a ModelDef's, or a LoRA run's
    adapters), onto one device, CPU if there is one (an orbax partial restore: the optimizer
    state is never read)."""
    import jax
    import orbax.checkpoint as ocp

    try:
        device = jax.devices("cpu")[0]  # host memory: the weights are written from the host
    except RuntimeError:  # JAX_PLATFORMS names no CPU backend: the first device there is
        device = jax.devices()[0]
    one = jax.sharding.SingleDeviceSharding(device)
    target = {"params": jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=one), shapes)}
    with _quiet_orbax():
        out = ocp.PyTreeCheckpointer().restore(
            step_dir / "state",
            args=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True))
    return out["params"]


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *,
                      step: int | None = None, model_path: str | None = None,
                      overwrite: bool = False, fmt: str = "hf") -> tuple[epath.Path, int]:
    """Writes a Tandem checkpoint as a HF directory; returns (out_dir, exported step). Both
    may be local or gs://; a remote out_dir is written locally first, then uploaded.

    fmt: "hf", the whole model (a LoRA run's adapters merged into the base), or "peft", a LoRA
    run's adapters as PEFT loads them onto the base.

    Without `step`, the newest checkpoint that restores is used (a corrupt one is skipped with
    a warning, as a resume does).
    """
    out = as_path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"out_dir {out_dir} is a file; nothing is overwritten (fix: "
                          f"choose a new output directory)")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"out_dir {out_dir} exists and is not empty; nothing is "
                          f"overwritten (fix: choose a new output directory, or pass "
                          f"--overwrite)")
    if model_path is not None:
        model_path = expand_path(model_path)
    candidates = find_step_dirs(checkpoint, step)
    skipped: list[str] = []
    for step_dir in candidates:
        try:
            result = _export_step(step_dir, out, model_path, overwrite, fmt)
        except _Unreadable as e:
            if step is not None:
                raise
            skipped.append(e.what)
            continue
        for what in skipped:
            log.warning("%s; exporting the checkpoint of step %d (%s) instead", what, result[1],
                        step_dir)
        return result
    raise ExportError(f"no checkpoint in {candidates[0].parent} restores: {'; '.join(skipped)} "
                      f"(fix: export from a copy of the run made before it was damaged, or "
                      f"re-run it)")


def _export_step(step_dir: epath.Path, out: epath.Path, model_path: str | None,
                 overwrite: bool, fmt: str = "hf") -> tuple[epath.Path, int]:
    from controller.config import ConfigError, validate_config

    meta = read_meta(step_dir)
    data = dict(meta["config"])
    # The run's own export target is checked to be empty on validation, and was filled by the
    # run itself: it has nothing to do with this export.
    data["run"] = {**data.get("run", {}), "export_hf_dir": None}
    model = dict(data.get("model", {}))
    if model_path is not None:
        model["path"] = model_path
    elif model.get("path") and not (as_path(model["path"]) / "config.json").is_file():
        raise ExportError(
            f"{step_dir} was trained from model.path={model['path']!r}, which no longer holds "
            f"a Hugging Face model; its config.json and tokenizer are needed (fix: pass "
            f"--model-path with a copy of that directory)")
    data["model"] = model_section(model)  # as the run was configured
    try:
        cfg = validate_config(data)
    except ConfigError as e:
        raise ExportError(f"the config recorded in {step_dir / 'meta'} does not validate "
                          f"(written by another Tandem version?): {e}") from None
    if fmt == "peft" and cfg.model.lora is None:
        raise ExportError(f"--format peft writes LoRA adapters, but {step_dir} is a full "
                          f"fine-tuning checkpoint (its model.lora is unset) (fix: drop "
                          f"--format peft to export the whole model)")
    model_dir = stage(cfg.model.path, "model.path") if cfg.model.path else None
    mdef = _model_for(cfg, model_dir)
    policy = lora_model_for(cfg, mdef) if cfg.model.lora is not None else mdef
    shapes = policy.shapes()
    if cfg.model.lora is not None:
        from trainer import lora

        shapes = lora.split(shapes)[1]
    check_shapes(step_dir, shapes)
    try:
        params = restore_params(step_dir, shapes)
    except Exception as e:  # any failure to read means this one is unusable
        from trainer.checkpoint import short_reason

        raise _Unreadable(f"{step_dir / 'state'} is incomplete or corrupt: it does not restore "
                          f"({short_reason(e)})", "pass --step with an earlier checkpoint") from e
    if fmt == "peft":
        path = save_peft_adapters_at(out, policy.spec, params, base_model=cfg.model.path,
                                     overwrite=overwrite)
        return epath.Path(path), int(step_dir.name)
    if cfg.model.lora is not None:
        params = lora.merge(policy.spec, base_params_for(cfg, mdef, model_dir), params)
    path = save_hf_model_at(out, mdef.spec, params, source_dir=model_dir, overwrite=overwrite)
    return epath.Path(path), int(step_dir.name)


def cmd_export(ns: argparse.Namespace) -> int:
    from controller.cli.args import fail, input_errors

    try:
        path, step = export_checkpoint(ns.checkpoint, ns.out_dir, step=ns.step,
                                       model_path=ns.model_path, overwrite=ns.overwrite,
                                       fmt=ns.format)
    except ExportError as e:  # before JAX when the path is wrong
        return fail(e)
    except Exception as e:  # the recorded config, model directory or tokenizer files
        if isinstance(e, input_errors()):
            return fail(e)
        raise
    if ns.format == "peft":
        print(f"exported the adapters of step {step} to {path} (load them with "
              f"peft.PeftModel.from_pretrained(base_model, {str(path)!r}))")
    else:
        print(f"exported the checkpoint of step {step} to {path} (load it with "
              f"transformers.AutoModelForCausalLM.from_pretrained({str(path)!r}) or vLLM)")
    return 0


def add_export_parser(sub: Any) -> None:
    p = sub.add_parser(
        "export", help="write a checkpoint as a Hugging Face model directory",
        description="Write a Tandem checkpoint's policy as a Hugging Face directory that "
        "transformers and vLLM load. CHECKPOINT is a run's output directory, its checkpoints/ "
        "directory (the newest step that restores) or one step directory.",
    )
    p.add_argument("checkpoint", help="run output dir, checkpoint dir, or <checkpoints>/<step>")
    p.add_argument("out_dir", help="the Hugging Face directory to write (new or empty)")
    p.add_argument("--step", type=int, default=None, help="export this step (default: newest)")
    p.add_argument("--model-path", default=None,
                   help="the HF directory the run started from, if its model.path moved")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty out_dir")
    p.add_argument("--format", choices=("hf", "peft"), default="hf",
                   help="hf: the whole model (a LoRA run's adapters merged into its base); "
                        "peft: a LoRA run's adapters (adapter_config.json, "
                        "adapter_model.safetensors)")
    p.add_argument("--merge", dest="format", action="store_const", const="hf",
                   help="the whole model with a LoRA run's adapters merged (--format hf)")
    p.set_defaults(func=cmd_export)
