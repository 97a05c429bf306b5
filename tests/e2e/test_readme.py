"""Every command the README tells a user to run exits 0 in a fresh clone of the repository.

What is a command, by the fence's language:

* ``bash`` (or ``sh``, ``shell``): each logical line is a command (a trailing backslash joins
  lines; blank and comment-only lines are skipped). A block's commands run in order in one
  bash process in the clone's root; each must exit 0.
* no language, with lines that start with ``$ ``: a transcript. Each ``$ `` line is a command
  and the other lines are what it prints. The command runs and must exit with the status in
  EXPECTED_STATUS (default 0); every output line, up to a ``...`` or ``…`` where the README
  elides, must appear in what it prints.
* no language and no ``$ `` line, or ``text``: output or a diagram, not run.
* ``python``, ``yaml``, ``json`` or ``toml`` whose first line is a comment that names a file
  (``# my_job.yaml: ...``): that file. It is written into the clone before any block runs.
* ``python`` that names no file: a snippet to run. It runs with ``python`` in the clone's root.
* ``yaml`` that names no file: a fragment of a config, not run.
* any other language: the test fails until this docstring gives it a rule.

The blocks run in README order in one clone, so a block may use a file an earlier one wrote.
Shell state (``export``, ``cd``) does not carry from one block to the next.

The environment is the one a user has after the quick start's ``pip install -e .``: this
interpreter's bin directory (with ``tandem`` and ``python``) comes first on PATH and the clone
first on PYTHONPATH, so the clone's committed code runs, not this working tree's. HOME is a new
empty directory, so ``~`` never reaches the real one, and HF_HUB_OFFLINE=1 keeps the tests off
the network. The test session's JAX_PLATFORMS and XLA_FLAGS are removed, because the CLI must set
up the simulated devices itself. The session's JAX compile cache stays, so runs that compile
the same programs share them. The README is read from this working tree.

Some commands do not run as written, each with its reason. The RUN_INSTEAD table covers
commands whose install steps need the network: the rest of the command runs. The NOT_RUN table
covers commands that need what a CI machine cannot have (a cloud project, a GKE cluster,
gcloud, kubectl, a docker daemon, a TPU, the network), and CI's own command. A README command
that is in neither table runs, so the README cannot gain an untested command. A table entry
that matches no README command fails the test, so the tables cannot go stale. Blocks that take
more than about 60 s are marked ``slow`` (run them with ``pytest -m slow``).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # the blocks run whole jobs

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
TIMEOUT_S = 540  # one block; under pytest-timeout's 600 s, so a hang shows the block's output

_PIP = "the venv and `pip install` need the network (PyPI)"
_GKE = "needs a cloud project with a GKE cluster"

# README command -> (what runs instead, why).
RUN_INSTEAD: dict[str, tuple[str, str]] = {
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && tandem run": (
        "tandem run", f"{_PIP}; the test's environment is that install, so `tandem run` runs"),
}

# README command -> why it does not run.
NOT_RUN: dict[str, str] = {
    "huggingface-cli download Qwen/Qwen2.5-0.5B-Instruct --local-dir ~/models/qwen2.5-0.5b":
        "downloads a model from the Hugging Face Hub (network)",
    "tandem run model.path=~/models/qwen2.5-0.5b model.dtype=bfloat16 run.steps=50":
        "needs the downloaded model; the next block runs the same path on a tiny local model",
    "python3 -m venv ~/.xpk-venv && ~/.xpk-venv/bin/pip install xpk": _PIP,
    "export TANDEM_XPK=~/.xpk-venv/bin/xpk": "sets up for the GKE commands, which do not run",
    "export PROJECT=my-project ZONE=us-east5-a CLUSTER=tandem-v5p REGION=us-east5":
        "sets up for the GKE commands, which do not run",
    "$TANDEM_XPK cluster create-pathways --cluster=$CLUSTER --project=$PROJECT --zone=$ZONE "
    "--tpu-type=v5p-128 --num-slices=2 --reservation=my-reservation":
        f"creates TPU slices; {_GKE}, gcloud and xpk",
    "gcloud container clusters get-credentials $CLUSTER --project=$PROJECT --location=$REGION":
        f"{_GKE} and gcloud",
    "export IMAGE=$REGION-docker.pkg.dev/$PROJECT/tandem/tandem:0.1.0":
        "sets up for the image push and submit, which do not run",
    "tandem image build --tag $IMAGE --push":
        "needs a docker daemon and a registry to push to (CI builds the image in "
        "deploy/ci_docker_build.sh where a daemon answers)",
    "tandem submit job.yaml --cluster=$CLUSTER --project=$PROJECT --zone=$ZONE "
    "--tpu-type=v5p-128 --num-slices=2 --docker-image=$IMAGE --dry-run > jobset.yaml":
        "needs xpk, which only the PyPI install above provides (tests/integration/"
        "test_xpk_dryrun.py runs this dry run with the real xpk)",
    "tandem submit job.yaml --cluster=$CLUSTER --project=$PROJECT --zone=$ZONE "
    "--tpu-type=v5p-128 --num-slices=2 --docker-image=$IMAGE":
        f"submits a workload; {_GKE}, gcloud and xpk",
    "POD=$(kubectl get pods -o name -l jobset.sigs.k8s.io/jobset-name=grpo-v5p,"
    "jobset.sigs.k8s.io/replicatedjob-name=pathways-head)": f"{_GKE} and kubectl",
    "kubectl logs -f $POD -c jax-tpu": f"{_GKE} and kubectl",
    "kubectl port-forward $POD 50051:50051 &": f"{_GKE} and kubectl",
    "tandem status --address 127.0.0.1:50051 --watch":
        "needs the port-forward to the job running on GKE",
    "$TANDEM_XPK workload delete --workload=grpo-v5p --cluster=$CLUSTER --project=$PROJECT "
    "--zone=$ZONE": f"{_GKE}, gcloud and xpk",
    "tandem status --address 127.0.0.1:35919 --watch":
        "needs a running job on that port (each job picks its own); tests/integration/"
        "test_status_job.py runs `tandem status` against a live job",
    'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[dev]" && ruff check . '
    "&& pytest": "CI's own command (.ci/run): it runs this whole suite, this test included",
}

# README command -> the exit status the README gives it.
EXPECTED_STATUS: dict[str, int] = {
    "tandem run sampling.temperature=-1 sampling.tempature=1": 2,  # "fails ... (exit status 2)"
}

# README command -> why its block is marked slow.
SLOW: dict[str, str] = {
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && tandem run":
        "400 steps: about a minute on 2 cores",
}

SHELL_LANGS = ("bash", "sh", "shell")
FILE_LANGS = ("python", "yaml", "json", "toml")
NAMED_FILE = re.compile(r"#\s*([\w.-]+\.\w+)(?=$|[\s:])")  # "# my_job.yaml: ..." -> my_job.yaml


@dataclass
class Command:
    text: str  # as written (continuation lines joined), trailing comment included
    key: str  # without the trailing comment, whitespace collapsed: the tables' keys


@dataclass
class Block:
    line: int  # of the opening fence, 1-based
    lang: str
    body: str
    kind: str = ""  # shell, transcript, snippet, file, output, fragment or unknown
    commands: list[Command] = field(default_factory=list)
    output: list[str] = field(default_factory=list)  # a transcript's expected lines
    file: str | None = None

    @property
    def id(self) -> str:
        return f"L{self.line}-{self.kind}"


def _strip_comment(line: str) -> str:
    """`line` without a trailing shell comment (a `#` that starts a word outside quotes)."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            if c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def _commands(lines: list[str]) -> list[Command]:
    """Logical shell lines: backslash continuations joined; blank and comment lines dropped."""
    out, pending = [], ""
    for raw in lines:
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        text = (pending + raw).strip()
        pending = ""
        if text and not text.startswith("#"):
            assert "<<" not in text, f"a here-document needs a parser: {text!r}"
            out.append(Command(text, " ".join(_strip_comment(text).split())))
    return out


def parse_readme(text: str) -> list[Block]:
    """Every fenced block of `text`, classified by the rules in the module docstring."""
    blocks, current = [], None
    for n, line in enumerate(text.splitlines(), start=1):
        fence = re.match(r"^```(\S*)\s*$", line)
        if current is None:
            if fence:
                current = Block(n, fence.group(1).lower(), "")
        elif fence and not fence.group(1):
            blocks.append(current)
            current = None
        else:
            current.body += line + "\n"
    assert current is None, f"README.md: the block at line {current.line} is never closed"
    for b in blocks:
        lines = b.body.splitlines()
        named = NAMED_FILE.match(lines[0]) if lines else None
        if b.lang in SHELL_LANGS:
            b.kind, b.commands = "shell", _commands(lines)
        elif b.lang in ("", "text") and any(x.startswith("$ ") for x in lines):
            b.kind = "transcript"
            b.commands = _commands([x[2:] for x in lines if x.startswith("$ ")])
            b.output = [x for x in lines if x.strip() and not x.startswith("$ ")]
        elif b.lang in ("", "text"):
            b.kind = "output"
        elif b.lang in FILE_LANGS and named:
            b.kind, b.file = "file", named.group(1)
        elif b.lang == "python":
            b.kind = "snippet"
        elif b.lang == "yaml":
            b.kind = "fragment"
        else:
            b.kind = "unknown"
    return blocks


BLOCKS = parse_readme(README.read_text())
RUNNABLE = [b for b in BLOCKS if b.kind in ("shell", "transcript", "snippet")]


def _param(b: Block):
    slow = any(c.key in SLOW for c in b.commands)
    return pytest.param(b, id=b.id, marks=[pytest.mark.slow] if slow else [])


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A fresh clone of this repository with the README's named files written into it."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout of the repository to clone")
    base = tmp_path_factory.mktemp("readme")
    repo = base / "tandem"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(repo)], check=True,
                   capture_output=True, text=True, timeout=300)
    for b in BLOCKS:
        if b.kind == "file":
            (repo / b.file).write_text(b.body)
    (base / "home").mkdir()
    return repo


def _env(repo: Path) -> dict[str, str]:
    drop = ("JAX_PLATFORMS", "XLA_FLAGS", "PYTHONPATH", "XDG_CACHE_HOME", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items()
           if k not in drop and not k.startswith("TANDEM_")}
    bindir = str(Path(sys.executable).parent)
    return env | {"PATH": bindir + os.pathsep + env.get("PATH", ""),
                  "VIRTUAL_ENV": str(Path(bindir).parent), "PYTHONPATH": str(repo),
                  "HOME": str(repo.parent / "home"), "HF_HUB_OFFLINE": "1"}


def _shell_script(b: Block) -> tuple[str, list[str], list[str]]:
    """The bash script that runs `b`'s commands, each checked; the commands it runs; and the
    reasons for the ones it does not."""
    lines, ran, skipped = [], [], []
    for c in b.commands:
        run = c.text
        if c.key in NOT_RUN:
            skipped.append(NOT_RUN[c.key])
            continue
        if c.key in RUN_INSTEAD:
            run = RUN_INSTEAD[c.key][0]
        ran.append(run)
        want = EXPECTED_STATUS.get(c.key, 0)
        lines += [run, f'readme_rc=$?; if [ "$readme_rc" -ne {want} ]; then echo "README command '
                  f'exited $readme_rc, not {want}: "{shlex.quote(c.text)} >&2; exit 1; fi']
    return "\n".join(lines), ran, skipped


def _tail(text: str, n: int = 6000) -> str:
    return text if len(text) <= n else "...\n" + text[-n:]


@pytest.mark.parametrize("block", [_param(b) for b in RUNNABLE])
def test_readme_block_runs(block: Block, clone: Path):
    if block.kind == "snippet":
        script = clone.parent / f"readme_{block.id}.py"
        script.write_text(block.body)
        argv, what = [sys.executable, str(script)], block.body
    else:
        text, ran, skipped = _shell_script(block)
        if not ran:
            pytest.skip("not run (NOT_RUN): " + "; ".join(dict.fromkeys(skipped)))
        argv, what = ["bash", "-c", text], "\n".join(ran)
    try:
        proc = subprocess.run(argv, cwd=clone, env=_env(clone), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""
        pytest.fail(f"README.md line {block.line}: still running after {TIMEOUT_S}s:\n{what}\n"
                    f"{_tail(out)}")
    out = proc.stdout
    where = f"README.md line {block.line}, ran:\n{what}\n--- output ---\n{_tail(out)}"
    assert proc.returncode == 0, where
    assert "Traceback" not in out, where
    flat = " ".join(out.split())  # the console wraps long lines
    for line in block.output:
        shown = " ".join(re.split(r"\.\.\.|…", line)[0].split())
        assert shown in flat, f"the README shows {shown!r}, not printed. {where}"


def test_every_block_has_a_rule():
    unknown = [f"line {b.line}: ```{b.lang}" for b in BLOCKS if b.kind == "unknown"]
    assert not unknown, f"give these README blocks a rule in {__name__}: {unknown}"
    assert RUNNABLE, "found no README command to run: is the parser broken?"


def test_tables_name_readme_commands():
    commands = {c.key for b in BLOCKS for c in b.commands}
    for table in (RUN_INSTEAD, NOT_RUN, EXPECTED_STATUS, SLOW):
        stale = sorted(set(table) - commands)
        assert not stale, f"no longer README commands, drop them from the table: {stale}"
