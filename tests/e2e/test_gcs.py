"""Jobs that keep everything in a bucket (a GCS emulator on loopback), as on Cloud TPU:
metrics, trace, config, checkpoints, a kill -9 and an exact resume from the bucket, an export
from bucket to bucket, and a model and data file read from the bucket."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.gcs_emulator import BUCKET, forget_listings

from controller.config import as_path
from controller.topology import simulation_env

pytestmark = [pytest.mark.e2e,  # each test runs whole jobs
              pytest.mark.timeout(360)]  # a stalled emulator fails these, not the whole run

ROOT = Path(__file__).parents[2]
SMALL = ["data.prompts_per_step=4", "sampling.group_size=4", "run.progress=false"]
TIMING = ("time/", "throughput/", "reshard/gbps", "reshard/seconds", "timeline/",
          "rewards/call_s", "status/", "compile", "sampler/compiles")


def _env(gcs, **extra: str) -> dict[str, str]:
    return {**os.environ, **simulation_env(8), **gcs.env, **extra}


def _tandem(gcs, *args: str, env: dict[str, str] | None = None, timeout: float = 240
            ) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "controller.cli", *args], cwd=ROOT,
                         env=env or _env(gcs), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


def _rows(text: str) -> list[dict]:
    return [json.loads(x) for x in text.splitlines() if x.strip()]


def _untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items()
             if not k.startswith(TIMING) and not k.split("/")[-1].endswith("_s")} for r in rows]


def _checkpoint_steps(directory) -> list[int]:
    """Committed checkpoints: on GCS orbax writes commit_success.txt when a step is complete."""
    forget_listings()  # the job, another process, writes there
    if not directory.exists():
        return []
    return sorted(int(p.name) for p in directory.iterdir()
                  if p.name.isdigit() and (p / "commit_success.txt").exists())


def test_run_in_a_bucket_killed_resumes_exactly_and_exports_bucket_to_bucket(gcs, tmp_path):
    n = 8
    common = [*SMALL, f"run.steps={n}", "checkpoint.every_steps=2"]
    local = tmp_path / "local"
    _tandem(gcs, "run", *common, f"run.output_dir={local}")

    url = f"gs://{BUCKET}/runs/killed"
    cache = f"gs://{BUCKET}/xla-cache"
    env = _env(gcs, JAX_COMPILATION_CACHE_DIR="")  # run.compile_cache_dir decides
    proc = subprocess.Popen(
        [sys.executable, "-m", "controller.cli", "run", *common, f"run.output_dir={url}",
         f"run.compile_cache_dir={cache}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoints = as_path(url) / "checkpoints"
    deadline = time.monotonic() + 600
    while not [s for s in _checkpoint_steps(checkpoints) if s >= 2]:
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        assert time.monotonic() < deadline, "no checkpoint reached the bucket"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)  # from outside, mid-run: no handler, no cleanup
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed = _checkpoint_steps(checkpoints)
    assert killed and max(killed) < n, killed
    assert not (Path.cwd() / "gs:").exists() and not (ROOT / "gs:").exists()  # nothing local

    out = _tandem(gcs, "run", *common, f"run.output_dir={url}", "run.resume=true",
                  f"run.compile_cache_dir={cache}", f"run.export_hf_dir=gs://{BUCKET}/final-hf",
                  env=env)
    assert "resum" in (out.stdout + out.stderr).lower()
    forget_listings()
    bucket = as_path(url)
    want = _untimed(_rows((local / "metrics.jsonl").read_text()))
    got = _untimed(_rows((bucket / "metrics.jsonl").read_text()))
    assert [r["step"] for r in got] == list(range(0, n + 1))  # the baseline eval, every step
    # exactly once
    assert got == want  # the resumed trajectory is the uninterrupted one, bit for bit
    assert json.loads((bucket / "trace.json").read_text())["traceEvents"]
    assert "output_dir: gs://" in (bucket / "config.yaml").read_text()
    assert n in _checkpoint_steps(checkpoints)
    assert any(as_path(cache).iterdir())  # JAX's compile cache wrote to the bucket

    _tandem(gcs, "export", url, f"gs://{BUCKET}/exports/killed")
    _tandem(gcs, "export", str(local), str(tmp_path / "local-hf"))
    forget_listings()
    exported = as_path(f"gs://{BUCKET}/exports/killed")
    weights = (tmp_path / "local-hf" / "model.safetensors").read_bytes()
    assert (exported / "model.safetensors").read_bytes() == weights
    assert as_path(f"gs://{BUCKET}/final-hf/model.safetensors").read_bytes() == weights
    assert json.loads((exported / "config.json").read_text()) == json.loads(
        (tmp_path / "local-hf" / "config.json").read_text())


def test_model_and_data_read_from_a_bucket(gcs, tmp_path):
    from helpers.hf_fixtures import write_tiny_hf_model

    from controller.storage import upload_dir

    model = write_tiny_hf_model("qwen2", tmp_path / "qwen2")
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "target": str(2 * a)}) + "\n"
                            for a in range(12)))
    upload_dir(model, as_path(f"gs://{BUCKET}/models/qwen2"))
    as_path(f"gs://{BUCKET}/data/prompts.jsonl").write_text(data.read_text())

    common = [*SMALL, "run.steps=2", "data.task=jsonl", "rewards.functions=[gsm8k]",
              "sampling.max_new_tokens=8"]
    staging = tmp_path / "staged"
    env = _env(gcs, TANDEM_STAGING_DIR=str(staging))
    _tandem(gcs, "run", *common, f"model.path={model}", f"data.path={data}",
            f"run.output_dir={tmp_path / 'local'}", env=env)
    out = _tandem(gcs, "run", *common, f"model.path=gs://{BUCKET}/models/qwen2",
                  f"data.path=gs://{BUCKET}/data/prompts.jsonl",
                  f"run.output_dir={tmp_path / 'remote'}", env=env)
    assert "model.path" in out.stderr and "copied from gs://" in out.stderr  # said once
    staged = sorted(p.name for p in staging.rglob("*") if p.is_file()
                    and not p.name.startswith("."))
    assert "model.safetensors" in staged and "tokenizer.json" in staged
    assert "prompts.jsonl" in staged
    want = _untimed(_rows((tmp_path / "local" / "metrics.jsonl").read_text()))
    got = _untimed(_rows((tmp_path / "remote" / "metrics.jsonl").read_text()))
    assert got == want
