"""Build (and push) the Tandem container image with docker: `tandem image build --tag T`.

The image is defined by `deploy/Dockerfile` in a Tandem source checkout; the build context is
the checkout's root (what `.dockerignore` leaves). Docker is not a dependency of Tandem: this
module finds the `docker` client, checks that its daemon answers, and says what is wrong when
either is missing.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO_ROOT / "deploy" / "Dockerfile"


class DockerUnavailableError(RuntimeError):
    """No docker client, or its daemon does not answer; the message says how to fix it."""


def find_docker(path_env: str | None = None) -> str:
    found = shutil.which("docker", path=path_env)
    if not found:
        raise DockerUnavailableError(
            "docker not found on PATH: building the image needs the docker client and a running "
            "daemon (fix: install Docker Engine, or build elsewhere with `tandem image build "
            "--print-command`)")
    return found


def check_daemon(docker: str, timeout_s: float = 20.0) -> None:
    """Raises DockerUnavailableError unless `docker info` reaches a daemon."""
    try:
        proc = subprocess.run([docker, "info", "--format", "{{.ServerVersion}}"],
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise DockerUnavailableError(
            f"`{docker} info` did not answer in {timeout_s:.0f}s: the docker daemon is not "
            "reachable (fix: start it, e.g. `sudo systemctl start docker`, or set DOCKER_HOST)"
        ) from None
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise DockerUnavailableError(
            "the docker daemon is not reachable"
            + (f" ({detail[-1]})" if detail else "")
            + " (fix: start it, e.g. `sudo systemctl start docker`, check DOCKER_HOST, or add "
            "your user to the docker group)")


def build_args(tag: str, *, dockerfile: Path = DOCKERFILE, context: Path = REPO_ROOT,
               build_arg: Mapping[str, str] | None = None, docker: str = "docker") -> list[str]:
    args = [docker, "build", "-f", str(dockerfile), "-t", tag]
    for k, v in (build_arg or {}).items():
        args += ["--build-arg", f"{k}={v}"]
    return [*args, str(context)]


def push_args(tag: str, docker: str = "docker") -> list[str]:
    return [docker, "push", tag]


def check_sources(dockerfile: Path, context: Path) -> None:
    if not dockerfile.is_file() or not (context / "pyproject.toml").is_file():
        raise FileNotFoundError(
            f"no Tandem source checkout at {context} (looked for {dockerfile} and "
            "pyproject.toml): the image is built from a clone of the repository (fix: run from "
            "a clone, or pass --context DIR --file DIR/deploy/Dockerfile)")


def run_all(commands: Sequence[Sequence[str]]) -> int:
    """Runs each command in turn (output straight to the terminal); stops at the first failure."""
    for argv in commands:
        rc = subprocess.call(list(argv))
        if rc != 0:
            return rc
    return 0
