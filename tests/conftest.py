"""Test setup: 8 simulated CPU devices, set once before JAX is imported."""

import os

os.environ["JAX_PLATFORMS"] = "cpu"
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()
# One persistent compilation cache for this test session (and the CLI runs it starts): jobs
# that build the same programs load them instead of compiling again, and nothing is written
# to the user's ~/.cache/tandem (jobs leave a cache directory JAX already has alone).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="tandem-test-xla-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)  # ~12 MB after a full run
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

from controller.config import JobConfig, ModelConfig  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def eight_devices():
    devices = jax.devices()
    assert len(devices) == 8 and devices[0].platform == "cpu", devices
    return devices


@pytest.fixture(scope="session")
def meshes():
    """Trainer devices[:4] (fsdp), sampler devices[4:] (tp), as the default config splits."""
    from controller.topology import build_meshes

    return build_meshes(JobConfig().topology)


@pytest.fixture(scope="session")
def tokenizer():
    from controller.data.tasks import digits_tokenizer

    return digits_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    """(ModelDef, params): 2 layers, d=32, GQA 4 query / 2 kv heads, q/k/v biases."""
    from trainer.model import ModelSpec, define_model, init_params

    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                      qkv_bias=True)
    spec = ModelSpec.from_config(cfg, tokenizer.vocab_size)
    params = init_params(spec, seed=1)
    # Non-zero biases, so a bias bug cannot hide behind zero init.
    key = jax.random.key(7)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.1 * jax.random.normal(key, x.shape)
        if "bias" in jax.tree_util.keystr(p) else x, params)
    return define_model(spec), params


@pytest.fixture(scope="session")
def gcs():
    """A GCS emulator on loopback (tests/helpers/gcs_emulator.py), started once for the
    session; this process's gcsfs and tensorstore point at it, and `gcs.env` does the same for
    subprocesses. Its bucket is gcs_emulator.BUCKET."""
    from helpers import gcs_emulator

    emulator = gcs_emulator.start()
    gcs_emulator.use_in_this_process(emulator)
    yield emulator
    emulator.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test that used the GCS emulator reports what the emulator printed."""
    report = yield
    emulator = getattr(item, "funcargs", {}).get("gcs")
    if report.failed and emulator is not None:
        report.sections.append(("GCS emulator log (tail)", emulator.log_tail()))
    return report
