"""run.compile_cache_dir: how a job sets up JAX's persistent compilation cache."""

import jax
import pytest

from controller.startup import MIN_COMPILE_S, configure_compile_cache


@pytest.fixture
def jax_cache_unset():
    """JAX with no cache directory and the default minimum compile time; restored after."""
    saved = (jax.config.jax_compilation_cache_dir,
             jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    yield
    jax.config.update("jax_compilation_cache_dir", saved[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", saved[1])


def test_sets_jax_cache_dir_and_creates_it(jax_cache_unset, tmp_path):
    want = tmp_path / "nested" / "xla"
    assert configure_compile_cache(str(want)) == str(want)
    assert want.is_dir()
    assert jax.config.jax_compilation_cache_dir == str(want)
    # Programs compiling in 0.2 s or more are kept (JAX's default, 1 s, skips the initialisers).
    assert jax.config.jax_persistent_cache_min_compile_time_secs == MIN_COMPILE_S


def test_expands_the_home_directory(jax_cache_unset, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert configure_compile_cache("~/.cache/tandem/xla") == str(tmp_path / ".cache/tandem/xla")


def test_null_leaves_jax_alone(jax_cache_unset):
    assert configure_compile_cache(None) is None
    assert jax.config.jax_compilation_cache_dir is None
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 1.0


def test_a_directory_the_user_gave_jax_wins(jax_cache_unset, tmp_path):
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "theirs"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 5.0)
    assert configure_compile_cache(str(tmp_path / "ours")) == str(tmp_path / "theirs")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "theirs")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 5.0
    assert not (tmp_path / "ours").exists()


def test_an_uncreatable_directory_warns_and_runs_without_cache(jax_cache_unset, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.warns(UserWarning, match=r"run.compile_cache_dir=.*cannot be created.*fix"):
        assert configure_compile_cache(str(blocker / "xla")) is None
    assert jax.config.jax_compilation_cache_dir is None


def test_default_dir_matches_the_config_and_pathways_needs_an_explicit_one():
    from controller.config import JobConfig
    from controller.startup import DEFAULT_DIR, cache_dir_for

    assert JobConfig().run.compile_cache_dir == DEFAULT_DIR
    assert cache_dir_for(DEFAULT_DIR, on_pathways=False) == DEFAULT_DIR
    # A directory inside the controller's container dies with the pod: not used on Pathways.
    assert cache_dir_for(DEFAULT_DIR, on_pathways=True) is None
    assert cache_dir_for("gs://bucket/xla", on_pathways=True) == "gs://bucket/xla"
    assert cache_dir_for(None, on_pathways=False) is None
