"""The benchmark job of bench/grpo_step.py: the synthetic task, its reward, the FLOPs count.

No timing here: the bench itself measures speed.
"""

import importlib.util
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from controller.config import SamplingConfig, load_config
from controller.data import build_dataset, build_tokenizer
from controller.data.batch import encode_prompts
from controller.data.synthetic import SyntheticTokenizer, synthetic_row
from rewards.registry import RewardSet, get_reward
from rewards.synthetic import completion_ids, even_fraction
from sampler.jax_sampler import JaxSampler

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("grpo_step", REPO / "bench" / "grpo_step.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["grpo_step"] = mod  # dataclasses look their module up while it executes
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("grpo_step", None)


SYNTH = ["data.task=synthetic", "data.prompt_tokens=32", "data.prompts_per_step=8",
         "model.vocab_size=1024", "rewards.functions=[synthetic_even]"]


def test_synthetic_prompts_are_a_pure_function_of_seed_and_index():
    cfg = load_config(overrides=SYNTH)
    tok = build_tokenizer(cfg)
    assert isinstance(tok, SyntheticTokenizer) and tok.vocab_size == 1024
    assert tok.stop_ids == ()  # nothing can end a completion early
    a = build_dataset(cfg, tok).next_batch()
    b = build_dataset(cfg, tok).next_batch()
    np.testing.assert_array_equal(a.tokens_PxL, b.tokens_PxL)
    assert a.tokens_PxL.shape == (8, 32) and a.mask_PxL.all()  # no padding, no BOS
    assert a.tokens_PxL.min() >= 0 and a.tokens_PxL.max() < 1024
    # The next batch is new rows; another seed is other prompts.
    ds = build_dataset(cfg, tok)
    ds.next_batch()
    assert not np.array_equal(ds.next_batch().tokens_PxL, a.tokens_PxL)
    other = build_dataset(load_config(overrides=[*SYNTH, "data.seed=1"]), tok).next_batch()
    assert not np.array_equal(other.tokens_PxL, a.tokens_PxL)
    # The text round-trips to the same ids (what the peers tokenize is what Tandem samples).
    row = synthetic_row(0, 3, 32, 1024)
    assert tok.encode(row["prompt"]) == row["prompt_ids"]
    assert tok.decode(row["prompt_ids"]) == row["prompt"]
    with pytest.raises(ValueError, match="t1024"):
        tok.encode("t5 t1024")


def test_synthetic_reward_is_the_even_fraction_of_the_completion_ids():
    # ids 4, 7, 10, 1023, 0: even are 4, 10, 0 -> 3 / 5 = 0.6
    assert even_fraction([4, 7, 10, 1023, 0]) == pytest.approx(0.6)
    assert even_fraction([]) == 0.0
    text = SyntheticTokenizer(1024).decode([4, 7, 10, 1023, 0])
    assert text == "t4 t7 t10 t1023 t0" and completion_ids(text) == [4, 7, 10, 1023, 0]
    fn = get_reward("synthetic_even")
    assert fn("t1 t2", text, {}) == pytest.approx(0.6)
    # Deterministic through the reward set, and it scores only the completion.
    totals1, _ = RewardSet(["synthetic_even"]).score(["t1", "t2"], [text, "t1 t3"], [{}, {}])
    totals2, _ = RewardSet(["synthetic_even"]).score(["t8", "t9"], [text, "t1 t3"], [{}, {}])
    assert totals1 == totals2 == [pytest.approx(0.6), 0.0]


def test_empty_stop_set_generates_exactly_max_new_tokens(tiny_model, meshes, tokenizer):
    # With the digits task's stop token some of these rows stop early (see
    # test_rows_stop_independently_at_the_stop_token); with no stop ids, none may.
    mdef, params = tiny_model
    sampler = JaxSampler(mdef, meshes.sampler, SamplingConfig(max_new_tokens=6),
                         pad_id=tokenizer.pad_id, stop_ids=())
    sampler.load_weights(jax.device_put(params, sampler.shardings))
    batch = encode_prompts([{"prompt": t} for t in ["31=", "2718=", "99="]], tokenizer)
    out = sampler.generate(np.repeat(batch.tokens_PxL, 16, 0), np.repeat(batch.mask_PxL, 16, 0),
                           jax.random.key(0))
    comp, cmask = np.asarray(out.tokens_BxT), np.asarray(out.mask_BxT)
    assert comp.shape == (48, 6) and cmask.all()
    assert (comp == tokenizer.stop_id).any()  # stop ids were drawn, and did not stop the row


def test_standard_job_param_count_matches_the_model(bench):
    from trainer.model import ModelSpec, define_model

    cfg = load_config(overrides=[*SYNTH, "model.hidden_size=256", "model.num_layers=4",
                                 "model.num_heads=4", "model.num_kv_heads=2",
                                 "model.mlp_dim=688", "model.qkv_bias=true"])
    shapes = define_model(ModelSpec.from_config(cfg.model, 1024)).shapes()  # abstract, no init
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert n == bench.param_count(bench.STANDARD_MODEL) == 3_166_464


def test_flops_formula_matches_a_hand_count(bench):
    m = {"vocab_size": 10, "hidden_size": 4, "num_layers": 1, "num_heads": 2,
         "num_kv_heads": 1, "head_dim": 2, "mlp_dim": 6, "tie_embeddings": True,
         "qkv_bias": True}
    # P_mm = q 4*2*2 + k,v 2*4*1*2 + o 2*2*4 + SwiGLU 3*4*6 + head 4*10 = 16+16+16+72+40 = 160
    assert bench.matmul_params(m) == 160
    # params = embed 40 + (attn 48 + bias 4+2+2 + mlp 72 + norms 8) + final norm 4 = 180
    assert bench.param_count(m) == 180
    # one row of 3 tokens: 2*160*3 = 960, attention 1 layer * 4*2*2 * (1+2+3) = 96 -> 1056
    assert bench.forward_flops(m, 1, 3) == 1056
    job = {"model": m, "prompts_per_step": 1, "group_size": 2, "prompt_tokens": 2,
           "new_tokens": 1, "beta": 0.04}
    # B = 2 rows of P + T = 3: reference 2*1056 = 2112, update 3*2112 = 6336;
    # sample over P + T - 1 = 2 positions: 2 * (2*160*2 + 16*(1+2)) = 2 * 688 = 1376.
    f = bench.job_flops(job)
    assert (f["sample"], f["reference"], f["update"]) == (1376, 2112, 6336)
    assert f["total"] == 1376 + 2112 + 6336
    # β = 0: no reference model, no reference forward.
    assert "reference" not in bench.job_flops({**job, "beta": 0.0})


def test_default_placements_run_the_standard_split(bench):
    """The table's default rows are the standard 8-device job (4 + 4, or one colocated mesh of
    8); the 2 + 2 row that shows what that split costs on few cores runs only when asked."""
    for name in bench.DEFAULT_PLACEMENTS:
        over = load_config(overrides=bench.TANDEM_PLACEMENTS[name]).topology
        assert over.simulated_devices == 8, name
        if "colocated" not in name:
            assert over.trainer_devices == 4, name
    assert "disaggregated-2+2" not in bench.DEFAULT_PLACEMENTS
    small = load_config(overrides=bench.TANDEM_PLACEMENTS["disaggregated-2+2"]).topology
    assert (small.simulated_devices, small.trainer_devices) == (4, 2)


def test_machine_line_names_the_cpu_and_its_vector_isa(bench):
    # The same job differs by ~1.5x between an AVX-512 and an AVX2 box: the table says which.
    xeon = "model name\t: Intel(R) Xeon(R)\nflags\t\t: fpu avx2 avx512f\n"
    epyc = "model name\t: AMD EPYC\nflags\t\t: fpu avx avx2 fma\n"
    old = "model name\t: Old CPU\nflags\t\t: fpu sse4_2\n"
    assert bench.machine(xeon).startswith("Intel(R) Xeon(R), ")
    assert bench.machine(xeon).endswith(" CPUs, AVX-512")
    assert bench.machine(epyc).startswith("AMD EPYC, ") and bench.machine(epyc).endswith(", AVX2")
    assert bench.machine(old).endswith(", no AVX2")
    assert bench.machine("").endswith(", ISA unknown")


def test_rounds_combine_into_medians_and_a_failed_round_is_the_result(bench):
    def one(step, first, sample, rss, problems=()):
        return {"label": "X", "framework": "tandem", "median_step_s": step, "first_step_s": first,
                "setup_s": 1.0, "completion_tokens_per_s": 4096 / step, "rss_gb": rss,
                "first_step_warm_s": first / 3,
                "phase_median_s": {"sample": sample, "reference": None},
                "settings_mismatch": list(problems)}

    rounds = [one(2.0, 12.0, 0.7, 1.8), one(2.6, 17.0, 1.0, 1.9, ["beta"]),
              one(1.9, 13.0, 0.6, 1.7)]
    out = bench.combine_rounds(rounds)
    assert out["median_step_s"] == 2.0 and out["first_step_s"] == 13.0
    assert out["first_step_warm_s"] == 13.0 / 3
    assert out["phase_median_s"] == {"sample": 0.7, "reference": None}
    assert out["rss_gb"] == 1.9 and out["settings_mismatch"] == ["beta"]
    assert out["round_step_s"] == [2.0, 2.6, 1.9]
    failed = {"label": "X", "error": "runner exited 1"}
    assert bench.combine_rounds([rounds[0], failed]) is failed
    assert bench.combine_rounds([rounds[0]]) is rounds[0]


def test_tandem_runs_compile_cold_and_the_rerun_reuses_their_cache(bench, monkeypatch):
    # The caller's JAX cache never reaches a runner; the warm re-run is the same command
    # (so the same run.compile_cache_dir) cut to one step.
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/somewhere")
    assert "JAX_COMPILATION_CACHE_DIR" not in bench.base_env()
    seen = []

    def fake_run_child(cmd, env, timeout_s):
        seen.append(cmd)
        return {"steps": [{"step_s": 4.5}]}, 1.0, ""

    monkeypatch.setattr(bench, "run_child", fake_run_child)
    cmd = ["python", "tandem_runner.py", "job.json", "disaggregated", "run.compile_cache_dir=/c"]
    assert bench.warm_first_step(cmd, {}, 60) == 4.5
    assert seen == [[*cmd, "run.steps=1"]]
    monkeypatch.setattr(bench, "run_child", lambda *a: ({"error": "exit code 1"}, 0.0, ""))
    assert bench.warm_first_step(cmd, {}, 60) is None
