"""Every input a user controls fails cleanly, through the CLI, as a user runs it.

Each case runs `python -m controller.cli ...` in its own temporary working directory and checks
what the user sees: the exit status (2 for a bad input, 1 for a run that had to stop), no
Python traceback, one `error:` line that names the field or file and the value, a fix, and that
every file already there is still there, byte for byte. Most cases fail before JAX starts, so
the table runs three at a time in a thread pool; the few that need a whole job (the relative
export round trip, a corrupt checkpoint) are tests of their own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from controller.metrics import is_eval_row
from controller.topology import simulation_env

pytestmark = pytest.mark.e2e  # some cases run whole jobs

# A tiny job: 2 prompts x G=2, no reference model, no status server. Every job in this file
# uses these shapes, so they share compiled programs through the session's compile cache.
SMALL = ("data.prompts_per_step=2", "sampling.group_size=2", "algorithm.beta=0",
         "status.enabled=false", "run.progress=false")
TEXT = ("data.task=jsonl", "rewards.functions=[gsm8k]")  # a text task on a file of yours


def tandem(cwd: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 300
           ) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **simulation_env(8), **(env or {})}
    return subprocess.run([sys.executable, "-m", "controller.cli", *args], cwd=cwd,
                          env=full_env, capture_output=True, text=True, timeout=timeout)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# -- set-ups: the files each case finds in its working directory ------------------------------

def model_dir(name: str, *, config: str | None = '{"model_type": "qwen2"}', tokenizer: bool = True,
              weights: bool = True) -> Callable[[Path], None]:
    """A Hugging Face directory with some of its files (contents fake: these cases fail on
    what is missing before any file is parsed, or on config.json itself)."""
    def setup(cwd: Path) -> None:
        d = cwd / name
        d.mkdir()
        if config is not None:
            write(d / "config.json", config)
        if tokenizer:
            write(d / "tokenizer.json", "{}")
        if weights:
            write(d / "model.safetensors", "")
    return setup


def files(**contents: str) -> Callable[[Path], None]:
    """Files by relative path ("__" stands for "/"; a value "<dir>" makes a directory)."""
    def setup(cwd: Path) -> None:
        for name, text in contents.items():
            path = cwd / name.replace("__", "/")
            if text == "<dir>":
                path.mkdir(parents=True)
            else:
                write(path, text)
    return setup


def existing_run(cwd: Path) -> None:
    """What a finished run left: its metrics and a (fake) checkpoint of step 1."""
    write(cwd / "runs/exp1/metrics.jsonl", '{"step": 1, "reward/mean": 0.5}\n')
    write(cwd / "runs/exp1/config.yaml", "run:\n  steps: 1\n")
    for part in ("state", "meta"):
        write(cwd / f"runs/exp1/checkpoints/1/{part}/x", "x")


FLAKY = """\
calls = 0


def reward(prompt, completion, row):
    global calls
    calls += 1
    if calls > 4:  # step 1 (2 prompts x G=2 calls) scores; step 2 does not (no evaluation)
        raise ValueError(f"cannot score {completion!r}")
    return 1.0
"""


def _training_steps(path: Path) -> list[int]:
    """The steps logged in a metrics.jsonl, without the baseline evaluation's row (step 0)."""
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    return [int(r["step"]) for r in rows if not is_eval_row(r)]


def check_reward_stop(cwd: Path, out: subprocess.CompletedProcess) -> None:
    # The user's reward traceback is shown (their code), with none of Tandem's frames.
    assert out.stderr.count("Traceback") == 1, out.stderr
    frames = [x for x in out.stderr.splitlines() if x.strip().startswith('File "')]
    assert frames and all("flaky.py" in x for x in frames), frames
    # Nothing lost: step 1's metrics and its checkpoint, saved when step 2 failed.
    assert _training_steps(cwd / "runs/exp1/metrics.jsonl") == [1]
    assert sorted(p.name for p in (cwd / "runs/exp1/checkpoints").iterdir()) == ["1"]


# Injected through sitecustomize: the trainer's update fails at step 2 after it has changed
# the state, as an internal error would. The CLI must not save that state as step 1's.
FAIL_UPDATE = """\
import trainer.trainer as t

_update, _calls = t.Trainer.update, []


def update(self, *args, **kwargs):
    out = _update(self, *args, **kwargs)
    _calls.append(1)
    if len(_calls) == 2:
        raise RuntimeError("injected failure after the update")
    return out


t.Trainer.update = update
"""


def check_internal_stop(cwd: Path, out: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in out.stderr, out.stderr
    assert "Traceback" in (cwd / "runs/exp1/error.log").read_text()  # kept for a bug report
    assert _training_steps(cwd / "runs/exp1/metrics.jsonl") == [1]
    assert sorted(p.name for p in (cwd / "runs/exp1/checkpoints").iterdir()) == ["1"]


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]  # after `python -m controller.cli`; "{cwd}" is the case's directory
    expect: tuple[str, ...]  # in stderr: the field or file, the value; "{cwd}", "{home}" too
    setup: Callable[[Path], None] | None = None
    code: int = 2
    env: dict[str, str] = field(default_factory=dict)  # "{cwd}" is the case's directory
    check: Callable[[Path, subprocess.CompletedProcess], None] | None = None
    jax: bool = False  # found once JAX has started (seconds, not a fraction of one)

    def __str__(self) -> str:
        return self.id


def run(*args: str) -> tuple[str, ...]:
    return ("run", *args)


CASES = [
    # -- config: every kind of wrong value, scalars for sections, unknown keys, YAML files ---
    Case("unknown-key", run("sampling.tempature=1"),
         ("sampling.tempature", "did you mean sampling.temperature")),
    Case("unknown-section", run("samplr.group_size=4"), ("samplr", "unknown key")),
    Case("scalar-for-section", run("sampling=5"), ("sampling=5", "is a section")),
    Case("scalar-for-section-yaml", run("job.yaml"), ("sampling=5", "is a section"),
         files(**{"job.yaml": "sampling: 5\n"})),
    Case("list-for-section", run("run=[1, 2]"), ("run=[1, 2]", "is a section")),
    Case("null-section-then-field", run("sampling=5", "sampling.group_size=4"),
         ("sampling.group_size=4", "sampling is 5")),
    Case("string-for-int", run("run.steps=many"), ("run.steps='many'", "run.steps=400")),
    Case("float-for-int", run("run.steps=1.5"), ("run.steps=1.5", "integer")),
    Case("out-of-range", run("sampling.temperature=-1"),
         ("sampling.temperature=-1", "greater than or equal to 0")),
    Case("bad-choice", run("schedule.kind=sometimes"), ("schedule.kind='sometimes'", "sync")),
    Case("null-for-int", run("run.steps=null"), ("run.steps=null",)),
    Case("bad-dict-entry", run("topology.trainer_mesh={fsdp: x}"),
         ("topology.trainer_mesh.fsdp='x'", 'topology.trainer_mesh={"fsdp": -1}')),
    Case("string-for-list", run("rewards.functions=gsm8k"), ("rewards.functions='gsm8k'",)),
    Case("date-for-string", run("run.name=2024-01-01"), ("run.name", "2024-01-01", "quote")),
    Case("cross-field", run("model.num_kv_heads=3"), ("model.num_kv_heads=3",)),
    Case("override-without-equals", run("run.steps"), ("'run.steps'", "has no '='")),
    Case("override-bad-yaml", run("rewards.kwargs={a: [}"), ("rewards.kwargs", "not valid YAML")),
    Case("yaml-syntax", run("bad.yaml"), ("bad.yaml", "not valid YAML", "line 3"),
         files(**{"bad.yaml": "run:\n  steps: [\n"})),
    Case("yaml-not-a-mapping", run("list.yaml"), ("list.yaml", "holds a list"),
         files(**{"list.yaml": "- run\n- steps\n"})),
    Case("yaml-scalar", run("text.yaml"), ("text.yaml", "holds a str"),
         files(**{"text.yaml": "just some text\n"})),
    Case("yaml-unknown-nested-key", run("job.yaml"), ("run.stepz", "did you mean run.steps"),
         files(**{"job.yaml": "run:\n  stepz: 3\n"})),
    Case("update-too-large-for-the-devices",
         run("data.prompts_per_step=512", "sampling.group_size=64", "model.vocab_size=262144",
             "status.enabled=false", "run.output_dir=runs/big"),
         ("the update does not fit", "GiB a trainer device has", "data.prompts_per_step"),
         jax=True),
    Case("lora-rank-zero", run("model.lora={rank: 0}"), ("model.lora.rank=0",)),
    Case("lora-unknown-target", run("model.lora={targets: [q, qkv_proj]}"),
         ("model.lora.targets", "qkv_proj", "q, k, v, o, gate, up, down")),
    Case("init-from-missing", run("model.init_from=runs/nothing_here"),
         ("model.init_from", "runs/nothing_here", "not a directory")),
    Case("config-file-missing", run("nope.yaml"), ("nope.yaml", "does not exist")),
    Case("config-file-is-dir", run("conf.yaml"), ("conf.yaml", "is a directory"),
         files(**{"conf.yaml": "<dir>"})),
    Case("export-target-not-empty", run("run.export_hf_dir=hf"),
         ("run.export_hf_dir='hf'", "not an empty directory"), files(**{"hf__config.json": "{}"})),

    # -- data files ---------------------------------------------------------------------------
    Case("data-missing-relative", run(*TEXT, "data.path=data/train.jsonl"),
         ("data.path='data/train.jsonl'", "does not exist", "{cwd}")),
    Case("data-missing-absolute", run(*TEXT, "data.path=/does/not/exist.jsonl"),
         ("data.path='/does/not/exist.jsonl'", "does not exist")),
    Case("data-missing-home", run(*TEXT, "data.path=~/prompts.jsonl"),
         ("data.path='{home}/prompts.jsonl'", "does not exist"), env={"HOME": "{cwd}/home"}),
    Case("data-empty", run(*TEXT, "data.path=empty.jsonl"), ("data.path='empty.jsonl'", "empty"),
         files(**{"empty.jsonl": "\n\n"})),
    Case("data-is-dir", run(*TEXT, "data.path=data"), ("data.path='data'", "is a directory"),
         files(**{"data": "<dir>"})),
    Case("data-no-usable-rows", run(*TEXT, "data.path=rows.jsonl"),
         ("data.path='rows.jsonl'", "no usable rows", "line 1", "a list, not an object"),
         files(**{"rows.jsonl": '{"prompt": ""}\n[1, 2]\n'}), jax=True),
    Case("data-wrong-columns", run(*TEXT, "data.path=qa.jsonl"),
         ("data.path='qa.jsonl'", "no column 'prompt'", "data.columns"),
         files(**{"qa.jsonl": '{"question": "1+1", "answer": "2"}\n' * 3}), jax=True),
    Case("data-bad-json-lines", run(*TEXT, "data.path=broken.jsonl"),
         ("data.path='broken.jsonl'", "line 1: not valid JSON", "line 2: not valid JSON"),
         files(**{"broken.jsonl": "{prompt: 1}\nnot json\n"}), jax=True),

    # -- evaluation ----------------------------------------------------------------------------
    Case("eval-k-over-samples", run("eval.samples_per_prompt=2", "eval.k=4"),
         ("eval.samples_per_prompt=2 < eval.k=4", "eval.samples_per_prompt=4")),
    Case("eval-k-zero", run("eval.k=0"), ("eval.k=0", "greater than or equal to 1")),
    Case("eval-split-unknown", run("eval.split=validation"), ("eval.split='validation'",)),
    Case("eval-file-missing", run(*TEXT, "data.path=p.jsonl", "eval.path=held/out.jsonl"),
         ("eval.path='held/out.jsonl'", "does not exist", "{cwd}"),
         files(**{"p.jsonl": '{"prompt": "1+1=", "target": "2"}\n'})),
    Case("eval-file-empty", run(*TEXT, "data.path=p.jsonl", "eval.path=e.jsonl"),
         ("eval.path='e.jsonl'", "empty"),
         files(**{"p.jsonl": '{"prompt": "1+1=", "target": "2"}\n', "e.jsonl": "\n"})),
    Case("eval-no-held-out-split", run(*TEXT, "data.path=p.jsonl", "eval.enabled=true"),
         ("data.task=jsonl has no held-out split", "eval.path="),
         files(**{"p.jsonl": '{"prompt": "1+1=", "target": "2"}\n'})),

    # -- reward names -------------------------------------------------------------------------
    Case("reward-unknown", run("rewards.functions=[no_such]"), ("'no_such'", "unknown reward")),
    Case("reward-typo", run("rewards.functions=[gsm8kk]"), ("'gsm8kk'", "did you mean 'gsm8k'")),
    Case("reward-module-missing", run("rewards.functions=[nosuchmod:score]"),
         ("'nosuchmod:score'", "cannot import 'nosuchmod'")),
    Case("reward-file-missing-relative", run("rewards.functions=[rw/missing.py:score]"),
         ("rw/missing.py", "does not exist")),
    Case("reward-file-missing-absolute", run("rewards.functions=[/nonexistent/r.py:score]"),
         ("/nonexistent/r.py", "does not exist")),
    Case("reward-not-callable", run("rewards.functions=[consts.py:SCORE]"),
         ("'SCORE'", "consts.py", "not a function", "score_len"),
         files(**{"consts.py": "SCORE = 3\n\n\ndef score_len(prompt, completion, row):\n"
                               "    return len(completion)\n"}), jax=True),
    Case("reward-module-import-fails", run("rewards.functions=[needs_dep:score]"),
         ("'needs_dep:score'", "cannot import 'needs_dep'", "no_such_dependency"),
         files(**{"needs_dep.py": "import no_such_dependency\n"}), jax=True),
    Case("reward-file-syntax-error", run("rewards.functions=[syntax.py:score]"),
         ("syntax.py", "line 1", "SyntaxError"), files(**{"syntax.py": "def score(:\n"}),
         jax=True),
    Case("reward-kwargs-unknown-label", run("rewards.kwargs={nope: {a: 1}}"),
         ("rewards.kwargs", "['nope']")),

    # -- model directories --------------------------------------------------------------------
    Case("model-path-missing", run("model.path=models/none"),
         ("model.path='models/none'", "does not exist")),
    Case("model-no-config", run("model.path=m"), ("model.path='m'", "config.json"),
         model_dir("m", config=None)),
    Case("model-config-not-json", run("model.path=m"), ("model.path='m'", "config.json"),
         model_dir("m", config="{not json")),
    Case("model-type-unsupported", run("model.path=m"), ("m/config.json", "model_type='gpt2'"),
         model_dir("m", config='{"model_type": "gpt2"}'), jax=True),
    Case("model-no-weights", run("model.path=m"), ("model.path='m'", "model.safetensors"),
         model_dir("m", weights=False)),
    Case("model-no-tokenizer", run("model.path=m"), ("model.path='m'", "tokenizer.json"),
         model_dir("m", tokenizer=False)),

    # -- run and checkpoint directories -------------------------------------------------------
    Case("resume-without-checkpoint", run("run.output_dir=runs/none", "run.resume=true"),
         ("run.output_dir='runs/none'", "holds no checkpoint", "drop run.resume=true")),
    Case("resume-without-directory", run("run.resume=true"),
         ("run.resume=true", "no checkpoint directory")),
    Case("existing-run-not-overwritten", run("run.output_dir=runs/exp1"),
         ("run.output_dir='runs/exp1'", "already holds a run", "run.resume=true"),
         existing_run),
    Case("output-dir-is-file", run("run.output_dir=out.txt"),
         ("run.output_dir='out.txt'", "is a file"), files(**{"out.txt": "notes"})),
    Case("checkpoint-dir-is-file-absolute", run("checkpoint.dir={cwd}/ckpt"),
         ("checkpoint.dir='{cwd}/ckpt'", "is a file"), files(ckpt="x")),
    Case("tensorboard-without-output-dir", run("run.tensorboard=true"),
         ("run.tensorboard=true", "run.output_dir")),
    Case("tls-cert-missing", run("status.tls_cert=certs/c.pem", "status.tls_key=certs/k.pem"),
         ("status.tls_cert='certs/c.pem'", "does not exist")),
    Case("export-missing-relative", ("export", "runs/exp9", "out"),
         ("'runs/exp9'", "does not exist")),
    Case("export-missing-absolute", ("export", "/nonexistent/run", "out"),
         ("'/nonexistent/run'", "does not exist")),
    Case("export-not-a-checkpoint", ("export", "runs", "out"),
         ("{cwd}/runs", "no complete checkpoint"), files(runs__notes="x")),
    Case("export-a-file", ("export", "notes.txt", "out"), ("'notes.txt'", "is a file"),
         files(**{"notes.txt": "x"})),
    Case("export-step-missing", ("export", "runs/exp1", "out", "--step", "9"),
         ("--step 9", "steps [1]"), existing_run),
    Case("export-into-non-empty", ("export", "runs/exp1", "out"),
         ("out_dir out exists", "not empty", "--overwrite"),
         lambda cwd: (existing_run(cwd), write(cwd / "out/model.safetensors", "keep me"))),

    # -- plan and submit take config paths too -------------------------------------------------
    Case("plan-config-missing", ("plan", "jobs/x.yaml", "--topology", "v5p-64"),
         ("jobs/x.yaml", "does not exist")),
    Case("plan-bad-topology", ("plan", "--topology", "v9-64"), ("--topology='v9-64'",), jax=True),
    Case("submit-config-missing", ("submit", "~/jobs/x.yaml", "--cluster", "c", "--tpu-type",
                                   "v5p-8", "--docker-image", "i"),
         ("'~/jobs/x.yaml' ({home}/jobs/x.yaml)", "does not exist"), env={"HOME": "{cwd}/home"}),

    # -- a run that has to stop -----------------------------------------------------------------
    Case("reward-fails-after-step-1",
         run(*SMALL, "run.steps=3", "run.output_dir=runs/exp1", "rewards.functions=[flaky.py]",
             "eval.enabled=false",
             "checkpoint.every_steps=0"),
         ("step 2 failed", "rewards.max_failure_fraction", "cannot score",
          "kept: the checkpoint of step 1 in runs/exp1/checkpoints",
          "kept: the metrics of step 1 in runs/exp1/metrics.jsonl"),
         files(**{"flaky.py": FLAKY}), code=1, check=check_reward_stop, jax=True),
    Case("internal-error-in-step-2",
         run(*SMALL, "run.steps=3", "run.output_dir=runs/exp1", "checkpoint.every_steps=1"),
         ("step 2 failed: RuntimeError: injected failure after the update",
          "the full traceback: runs/exp1/error.log", "kept: the metrics of step 1",
          "kept: the checkpoint of step 1 in runs/exp1/checkpoints",
          "not saved: the failure came during the update"),
         files(**{"inject__sitecustomize.py": FAIL_UPDATE}), code=1,
         env={"PYTHONPATH": "{cwd}/inject"}, check=check_internal_stop, jax=True),
]


def _sub(text: str, cwd: Path) -> str:
    return text.replace("{cwd}", str(cwd)).replace("{home}", str(cwd / "home"))


def _run_case(case: Case, cwd: Path) -> tuple[subprocess.CompletedProcess, dict, dict]:
    if case.setup is not None:
        case.setup(cwd)
    before = snapshot(cwd)
    env = {k: _sub(v, cwd) for k, v in case.env.items()}
    out = tandem(cwd, *(_sub(a, cwd) for a in case.args), env=env)
    return out, before, snapshot(cwd)


def _start_order(case: Case) -> int:
    """The first whole job starts first (it compiles the programs, the longest case of all),
    then the cases that start JAX, then the quick ones; the second job last, when the
    compile cache holds its programs."""
    if case.code == 1:
        return 0 if case.id == "reward-fails-after-step-1" else 3
    return 1 if case.jax else 2


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory):
    """Runs the selected cases, three at a time (most are a Python start-up and a config
    check: they wait on imports and the disk more than on the two cores)."""
    wanted = [item.callspec.params["case"] for item in request.session.items
              if item.originalname == "test_bad_input" and hasattr(item, "callspec")]
    dirs = {c.id: tmp_path_factory.mktemp(c.id) for c in wanted}
    wanted.sort(key=_start_order)
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {c.id: pool.submit(_run_case, c, dirs[c.id]) for c in wanted}
        return {k: (dirs[k], *f.result()) for k, f in futures.items()}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input(case, outcomes):
    cwd, out, before, after = outcomes[case.id]
    err = out.stderr
    assert out.returncode == case.code, (out.returncode, err, out.stdout[-2000:])
    if case.check is None:
        assert "Traceback" not in err, err
    assert [x for x in err.splitlines() if x.startswith("error:")] == \
        [next(x for x in err.splitlines() if x.startswith("error:"))], err  # exactly one
    for want in case.expect:
        assert _sub(want, cwd) in err, (want, err)
    assert "fix" in err, err
    lost = {k for k in before if after.get(k) != before[k]}
    assert not lost, f"changed or removed: {sorted(lost)}"
    if case.check is not None:
        case.check(cwd, out)


def test_at_least_40_cases():
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)


# -- whole jobs: a run in a relative directory, its export, a corrupt checkpoint ---------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A working directory with a 2-step run in runs/exp1 (checkpoints of steps 1 and 2)."""
    cwd = tmp_path_factory.mktemp("trained")
    out = tandem(cwd, "run", *SMALL, "run.steps=2", "run.output_dir=runs/exp1",
                 "checkpoint.every_steps=1", "checkpoint.async_save=false")
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (cwd / "runs/exp1/checkpoints").iterdir()) == ["1", "2"]
    return cwd


def test_relative_export_round_trip(trained):
    out = tandem(trained, "export", "runs/exp1", "exported/")
    assert out.returncode == 0, out.stderr
    assert "step 2" in out.stdout and "Traceback" not in out.stderr
    from trainer.hf import load_hf_model

    spec, params = load_hf_model(trained / "exported")  # config.json + safetensors load
    assert spec.num_layers == 2 and spec.hidden_size == 64
    assert params["layers"][0]["mlp"]["gate_proj"].shape == (64, 256)
    assert json.loads((trained / "exported/config.json").read_text())["architectures"]


def _corrupt(step_dir: Path) -> None:
    """The array files of a step are garbage; its metadata still says it is complete."""
    for f in (step_dir / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"garbage")


def test_corrupt_checkpoint_falls_back_with_a_short_warning(trained, tmp_path):
    shutil.copytree(trained / "runs", tmp_path / "runs")
    ckpts = tmp_path / "runs/exp1/checkpoints"
    _corrupt(ckpts / "2")

    # Export with --step of the corrupt one: an error, one line, nothing written.
    out = tandem(tmp_path, "export", "runs/exp1", "hf2", "--step", "2")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "checkpoints/2/state" in out.stderr and "tensorstore_spec" not in out.stderr
    assert len(out.stderr.splitlines()) == 1 and not (tmp_path / "hf2").exists()

    # Resume: step 2 is set aside, step 1 is used, and the warning says so in one line.
    out = tandem(tmp_path, "run", *SMALL, "run.steps=3", "run.output_dir=runs/exp1",
                 "run.resume=true")
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr and "tensorstore_spec" not in out.stderr, out.stderr
    warning = [x for x in out.stderr.splitlines() if "unreadable" in x]
    assert len(warning) == 1 and len(warning[0]) < 1000, out.stderr
    assert f"{ckpts}/2 is unreadable" in warning[0]
    assert f"moved to {ckpts}/corrupt-2" in warning[0]
    assert f"checkpoint of step 1 ({ckpts}/1) instead" in warning[0]
    assert len(out.stderr.splitlines()) <= 3, out.stderr
    assert "resumed from the checkpoint of step 1" in out.stdout
    assert (ckpts / "corrupt-2/state").is_dir()  # set aside, not deleted
    assert _training_steps(tmp_path / "runs/exp1/metrics.jsonl") == [1, 2, 3]
