import subprocess
import sys

import pytest

from controller.config import ConfigError, JobConfig, load_config


def test_defaults_validate_and_are_frozen():
    cfg = JobConfig()
    assert cfg.sampling.group_size == 8
    with pytest.raises(ValueError, match="frozen"):
        cfg.sampling.group_size = 4  # frozen


def test_overrides_parse_yaml_values():
    cfg = load_config(overrides=["run.steps=7", "optimizer.learning_rate=1e-3",
                                 "rewards.functions=[reverse_digits]", "run.progress=false"])
    assert cfg.run.steps == 7
    assert cfg.optimizer.learning_rate == pytest.approx(1e-3)
    assert cfg.run.progress is False


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("run:\n  steps: 11\nsampling:\n  group_size: 4\n")
    cfg = load_config(path, ["run.steps=12"])
    assert (cfg.run.steps, cfg.sampling.group_size) == (12, 4)


def test_unknown_key_names_field_and_suggests_fix():
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["sampling.temprature=0.5"])
    msg = str(e.value)
    assert "sampling.temprature" in msg and "unknown key" in msg
    assert "did you mean sampling.temperature" in msg


def test_unknown_section():
    with pytest.raises(ConfigError, match="samplr: unknown key"):
        load_config(overrides=["samplr.group_size=4"])


def test_out_of_range_names_value_and_fix():
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["sampling.temperature=-1"])
    msg = str(e.value)
    assert "sampling.temperature=-1" in msg
    assert "greater than or equal to 0" in msg
    assert "fix: e.g. sampling.temperature=1.0" in msg


def test_wrong_type():
    with pytest.raises(ConfigError, match=r"run.steps='many'.*integer"):
        load_config(overrides=["run.steps=many"])


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="model.num_heads=4 is not a multiple of"):
        load_config(overrides=["model.num_kv_heads=3"])
    with pytest.raises(ConfigError, match="sampling.max_new_tokens=2 is shorter"):
        load_config(overrides=["sampling.max_new_tokens=2"])
    with pytest.raises(ConfigError, match="mesh axes \\['model'\\]"):
        load_config(overrides=["topology.sampler_rules={mlp: model}"])


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="has no '='"):
        load_config(overrides=["run.steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_config_module_does_not_import_jax():
    # The CLI validates configs before JAX starts; importing the config must not start it.
    code = "import sys, controller.config; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_every_example_config_loads():
    from pathlib import Path

    examples = sorted((Path(__file__).parents[3] / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        load_config(path)


def test_yaml_of_a_config_reads_back_equal_with_and_without_model_path(tmp_path):
    """config.yaml in a run directory (and --print-config) is a config a user can run again."""
    model = tmp_path / "hf"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "qwen2"}')
    for overrides in ([], [f"model.path={model}", "model.dtype=bfloat16", "run.steps=7"]):
        cfg = load_config(overrides=overrides)
        file = tmp_path / "config.yaml"
        file.write_text(cfg.to_yaml())
        again = load_config(file)
        assert again == cfg and again.digest() == cfg.digest()
