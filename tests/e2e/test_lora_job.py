"""LoRA jobs end to end: learning, adapter-only sync, exact resume, exports, schedules."""

import json
import signal

import jax
import numpy as np
import pytest
from helpers.runs import cli_run, steps_logged, wait_for_steps
from safetensors.numpy import load_file

from controller.api import Job
from controller.cli.dispatch import main as cli_main
from controller.config import ConfigError, load_config
from trainer import lora

pytestmark = pytest.mark.e2e  # each test runs whole jobs

LORA = "model.lora={rank: 16}"
SMALL = ["data.prompts_per_step=4", "sampling.group_size=4", "run.progress=false",
         "status.enabled=false"]


def _host(tree):
    return jax.tree.map(np.array, jax.device_get(tree))


def test_lora_run_learns_and_syncs_only_the_adapters(tmp_path):
    # The README's LoRA example: 100 steps of the default job, then rank-16 adapters on every
    # projection of that frozen checkpoint (model.init_from). The training reward and the
    # held-out reward rise, the base never changes, and each step moves the adapters' bytes,
    # nothing else, with the sampler running exactly the trainer's policy.
    with Job(load_config(overrides=["run.steps=100", "status.enabled=false", "eval.enabled=false",
                                    f"run.output_dir={tmp_path / 'base'}"])) as job:
        job.run()
        trained_base = _host(job.trainer.params)
    cfg = load_config(overrides=["run.steps=150", LORA, "status.enabled=false",
                                 f"model.init_from={tmp_path / 'base'}",
                                 f"run.output_dir={tmp_path / 'lora'}"])
    with Job(cfg) as job:
        base = _host(job.trainer.base)
        for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(trained_base), strict=True):
            np.testing.assert_array_equal(a, b)  # the checkpoint's policy is the base
        history = job.run()
        assert all(np.array_equal(a, b) for a, b in zip(
            jax.tree.leaves(_host(job.trainer.base)), jax.tree.leaves(base), strict=True))
        adapter_bytes = lora.adapter_bytes(job.trainer.params)
        full_bytes = sum(x.nbytes for x in jax.tree.leaves(base)) + adapter_bytes
        evals = job.evals
    assert {m["reshard/bytes"] for m in history} == {adapter_bytes}
    assert adapter_bytes < full_bytes / 2
    assert max(m["sampler/logp_abs_diff"] for m in history) < 1e-4
    # The training reward of each step's fresh rows is noisy (per-step sd ~0.03): its trend must
    # point up; the held-out reward, on fixed prompts, must rise by a margin.
    rewards = np.array([m["reward/mean"] for m in history])
    assert rewards[-50:].mean() > rewards[:50].mean(), rewards
    (s0, first), (s1, last) = evals[0], evals[-1]
    assert (s0, s1) == (0, 150)
    assert last["eval/reward/mean"] > first["eval/reward/mean"] + 0.02, (first, last)


def test_unmerged_sampler_and_schedules_run_the_same_policy(tmp_path):
    # The sampler's two ways of applying the adapters serve the same policy: identical
    # rollouts and updates over a few steps (sync schedule), up to float rounding.
    def run(*extra):
        with Job(load_config(overrides=[*SMALL, "run.steps=4", LORA, "eval.enabled=false",
                                        *extra])) as job:
            h = job.run()
            return h, _host(job.trainer.params)

    merged, p_merged = run()
    unmerged, p_unmerged = run("model.lora={rank: 16, sampler: unmerged}")
    for a, b in zip(merged, unmerged, strict=True):
        assert a["reward/mean"] == b["reward/mean"]
        assert b["sampler/logp_abs_diff"] < 1e-4
    for a, b in zip(jax.tree.leaves(p_merged), jax.tree.leaves(p_unmerged), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    colocated, _ = run("schedule.kind=colocated")
    assert max(m["sampler/logp_abs_diff"] for m in colocated) < 1e-4
    # async: batches sampled a version behind are reweighted, not compared at rounding; with
    # max_staleness=0 it is the sync schedule, step for step.
    stale, _ = run("schedule.kind=async")
    assert len(stale) == 4 and all(np.isfinite(m["loss/total"]) for m in stale)
    fresh, _ = run("schedule.kind=async", "schedule.max_staleness=0")
    assert [m["reward/mean"] for m in fresh] == [m["reward/mean"] for m in merged]


def test_kill_9_then_resume_equals_uninterrupted_lora_run(tmp_path):
    # With dropout: its masks follow the update count, so the resumed run draws the same ones.
    n = 8
    lora_cfg = "model.lora={rank: 16, dropout: 0.1}"
    every = ["checkpoint.every_steps=2", "eval.enabled=false"]
    with Job(load_config(overrides=[*SMALL, lora_cfg, *every, f"run.steps={n}",
                                    f"run.output_dir={tmp_path / 'ref'}"])) as ref:
        ref.run()
        want = _host(ref.trainer.params)

    out = tmp_path / "killed"
    proc = cli_run(out, lora_cfg, *every, "run.steps=1000", "status.enabled=false")
    wait_for_steps(proc, out, 5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    meta = json.loads(next(out.glob("checkpoints/*/meta/metadata")).read_text())
    assert meta["lora_base"].startswith("sha256:")
    resume = [*SMALL, lora_cfg, *every, f"run.steps={n}", f"run.output_dir={out}",
              "run.resume=true"]
    with Job(load_config(overrides=resume)) as job:
        assert job.resumed_from is not None and job.resumed_from >= 2
        job.run()
        got = _host(job.trainer.params)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(a, b)
    assert steps_logged(out) == list(range(1, n + 1))

    # Another base, or full fine-tuning, on these adapters: refused before anything restores.
    with pytest.raises(ConfigError, match="trained on another base model"):
        Job(load_config(overrides=[*resume, "model.init_seed=7"]))
    with pytest.raises(ConfigError, match="holds LoRA adapters but model.lora is unset"):
        Job(load_config(overrides=[r for r in resume if r != lora_cfg]))
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if "corrupt" in p.name) == []


def test_export_writes_peft_adapters_and_a_merged_model(tmp_path, capsys):
    out = tmp_path / "run"
    with Job(load_config(overrides=[*SMALL, LORA, "run.steps=3", "eval.enabled=false",
                                    f"run.output_dir={out}"])) as job:
        job.run()
        adapters = _host(job.trainer.params)
        spec = job.policy_def.spec
        merged_want = _host(job.trainer.merged_params())
    assert cli_main(["export", str(out), str(tmp_path / "peft"), "--format", "peft"]) == 0
    assert "peft.PeftModel.from_pretrained" in capsys.readouterr().out
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["lora_alpha"] == 32.0
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    want = lora.peft_named_arrays(spec, adapters)
    assert tensors.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(tensors[k], want[k])
    assert np.any(tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"])

    assert cli_main(["export", str(out), str(tmp_path / "merged"), "--merge"]) == 0
    from trainer.hf import load_hf_model

    _, merged = load_hf_model(tmp_path / "merged", dtype="float32")
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(merged_want), strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6, atol=1e-7)  # W + s·A·B


def test_full_fine_tuning_checkpoint_refuses_peft_export(tmp_path, capsys):
    out = tmp_path / "run"
    with Job(load_config(overrides=[*SMALL, "run.steps=1", "eval.enabled=false",
                                    f"run.output_dir={out}"])) as job:
        job.run()
    assert cli_main(["export", str(out), str(tmp_path / "peft"), "--format", "peft"]) == 2
    err = capsys.readouterr().err
    assert "full fine-tuning checkpoint" in err and "drop --format peft" in err
