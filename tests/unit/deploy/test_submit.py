"""`tandem submit` and `tandem image build` without a cluster: names, TPU types, the device split
against the slices, the shipped command, the missing-xpk and missing-docker messages."""

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from controller.cli import main
from controller.config import JobConfig, load_config
from deploy import image as I
from deploy import xpk as X

NATIVE = ["topology.backend=native"]


def _cfg(*overrides):
    return load_config(None, [*NATIVE, *overrides])


# ------------------------------------------------------------------------------ TPU types


@pytest.mark.parametrize("name, chips, devices", [
    ("v5p-8", 4, 4),          # v5p names count TensorCores: 2 per chip; megacore: 1 device/chip
    ("v5p-128", 64, 64),
    ("v5p-4x4x4", 64, 64),    # the topology form: 4*4*4 chips
    ("v4-32", 16, 16),
    ("v6e-16", 16, 16),       # v6e and v5e names count chips
    ("v6e-256", 256, 256),
    ("v5litepod-16", 16, 16),
    ("tpu7x-64", 32, 64),     # Ironwood: 2 TensorCores per chip, no megacore: 2 devices/chip
])
def test_tpu_type_chips_and_devices(name, chips, devices):
    t = X.parse_tpu_type(name)
    assert (t.chips, t.devices) == (chips, devices)


@pytest.mark.parametrize("name, needle", [
    ("v5e-16", "--tpu-type=v5litepod-16"),
    ("v5p-7", "not a whole number of chips"),
    ("h100-8", "unknown TPU generation"),
    ("v5p", "expected GENERATION-SIZE"),
])
def test_bad_tpu_type(name, needle):
    with pytest.raises(X.SubmitError) as e:
        X.parse_tpu_type(name)
    assert needle in str(e.value)


# ------------------------------------------------------------------------------ device split


def test_split_on_one_and_two_slices():
    plan = X.plan_devices(_cfg(), X.parse_tpu_type("v5p-128"), 1)
    assert (plan.total, plan.trainer, plan.sampler) == (64, 32, 32)
    assert plan.sampler_shape == (1, 32) and not plan.warnings
    plan = X.plan_devices(_cfg("topology.trainer_devices=64"), X.parse_tpu_type("v5p-128"), 2)
    assert (plan.total, plan.trainer, plan.sampler) == (128, 64, 64)
    assert plan.trainer_shape == (64,) and not plan.warnings  # one whole slice per side


def test_split_larger_than_the_slices_names_both_numbers():
    with pytest.raises(X.SubmitError) as e:
        X.plan_devices(_cfg("topology.trainer_devices=100"), X.parse_tpu_type("v5p-128"), 1)
    msg = str(e.value)
    assert "topology.trainer_devices=100" in msg and "out of 64" in msg and "v5p-128" in msg


def test_mesh_that_does_not_divide_the_devices_names_both_numbers():
    # 12 trainer devices of a v6e-16 cannot be laid out as fsdp=8 x -1.
    cfg = _cfg("topology.trainer_devices=12", "topology.trainer_mesh={fsdp: 8, tp: -1}",
               "topology.trainer_rules={embed: fsdp}")
    with pytest.raises(X.SubmitError) as e:
        X.plan_devices(cfg, X.parse_tpu_type("v6e-16"), 1)
    assert "product 8" in str(e.value) and "12 trainer device(s)" in str(e.value)
    # The same config fits two slices' worth of sampler devices once the trainer is 8.
    ok = X.plan_devices(cfg.model_copy(update={"topology": cfg.topology.model_copy(
        update={"trainer_devices": 8})}), X.parse_tpu_type("v6e-16"), 1)
    assert ok.trainer_shape == (8, 1)


def test_split_across_a_slice_boundary_warns():
    plan = X.plan_devices(_cfg("topology.trainer_devices=96"), X.parse_tpu_type("v5p-128"), 2)
    assert plan.sampler == 32
    assert plan.warnings and "topology.trainer_devices=64" in plan.warnings[0]


def test_cpu_sim_config_is_refused():
    with pytest.raises(X.SubmitError, match="topology.backend=native"):
        X.plan_devices(load_config(), X.parse_tpu_type("v5p-8"), 1)


# ------------------------------------------------------------------------------ names


@pytest.mark.parametrize("run_name, expected", [
    ("tandem", "tandem"),
    ("My_Run.v2", "my-run-v2"),
    ("7b-grpo", "tandem-7b-grpo"),  # must start with a letter
    ("a" * 60, "a" * 40),
    ("gsm8k--qwen__0.5b-", "gsm8k-qwen-0-5b"),
])
def test_workload_name_from_run_name(run_name, expected):
    name = X.workload_name(_cfg(f"run.name={run_name}"))
    assert name == expected
    assert X.NAME_RE.match(name) and len(name) <= 40


@pytest.mark.parametrize("bad", ["Upper", "under_score", "-lead", "trail-", "9lives", "a" * 41,
                                 "dot.ted", ""])
def test_invalid_names_are_rejected_with_a_fix(bad):
    with pytest.raises(X.SubmitError) as e:
        X.validate_name(bad, "--workload")
    msg = str(e.value)
    assert f"--workload={bad!r}" in msg and "fix: e.g. --workload=" in msg
    suggested = msg.rsplit("--workload=", 1)[1].rstrip(")")
    assert X.NAME_RE.match(suggested) and len(suggested) <= 40


def test_explicit_workload_and_cluster_are_validated():
    with pytest.raises(X.SubmitError, match="--cluster='My Cluster'"):
        X.build_spec(_cfg(), cluster="My Cluster", tpu_type="v5p-8", num_slices=1,
                     docker_image="img:1")
    spec = X.build_spec(_cfg(), cluster="c1", tpu_type="v5p-8", num_slices=1,
                        docker_image="img:1", workload="grpo-try-3")
    assert spec.workload == "grpo-try-3"


# ------------------------------------------------------------------------------ the command


def test_shipped_command_runs_the_exact_config(tmp_path):
    """Run the container command with bash, as the pod does, with a `tandem` that records what
    it was given: the config it reads is byte for byte the one that was validated."""
    cfg = _cfg("run.name=ship-test", "run.steps=7", "sampling.group_size=4")
    workload = f"ship-test-{os.getpid()}"
    cmd = X.container_command(cfg, workload, backend_target="grpc://127.0.0.1:29000",
                              persistence=True)
    assert X.decode_shipped_config(cmd) == cfg.to_yaml()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "tandem").write_text(
        "#!/bin/sh\n"
        'echo "ENV $JAX_PLATFORMS $JAX_BACKEND_TARGET $ENABLE_PATHWAYS_PERSISTENCE"\n'
        'echo "ARGS $*"\n'
        'cat "$2"\n')
    (bindir / "tandem").chmod(0o755)
    env = {"PATH": f"{bindir}:/usr/bin:/bin"}
    try:
        out = subprocess.run(["bash", "-c", f"({cmd})"], env=env, capture_output=True,
                             text=True, timeout=30, check=True).stdout
    finally:
        shutil.rmtree(Path(X.config_path_in_container(workload)).parent, ignore_errors=True)
    lines = out.splitlines()
    assert lines[0] == "ENV proxy grpc://127.0.0.1:29000 1"
    assert lines[1] == f"ARGS run {X.config_path_in_container(workload)}"
    shipped = "\n".join(lines[2:]) + "\n"
    assert shipped == cfg.to_yaml()
    assert JobConfig.model_validate(yaml.safe_load(shipped)) == cfg


def test_print_command_is_a_runnable_xpk_line(capsys):
    rc = main(["submit", *NATIVE, "run.name=Demo_Run", "--cluster", "c1", "--tpu-type",
               "v5p-128", "--num-slices", "2", "--project", "p1", "--zone", "us-east5-a",
               "--docker-image", "us-docker.pkg.dev/p1/r/tandem:0.1.0", "--priority", "high",
               "--xpk-arg=--pathways-gcs-location=gs://b/pw", "--print-command"])
    out, err = capsys.readouterr()
    assert rc == 0
    argv = shlex.split(out.strip())
    assert argv[:3] == ["xpk", "workload", "create-pathways"]
    for flag in ("--workload=demo-run", "--cluster=c1", "--project=p1", "--zone=us-east5-a",
                 "--tpu-type=v5p-128", "--num-slices=2", "--priority=high",
                 "--docker-image=us-docker.pkg.dev/p1/r/tandem:0.1.0", "--pathways-gcs-location=gs://b/pw"):
        assert flag in argv, flag
    command = next(a for a in argv if a.startswith("--command=")).removeprefix("--command=")
    assert "JAX_PLATFORMS=proxy JAX_BACKEND_TARGET=grpc://127.0.0.1:29000" in command
    assert "tandem run /tmp/tandem/demo-run/config.yaml" in command
    assert yaml.safe_load(X.decode_shipped_config(command))["run"]["name"] == "Demo_Run"
    assert "2 x v5p-128 (64 chips each) = 128 chips" in err
    assert "trainer 64 devices mesh(fsdp=64) | sampler 64 devices mesh(dp=1, tp=64)" in err


def test_submit_reports_a_bad_split_before_looking_for_xpk(capsys):
    rc = main(["submit", *NATIVE, "topology.trainer_devices=9", "--cluster", "c1",
               "--tpu-type", "v6e-8", "--docker-image", "img:1", "--xpk", "/nonexistent/xpk"])
    err = capsys.readouterr().err
    assert rc == 2 and "topology.trainer_devices=9" in err and "out of 8" in err
    assert "xpk not found" not in err and "/nonexistent/xpk" not in err


# ------------------------------------------------------------------------------ finding xpk


def test_missing_xpk_says_how_to_install_it(tmp_path):
    with pytest.raises(X.XpkNotFoundError) as e:
        X.find_xpk(None, environ={"PATH": str(tmp_path)})
    msg = str(e.value)
    assert "xpk not found" in msg and "pip install xpk" in msg and "TANDEM_XPK" in msg
    with pytest.raises(X.XpkNotFoundError, match=r"\$TANDEM_XPK='/no/such/xpk'"):
        X.find_xpk(None, environ={"PATH": str(tmp_path), "TANDEM_XPK": "/no/such/xpk"})


def test_xpk_is_found_by_flag_env_and_path(tmp_path):
    exe = tmp_path / "xpk"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    assert X.find_xpk(str(exe), environ={"PATH": ""}) == str(exe)
    assert X.find_xpk(None, environ={"PATH": "", "TANDEM_XPK": str(exe)}) == str(exe)
    assert X.find_xpk(None, environ={"PATH": str(tmp_path)}) == str(exe)


def test_submit_without_xpk_fails_with_the_install_hint(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("TANDEM_XPK", raising=False)
    rc = main(["submit", *NATIVE, "--cluster", "c1", "--tpu-type", "v5p-8",
               "--docker-image", "img:1", "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and "error: xpk not found" in err and "pip install xpk" in err


def test_manifest_is_read_from_an_xpk_log():
    log = ("[XPK] Starting xpk v1.16.0\n"
           "[XPK] Temp file (ab12) content: \n"
           "apiVersion: jobset.x-k8s.io/v1alpha2\nkind: JobSet\nmetadata:\n  name: w\n\n"
           "[XPK] Task: `Creating Workload` is implemented by ...\n")
    assert yaml.safe_load(X.manifest_from_log(log))["metadata"]["name"] == "w"
    assert X.manifest_from_log("[XPK] nothing here\n") is None


# ------------------------------------------------------------------------------ image build


def test_image_build_print_command(capsys):
    rc = main(["image", "build", "--tag", "reg/tandem:t1", "--push", "--vllm-tpu",
               "--print-command"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    build = shlex.split(lines[0])
    assert build[:2] == ["docker", "build"] and build[-1] == str(I.REPO_ROOT)
    assert build[build.index("-f") + 1] == str(I.DOCKERFILE) and I.DOCKERFILE.is_file()
    assert "WITH_VLLM_TPU=1" in build and "reg/tandem:t1" in build
    assert shlex.split(lines[1]) == ["docker", "push", "reg/tandem:t1"]


def test_image_build_without_docker(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    rc = main(["image", "build", "--tag", "t"])
    assert rc == 2 and "docker not found" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker client installed")
def test_image_build_with_an_unreachable_daemon(capsys, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/tandem-test-docker.sock")
    rc = main(["image", "build", "--tag", "t"])
    err = capsys.readouterr().err
    assert rc == 2 and "docker daemon is not reachable" in err and "fix:" in err


def test_dockerfile_pins_and_entrypoint():
    # The pins themselves (base digest, lock, user) are checked in test_image.py.
    text = I.DOCKERFILE.read_text()
    assert "FROM python:3.11-slim-bookworm@sha256:" in text
    assert "-r deploy/requirements.lock" in text and "install --no-deps" in text
    assert 'ENTRYPOINT ["tandem", "run"]' in text
    # Every package directory the project installs is copied into the image.
    import tomllib

    pyproject = tomllib.loads((I.REPO_ROOT / "pyproject.toml").read_text())
    for pkg in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert f"COPY {pkg.rstrip('*')} " in text, pkg
    assert "tpu" in pyproject["project"]["optional-dependencies"]


def test_dry_run_falls_back_to_the_log_for_an_xpk_without_manifest_files(tmp_path):
    """Our retry logic only (the real xpk is exercised in tests/integration/test_xpk_dryrun.py):
    an xpk that rejects --output-manifest-file is run again without it, manifest from its log."""
    fake = tmp_path / "old-xpk"
    fake.write_text(
        "#!/bin/sh\n"
        'case "$*" in *--output-manifest-file*)\n'
        '  echo "xpk: error: unrecognized arguments: --output-manifest-file=x" >&2; exit 2;;\n'
        "esac\n"
        'echo "[XPK] Temp file (0a1b) content: "\n'
        'printf "kind: JobSet\\nmetadata:\\n  name: old\\n"\n'
        'echo "[XPK] Exiting XPK cleanly"\n')
    fake.chmod(0o755)
    spec = X.build_spec(_cfg("run.name=old"), cluster="c1", tpu_type="v5p-8", num_slices=1,
                        docker_image="img:1")
    log = tmp_path / "log.txt"
    with log.open("w") as f:
        rc, manifest = X.submit_streaming(spec, str(fake), dry_run=True, log=f)
    assert rc == 0 and yaml.safe_load(manifest)["metadata"]["name"] == "old"
    assert "unrecognized arguments" in log.read_text()  # both runs were streamed
