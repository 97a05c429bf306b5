"""The files and names a job config points at, checked before JAX starts.

`load_config` checks what the config says; `check_run_inputs` checks what it points at on this
machine: the data file, the reward names and files, the model directory's files, and the run
and checkpoint directories. Each check is cheap and certain (a file that is missing or empty, a
name that is not registered), so a bad input costs a second, not a JAX start-up. What needs
more (a reward module that fails on import, rows that do not parse) is found when the job is
built, and the CLI reports those errors the same way.

A gs:// data file or model directory is copied to the local staging cache here (the job reads
that copy) and checked there; a gs:// run or checkpoint directory is listed like a local one.
`tandem run` runs these checks; `tandem submit` does not, since the job runs in a container
whose files may differ. No JAX here: the CLI imports this before JAX starts.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from etils import epath

from controller.config import ConfigError, JobConfig, as_path, is_url
from controller.data.budget import prompt_budget
from controller.storage import stage


def check_run_inputs(cfg: JobConfig) -> None:
    """Raises ConfigError naming the field, the value and a fix for the first bad input."""
    _check_data(cfg)
    _check_rewards(cfg)
    _check_env(cfg)
    if cfg.model.path:
        _check_model_dir(cfg.model.path)
    prompt_budget(cfg)  # prompts + sampling.max_new_tokens within the model's positions
    _check_run_dirs(cfg)
    _check_extras(cfg)
    for field, value in (("status.tls_cert", cfg.status.tls_cert),
                         ("status.tls_key", cfg.status.tls_key)):
        if value is not None and not Path(value).is_file():
            raise ConfigError(f"{field}={value!r} does not exist (fix: point it at a PEM file; "
                              f"{_relative_note()})")


def _check_extras(cfg: JobConfig) -> None:
    """The optional packages the config asks for are installed."""
    if cfg.run.tensorboard and not cfg.run.output_dir:
        raise ConfigError("run.tensorboard=true needs run.output_dir, where the events go (fix: "
                          "e.g. run.output_dir=runs/my-run)")
    needs = [
        (cfg.run.tensorboard, "run.tensorboard=true", "tensorboardX", "tensorboardX"),
        (cfg.run.wandb_project is not None, f"run.wandb_project={cfg.run.wandb_project!r}",
         "wandb", "wandb"),
        (cfg.rewards.backend == "ray", "rewards.backend=ray", "ray", "'tandem-rl[ray]'"),
        (cfg.sampling.backend == "vllm", "sampling.backend=vllm", "vllm", "'tandem-rl[vllm]'"),
        (cfg.data.task == "parquet", "data.task=parquet", "pyarrow", "'tandem-rl[parquet]'"),
    ]
    for wanted, setting, module, package in needs:
        if wanted and importlib.util.find_spec(module) is None:
            raise ConfigError(f"{setting} needs {module}, which is not installed (fix: pip "
                              f"install {package})")


def _relative_note() -> str:
    return f"a relative path is read from the current directory, {Path.cwd()}"


def _check_data(cfg: JobConfig) -> None:
    data = cfg.data
    if data.task not in ("gsm8k", "jsonl", "parquet"):
        return
    if data.path is not None:
        _check_data_file("data.path", data.path, data.task)
    if cfg.eval_enabled and cfg.eval.path is not None:
        _check_data_file("eval.path", cfg.eval.path, data.task)


def _check_data_file(field: str, path: str, task: str) -> None:
    p = stage(path, field)  # a gs:// file is copied to the local cache and read there
    if p.is_dir():
        raise ConfigError(f"{field}={path!r} is a directory (fix: point it at the "
                          f"{task if task != 'gsm8k' else 'jsonl'} file itself)")
    if not p.is_file():
        raise ConfigError(f"{field}={path!r} does not exist (fix: check the path; "
                          f"{_relative_note()})")
    try:
        with open(p, "rb") as f:
            head = f.read(1 << 16)
    except OSError as e:
        raise ConfigError(f"{field}={path!r} cannot be read ({e.strerror}) (fix: make it "
                          f"readable)") from None
    if not head.strip() and p.stat().st_size <= len(head):
        raise ConfigError(f"{field}={path!r} is empty: it has no rows (fix: point it at a "
                          f"file with one JSON object per line, e.g. "
                          f'{{"prompt": "...", "target": "..."}})')


def _check_rewards(cfg: JobConfig) -> None:
    from rewards.base import RewardError
    from rewards.lookup import check_spec
    from rewards.registry import build_specs

    r = cfg.rewards
    try:
        for spec in r.functions:
            check_spec(spec)
        build_specs(r.functions, r.weights, r.kwargs)  # labels: do rewards.kwargs name them?
    except RewardError as e:
        raise ConfigError(str(e)) from None


def _check_env(cfg: JobConfig) -> None:
    """env.name and env.tools name an environment and tools that exist (no user code runs)."""
    if cfg.env.name is None:
        return
    from rewards.base import RewardError
    from rewards.environments import check_environment_spec
    from rewards.lookup import check_attribute_spec

    try:
        check_environment_spec(cfg.env.name)
        for spec in cfg.env.tools:
            check_attribute_spec(spec, "env.tools")
    except RewardError as e:
        raise ConfigError(str(e)) from None


def _check_model_dir(path: str) -> None:
    # The config validator checked that a local config.json exists; a gs:// directory is
    # copied to the local cache (where the job reads it) and checked there.
    p = stage(path, "model.path")
    where = f"model.path={path!r}"
    if not (p / "config.json").is_file():
        raise ConfigError(f"{where} has no config.json (fix: point it at a Hugging Face model "
                          f"directory)")
    try:
        hf = json.loads((p / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{where}: config.json cannot be read ({type(e).__name__}: {e}) "
                          f"(fix: download the model again)") from None
    if not isinstance(hf, dict) or not isinstance(hf.get("model_type"), str):
        raise ConfigError(f"{where}: config.json has no model_type, so the architecture is "
                          f"unknown (fix: use a transformers model directory; Tandem reads "
                          f"Qwen2/2.5, Qwen3, Llama 3 and Gemma 2/3 text models)")
    if not (p / "tokenizer.json").is_file():
        raise ConfigError(f"{where} has no tokenizer.json (fix: download the model's tokenizer "
                          f"files too; a slow-only tokenizer can be converted with "
                          f"transformers: AutoTokenizer.from_pretrained(dir).save_pretrained(dir))")
    index = p / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"{where}: {index.name} cannot be read ({type(e).__name__}: "
                              f"{e}) (fix: download the model again)") from None
        missing = sorted(s for s in shards if not (p / s).is_file())
        if missing:
            raise ConfigError(f"{where}: {index.name} lists weight files that are missing: "
                              f"{missing[:4]} (fix: download the complete checkpoint)")
    elif not (p / "model.safetensors").is_file():
        bins = sorted(x.name for x in p.glob("*.bin"))[:2]
        found = f" (it has {bins})" if bins else ""
        raise ConfigError(
            f"{where} has no weights: neither model.safetensors nor {index.name}{found} (fix: "
            f"Tandem reads safetensors only; convert with transformers: "
            f"AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir))")


def _step_dirs(directory: epath.Path) -> list[int]:
    """Steps of the complete checkpoints in `directory` (orbax renames `<step>.orbax-...-tmp`
    to `<step>` once a save is complete; on GCS it writes `<step>` in place and adds
    commit_success.txt last)."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir()
                  and (not is_url(p) or (p / "commit_success.txt").exists()))


def _check_run_dirs(cfg: JobConfig) -> None:
    for field, value in (("run.output_dir", cfg.run.output_dir),
                         ("checkpoint.dir", cfg.checkpoint.dir)):
        if value is None or is_url(value):
            continue  # a bucket prefix need not exist before the first write
        p = Path(value)
        if p.exists() and not p.is_dir():
            raise ConfigError(f"{field}={value!r} is a file, not a directory (fix: choose a "
                              f"directory, e.g. {field}=runs/my-run)")
        existing = next((q for q in (p, *p.parents) if q.exists()), None)
        if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"{field}={value!r}: {existing} is not writable (fix: choose a "
                              f"directory you can write, e.g. {field}=runs/my-run)")
    directory = cfg.checkpoint_dir
    field = "checkpoint.dir" if cfg.checkpoint.dir else "run.output_dir"
    if directory is None:
        if cfg.run.resume:
            raise ConfigError("run.resume=true but there is no checkpoint directory (fix: set "
                              "run.output_dir or checkpoint.dir to the run to resume)")
        return
    steps = _step_dirs(as_path(directory))
    value = cfg.checkpoint.dir or cfg.run.output_dir
    if cfg.run.resume:
        if not steps:
            aside = sorted(q.name for q in as_path(directory).glob("corrupt-*"))
            note = f"; {', '.join(aside)} were set aside as unreadable" if aside else ""
            raise ConfigError(
                f"run.resume=true but {field}={value!r} holds no checkpoint to resume "
                f"({directory} has none{note}) (fix: drop run.resume=true to start a new run "
                f"there, or set {field} to the run to continue)")
        return
    metrics = as_path(cfg.run.output_dir or directory) / "metrics.jsonl"
    if steps or (metrics.is_file() and metrics.stat().length):
        held = f"checkpoints of steps {steps}" if steps else f"{metrics.name}"
        raise ConfigError(
            f"{field}={value!r} already holds a run ({held}); nothing is overwritten (fix: "
            f"run.resume=true to continue it, or a new {field})")
