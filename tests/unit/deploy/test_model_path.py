"""`tandem submit` and model.path: the pod reads gs:// or a model declared in its image, never a
path on the submitting machine. Run through `tandem submit --print-command`, as a user would."""

import shlex

import pytest
import yaml

from controller.cli import main
from controller.config import load_config, validate_config
from deploy import image as I
from deploy import xpk as X

IMAGE = "us-docker.pkg.dev/p1/r/tandem:0.1.0"
FIX = ("upload it to a bucket and set model.path=gs://..., or bake it into the image with "
       "`tandem image build --model DIR`")


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Image manifests are looked for in a fresh cache directory, never the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _submit(capsys, *args, image=IMAGE):
    """`tandem submit --print-command` -> (exit code, the shipped config or None, stderr)."""
    rc = main(["submit", "topology.backend=native", *args, "--cluster", "c1", "--tpu-type",
               "v5p-8", "--docker-image", image, "--print-command"])
    out, err = capsys.readouterr()
    if rc != 0:
        return rc, None, err
    argv = shlex.split(out.strip())
    command = next(a for a in argv if a.startswith("--command=")).removeprefix("--command=")
    return rc, yaml.safe_load(X.decode_shipped_config(command)), err


def _record(image, *names):
    """What `tandem image build --tag image --model DIR...` records after a build."""
    models = [I.ImageModel(n, f"{I.MODELS_DIR}/{n}", f"/src/{n}") for n in names]
    return I.write_manifest(image, models, I.manifest_path(image))


def test_gs_path_is_shipped_unchanged(capsys):
    rc, shipped, err = _submit(capsys, "model.path=gs://bucket/models/qwen2.5-0.5b",
                               "model.dtype=bfloat16")
    assert rc == 0, err
    # Only what differs from the defaults: the pod's validator refuses shape fields beside path.
    assert shipped["model"] == {"dtype": "bfloat16", "path": "gs://bucket/models/qwen2.5-0.5b"}
    assert "model: gs://bucket/models/qwen2.5-0.5b (read from the bucket" in err


@pytest.mark.parametrize("exists", [True, False])
def test_local_path_is_refused_with_the_fix(capsys, tmp_path, exists):
    local = tmp_path / "qwen"
    if exists:  # a real model here is no better: the pod cannot see this machine
        local.mkdir()
        (local / "config.json").write_text("{}")
    rc, _, err = _submit(capsys, f"model.path={local}")
    assert rc == 2
    assert f"model.path={str(local)!r} is a path on this machine" in err and FIX in err


@pytest.mark.parametrize("path", ["relative/model", "~/models/qwen", "/opt/tandem/other"])
def test_relative_home_and_non_model_dirs_are_local(capsys, path):
    _record(IMAGE, "qwen")
    rc, _, err = _submit(capsys, f"model.path={path}")
    assert rc == 2 and f"model.path={path!r} is a path on this machine" in err and FIX in err


def test_other_url_schemes_are_refused(capsys):
    rc, _, err = _submit(capsys, "model.path=s3://bucket/m")
    assert rc == 2 and "not from s3://" in err and FIX in err


def test_declared_in_image_path_is_accepted(capsys):
    m = _record(IMAGE, "qwen", "llama")
    rc, shipped, err = _submit(capsys, "model.path=/opt/tandem/models/llama/")
    assert rc == 0, err
    assert shipped["model"] == {"path": "/opt/tandem/models/llama"}  # normalized
    assert f"model: /opt/tandem/models/llama (in the image; declared by {m.file})" in err
    assert "warning" not in err


def test_undeclared_in_image_path_is_refused(capsys):
    m = _record(IMAGE, "qwen")
    rc, _, err = _submit(capsys, "model.path=/opt/tandem/models/llama")
    assert rc == 2
    assert (f"model.path='/opt/tandem/models/llama' is not a model of --docker-image={IMAGE}: "
            f"{m.file} declares /opt/tandem/models/qwen") in err
    assert f"tandem image build --tag {IMAGE} --model DIR" in err


def test_in_image_path_without_a_record_is_refused(capsys):
    _record("us-docker.pkg.dev/p1/r/tandem:0.0.9", "qwen")  # another tag's record
    rc, _, err = _submit(capsys, "model.path=/opt/tandem/models/qwen")
    assert rc == 2
    assert f"no models are recorded for --docker-image={IMAGE} on this machine" in err
    assert str(I.manifest_path(IMAGE)) in err and "--image-models FILE" in err


def test_image_models_flag_names_the_manifest(capsys, tmp_path):
    f = tmp_path / "models.json"
    I.write_manifest(IMAGE, [I.ImageModel("qwen", "/opt/tandem/models/qwen", "/src")], f)
    rc, shipped, err = _submit(capsys, "model.path=/opt/tandem/models/qwen",
                               "--image-models", str(f))
    assert rc == 0 and shipped["model"]["path"] == "/opt/tandem/models/qwen", err
    # The same manifest for an image pushed under another name: accepted, with a warning.
    rc, _, err = _submit(capsys, "model.path=/opt/tandem/models/qwen", "--image-models",
                         str(f), image="gcr.io/p1/tandem@sha256:" + "0" * 64)
    assert rc == 0 and f"warning: {f} was recorded for {IMAGE}" in err
    # A named manifest that is missing is an error even when no model.path needs it.
    rc, _, err = _submit(capsys, "--image-models", str(tmp_path / "none.json"))
    assert rc == 2 and "--image-models=" in err and "does not exist" in err


def test_shape_fields_beside_model_path_are_still_refused(capsys):
    rc, _, err = _submit(capsys, "model.path=gs://b/m", "model.hidden_size=128")
    assert rc == 2
    assert ("model.path='gs://b/m' defines the model, but model.hidden_size is also set "
            "(fix: drop model.hidden_size)") in err


def test_other_config_errors_are_reported_as_before(capsys):
    rc, _, err = _submit(capsys, "model.path=gs://b/m", "model.pth=x")
    assert rc == 2 and "model.pth" in err


def test_shipped_config_reloads_to_the_same_config(tmp_path):
    """What the pod's `tandem run` reads validates to the config that was checked (the model is
    at that path in the pod; here a local stand-in)."""
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    cfg = load_config(None, ["topology.backend=native", f"model.path={model}",
                             "model.dtype=bfloat16", "run.steps=7"])
    shipped = yaml.safe_load(_shipped(cfg))
    assert shipped["model"] == {"dtype": "bfloat16", "path": str(model)}
    assert validate_config(shipped) == cfg
    # Without model.path the full resolved config is shipped, as before.
    plain = load_config(None, ["topology.backend=native"])
    assert _shipped(plain) == plain.to_yaml()


def _shipped(cfg) -> str:
    """The config YAML inside the command xpk runs in the pod."""
    return X.decode_shipped_config(X.container_command(
        cfg, "w", backend_target=X.DEFAULT_BACKEND_TARGET, persistence=False))


def test_build_spec_refuses_a_local_model_path(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    cfg = load_config(None, ["topology.backend=native", f"model.path={model}"])
    with pytest.raises(X.SubmitError, match="is a path on this machine"):
        X.build_spec(cfg, cluster="c1", tpu_type="v5p-8", num_slices=1, docker_image=IMAGE)
