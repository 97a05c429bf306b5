"""`tandem submit --dry-run` against the real xpk, offline.

xpk is installed from PyPI into its own virtual environment (never into Tandem's: it has its own
dependency pins) under a cache directory, once per machine; set TANDEM_TEST_XPK to use an xpk
you installed yourself. In its dry run xpk prints the gcloud/kubectl commands it would run
instead of running them, and renders the JobSet manifest it would apply, so no cluster, gcloud,
kubectl or network is needed after the install. Telemetry is off and project/zone are fake.

When the install fails (no package index) the tests skip with the reason, except under CI
(`CI` set), where they fail: CI must exercise the real xpk.
"""

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from controller.config import load_config
from deploy import image as I
from deploy import xpk as X

XPK_VERSION = "1.16.0"  # the version these manifests were checked against
ROOT = Path(__file__).resolve().parents[2]


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tandem-tests" / f"xpk-{XPK_VERSION}-venv"


def _unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the real xpk, but: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def xpk_bin() -> str:
    own = os.environ.get("TANDEM_TEST_XPK")
    if own:
        return own
    venv = _cache_dir()
    exe = venv / "bin" / "xpk"
    done = venv / ".installed"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".xpk-{XPK_VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one installer at a time across processes
        if not done.is_file():
            shutil.rmtree(venv, ignore_errors=True)  # a half-made venv from a killed run
            try:
                subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True,
                               capture_output=True, text=True, timeout=300)
                subprocess.run([str(venv / "bin" / "pip"), "install", "-q",
                                f"xpk=={XPK_VERSION}"], check=True, capture_output=True,
                               text=True, timeout=900)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
                last = (str(getattr(e, "stderr", "") or "").strip().splitlines() or [str(e)])[-1]
                _unavailable(f"could not install xpk=={XPK_VERSION} into {venv}: {last}")
            done.write_text(XPK_VERSION)
    if not exe.is_file():
        _unavailable(f"{exe} is missing after the install")
    return str(exe)


def _dry_run(xpk: str, tmp_path: Path, args: list[str]) -> tuple[dict, str, str]:
    """Runs `tandem submit --dry-run` in a subprocess, as a user would; returns
    (manifest, stdout, stderr). Its cache directory (image model manifests) is
    tmp_path/cache."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    env.update(TELEMETRY_ENABLED="false", HOME=str(tmp_path), PYTHONPATH=str(ROOT),
               PATH=f"{Path(xpk).parent}:/usr/bin:/bin", XDG_CACHE_HOME=str(tmp_path / "cache"))
    proc = subprocess.run(
        [sys.executable, "-m", "controller.cli", "submit", *args, "--xpk", xpk, "--dry-run"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return yaml.safe_load(proc.stdout), proc.stdout, proc.stderr


def _jobs(manifest: dict) -> dict:
    return {j["name"]: j for j in manifest["spec"]["replicatedJobs"]}


def _controller(manifest: dict) -> dict:
    pod = _jobs(manifest)["pathways-head"]["template"]["spec"]["template"]["spec"]
    (ctr,) = [c for c in pod["containers"] if c["name"] == "jax-tpu"]
    return ctr


def _check(manifest: dict, *, workload: str, image: str, cfg, slices: int, chips: int):
    assert manifest["kind"] == "JobSet" and manifest["metadata"]["name"] == workload
    ctr = _controller(manifest)
    assert ctr["image"] == image
    script = ctr["command"][-1]
    # The controller runs `tandem run` on the shipped config, with the Pathways variables.
    assert f"tandem run {X.config_path_in_container(workload)}" in script
    assert "JAX_PLATFORMS=proxy JAX_BACKEND_TARGET=grpc://127.0.0.1:29000" in script
    line = next(ln for ln in script.splitlines() if "tandem run" in ln)
    assert X.decode_shipped_config(line) == cfg.to_yaml()
    env = {e["name"]: e.get("value") for e in ctr["env"]}
    assert env["JAX_PLATFORMS"] == "proxy" and env["JAX_BACKEND_TARGET"].startswith("grpc://")
    # One worker job per slice; xpk's VMs x chips per VM agree with our chip count.
    worker = _jobs(manifest)["worker"]
    assert worker["replicas"] == slices
    wpod = worker["template"]["spec"]
    tpu_per_vm = int(wpod["template"]["spec"]["containers"][0]["resources"]["limits"]
                     ["google.com/tpu"])
    assert wpod["completions"] * tpu_per_vm == chips
    rm_args = next(c for c in _jobs(manifest)["pathways-head"]["template"]["spec"]["template"]
                   ["spec"]["initContainers"] if c["name"] == "pathways-rm")["args"]
    assert f"--instance_count={slices}" in rm_args


def test_single_slice_dry_run(xpk_bin, tmp_path):
    image = "us-docker.pkg.dev/fake-project/tandem/tandem:0.1.0"
    args = ["topology.backend=native", "run.name=GSM8K_Single", "run.steps=3",
            "--cluster", "fake-cluster", "--tpu-type", "v6e-16", "--num-slices", "1",
            "--project", "fake-project", "--zone", "us-east5-b", "--docker-image", image]
    manifest, stdout, stderr = _dry_run(xpk_bin, tmp_path, args)
    cfg = load_config(None, ["topology.backend=native", "run.name=GSM8K_Single", "run.steps=3"])
    _check(manifest, workload="gsm8k-single", image=image, cfg=cfg, slices=1, chips=16)
    assert stdout.startswith("# JobSet manifest")  # stdout is only the manifest
    assert "[XPK] Starting xpk" in stderr and "dry run" in stderr  # xpk's log, streamed
    assert "trainer 8 devices" in stderr and "sampler 8 devices" in stderr
    # The log carries the same manifest (the fallback for an xpk without a manifest file).
    assert yaml.safe_load(X.manifest_from_log(stderr)) == manifest


def test_multi_slice_dry_run(xpk_bin, tmp_path):
    image = "gcr.io/fake-project/tandem@sha256:" + "0" * 64
    overrides = ["topology.backend=native", "run.name=grpo-2slice",
                 "topology.trainer_devices=64"]
    args = [*overrides, "--cluster", "fake-cluster", "--tpu-type", "v5p-128",
            "--num-slices", "2", "--project", "fake-project", "--zone", "us-east5-a",
            "--docker-image", image, "--priority", "high", "--pathways-persistence"]
    manifest, _, stderr = _dry_run(xpk_bin, tmp_path, args)
    cfg = load_config(None, overrides)
    _check(manifest, workload="grpo-2slice", image=image, cfg=cfg, slices=2, chips=64)
    assert "ENABLE_PATHWAYS_PERSISTENCE=1" in _controller(manifest)["command"][-1]
    assert "2 x v5p-128 (64 chips each) = 128 chips" in stderr
    worker_pod = _jobs(manifest)["worker"]["template"]["spec"]["template"]["spec"]
    assert worker_pod["priorityClassName"] == "high"
    assert worker_pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "4x4x4"


def test_model_baked_into_the_image_dry_run(xpk_bin, tmp_path, monkeypatch):
    """model.path inside the image, declared by the record `tandem image build --model` leaves:
    the pod's command carries that path, and only the model fields that were set."""
    image = "us-docker.pkg.dev/fake-project/tandem/tandem:with-qwen"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # where _dry_run looks
    qwen = I.ImageModel("qwen", f"{I.MODELS_DIR}/qwen", "/src/qwen")
    I.write_manifest(image, [qwen], I.manifest_path(image))
    args = ["topology.backend=native", "run.name=baked", f"model.path={qwen.path}",
            "model.dtype=bfloat16", "--cluster", "fake-cluster", "--tpu-type", "v6e-16",
            "--project", "fake-project", "--zone", "us-east5-b", "--docker-image", image]
    manifest, _, stderr = _dry_run(xpk_bin, tmp_path, args)
    assert _controller(manifest)["image"] == image
    line = next(ln for ln in _controller(manifest)["command"][-1].splitlines()
                if "tandem run" in ln)
    shipped = yaml.safe_load(X.decode_shipped_config(line))
    assert shipped["model"] == {"dtype": "bfloat16", "path": "/opt/tandem/models/qwen"}
    assert "model: /opt/tandem/models/qwen (in the image" in stderr
