"""`tandem export`: a run's checkpoint -> a Hugging Face directory that transformers reloads."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from controller.api import Job  # noqa: E402
from controller.cli import main  # noqa: E402
from controller.config import load_config  # noqa: E402
from trainer.model import apply_model, causal_mask, positions_from_mask  # noqa: E402

SMALL = ["data.prompts_per_step=4", "sampling.group_size=4", "run.steps=2", "run.progress=false",
         "checkpoint.every_steps=1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny 2-step job with checkpoints of steps 1 and 2: (output dir, mdef, final params)."""
    out = tmp_path_factory.mktemp("export") / "run"
    with Job(load_config(overrides=[*SMALL, f"run.output_dir={out}"])) as job:
        job.run()
        params = jax.device_get(job.trainer.params)
        mdef = job.model_def
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [1, 2]
    return out, mdef, params


def _ids(vocab: int):
    """Two left-padded rows: mask, token ids and HF-style position ids."""
    rng = np.random.default_rng(0)
    ids_BxL = rng.integers(0, vocab, size=(2, 9)).astype(np.int32)
    mask_BxL = np.ones_like(ids_BxL, dtype=bool)
    mask_BxL[1, :3] = False
    pos_BxL = np.asarray(positions_from_mask(jax.numpy.asarray(mask_BxL)))
    return ids_BxL, mask_BxL, pos_BxL


def _tandem_logits(mdef, params, ids_BxL, mask_BxL, pos_BxL):
    logits_BxLxV, _ = apply_model(mdef, params, ids_BxL, pos_BxL,
                                  causal_mask(mask_BxL, 0, ids_BxL.shape[1]))
    return np.asarray(logits_BxLxV)


def _hf_logits(out_dir, ids_BxL, mask_BxL, pos_BxL):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        out_dir, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids_BxL, dtype=torch.long),
                     attention_mask=torch.tensor(mask_BxL.astype(np.int64)),
                     position_ids=torch.tensor(pos_BxL, dtype=torch.long)).logits.numpy()


def test_export_reloads_in_transformers_with_the_final_params_logits(run, tmp_path, capsys):
    out, mdef, params = run
    assert main(["export", str(out), str(tmp_path / "hf")]) == 0
    assert "step 2" in capsys.readouterr().out
    ids, mask, pos = _ids(mdef.spec.vocab_size)
    got = _hf_logits(tmp_path / "hf", ids, mask, pos)
    want = _tandem_logits(mdef, params, ids, mask, pos)
    np.testing.assert_allclose(got[mask], want[mask], atol=1e-4, rtol=0)


def test_step_selection_by_flag_and_by_step_dir(run, tmp_path):
    out, mdef, params = run
    assert main(["export", str(out / "checkpoints"), str(tmp_path / "a"), "--step", "1"]) == 0
    assert main(["export", str(out / "checkpoints" / "1"), str(tmp_path / "b")]) == 0
    ids, mask, pos = _ids(mdef.spec.vocab_size)
    a, b = (_hf_logits(tmp_path / d, ids, mask, pos) for d in "ab")
    np.testing.assert_array_equal(a, b)
    final = _tandem_logits(mdef, params, ids, mask, pos)
    assert np.abs(a - final)[mask].max() > 1e-4  # step 1 is not the final policy


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(run, tmp_path, capsys, caplog):
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(run[0] / "checkpoints", ckpts)
    for f in (ckpts / "2" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"garbage")
    assert main(["export", str(ckpts), str(tmp_path / "hf")]) == 0
    assert "step 1" in capsys.readouterr().out
    assert f"{ckpts / '2' / 'state'} is incomplete or corrupt" in caplog.text
    e = _err(capsys, str(ckpts), str(tmp_path / "o"), "--step", "2")  # asked for: no fallback
    assert "corrupt" in e and "--step with an earlier checkpoint" in e


def _err(capsys, *argv: str) -> str:
    assert main(["export", *argv]) == 2
    return capsys.readouterr().err


def test_errors_name_the_path_and_the_fix(run, tmp_path, capsys):
    out = run[0]
    missing = tmp_path / "nope"
    assert str(missing) in (e := _err(capsys, str(missing), str(tmp_path / "o"))) and "fix:" in e
    empty = tmp_path / "empty"
    empty.mkdir()
    e = _err(capsys, str(empty), str(tmp_path / "o"))
    assert f"no complete checkpoint in {empty}" in e and "fix:" in e
    e = _err(capsys, str(out), str(tmp_path / "o"), "--step", "7")
    assert "--step 7" in e and "[1, 2]" in e

    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    e = _err(capsys, str(out), str(full))
    assert f"{full} exists and is not empty" in e and "fix:" in e
    assert (full / "keep.txt").read_text() == "mine"  # nothing overwritten

    # A checkpoint whose recorded config describes another model than the params it holds.
    other = tmp_path / "other"
    shutil.copytree(out / "checkpoints" / "2", other / "2")
    meta_file = other / "2" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["config"]["model"]["hidden_size"] = 32
    meta_file.write_text(json.dumps(meta))
    e = _err(capsys, str(other), str(tmp_path / "o"))
    assert "another config or model" in e and str(other / "2" / "state") in e
    assert not Path(tmp_path / "o").exists()  # no half-written export on failure


def test_a_run_from_model_path_exports_its_weights_and_tokenizer(tmp_path, capsys):
    # A checkpoint as a `model.path` job writes it (the meta's config is the full model_dump,
    # so every model field looks set; the run's own export_hf_dir exists by now), saved
    # directly: the export must be the source model's weights and tokenizer, bit for bit.
    from helpers.hf_fixtures import write_tiny_hf_model
    from safetensors.numpy import load_file

    from trainer.checkpoint import Checkpointer
    from trainer.hf import load_hf_model

    src = write_tiny_hf_model("qwen3", tmp_path / "qwen3")
    done = tmp_path / "done"
    cfg = load_config(overrides=[f"model.path={src}", f"run.export_hf_dir={done}"])
    done.mkdir()
    (done / "config.json").write_text("{}")
    _, params = load_hf_model(src, dtype="float32")
    ckpt = Checkpointer(tmp_path / "checkpoints", async_save=False)
    state = {"params": params, "opt_state": jax.tree.map(np.zeros_like, params), "step": 3}
    ckpt.save(3, state, {"step": 3, "config": cfg.model_dump(mode="json")}, wait=True)
    ckpt.close()

    assert main(["export", str(tmp_path / "checkpoints"), str(tmp_path / "hf")]) == 0
    got, want = (load_file(d / "model.safetensors") for d in (tmp_path / "hf", src))
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    tokenizer = (tmp_path / "hf" / "tokenizer.json").read_bytes()
    assert tokenizer == (src / "tokenizer.json").read_bytes()

    moved = src.rename(tmp_path / "moved")  # the source model moved: say how to point at it
    e = _err(capsys, str(tmp_path / "checkpoints"), str(tmp_path / "hf2"))
    assert str(src) in e and "--model-path" in e
    args = [str(tmp_path / "checkpoints"), str(tmp_path / "hf2"), "--model-path", str(moved)]
    assert main(["export", *args]) == 0
