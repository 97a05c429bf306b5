"""Build (and push) the Tandem container image with docker: `tandem image build --tag T`.

The image is defined by `deploy/Dockerfile` in a Tandem source checkout; the build context is
the checkout's root (what `.dockerignore` leaves). Docker is not a dependency of Tandem: this
module finds the `docker` client, checks that its daemon answers, and says what is wrong when
either is missing.

Models baked into the image (`--model DIR`, repeatable) are layered on afterwards, one
`docker build -f deploy/model.Dockerfile` per model with the model's directory as the context,
each under `MODELS_DIR/NAME`. The image declares them twice: a label per model
(`dev.tandem.model.NAME=/opt/tandem/models/NAME`), and a small JSON manifest written on this
machine (`manifest_path(tag)`, or `--manifest FILE`), which `tandem submit` reads, without
docker, to accept `model.path=/opt/tandem/models/NAME` for that image.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO_ROOT / "deploy" / "Dockerfile"
MODEL_DOCKERFILE = REPO_ROOT / "deploy" / "model.Dockerfile"
MODELS_DIR = "/opt/tandem/models"  # where `--model DIR` puts each model inside the image
MODEL_LABEL = "dev.tandem.model."  # + NAME: the label that declares one model
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


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


# ---------------------------------------------------------------------------------------------
# Models baked into the image, and the manifest that declares them


class ManifestError(ValueError):
    """A model to bake in, or an image's model manifest, that cannot be used; the message
    names the flag or file, the value and a fix."""


@dataclass(frozen=True)
class ImageModel:
    name: str
    path: str  # inside the image: MODELS_DIR/name
    source: str  # the local directory it was copied from


@dataclass(frozen=True)
class ImageManifest:
    """The models an image declares, as `tandem image build` recorded them."""

    image: str
    models: tuple[ImageModel, ...]
    file: str  # where this manifest was read from or written to

    def paths(self) -> list[str]:
        return [m.path for m in self.models]


def plan_models(values: Sequence[str]) -> list[ImageModel]:
    """`--model DIR` or `--model NAME=DIR` values -> the models to copy, each checked to be a
    Hugging Face model directory; NAME defaults to the directory's name."""
    models: dict[str, ImageModel] = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if sep and MODEL_NAME_RE.match(name) and not Path(value).expanduser().exists():
            directory = rest
        else:
            name, directory = "", value
        src = Path(directory).expanduser().absolute()
        if not (src / "config.json").is_file():
            what = "does not exist" if not src.exists() else "has no config.json"
            raise ManifestError(
                f"--model={value!r}: {src} {what} (fix: pass a local Hugging Face model "
                f"directory, e.g. one made by `huggingface-cli download REPO --local-dir DIR`)")
        name = name or src.name
        if not MODEL_NAME_RE.match(name):
            raise ManifestError(
                f"--model={value!r}: the name {name!r} must be letters, digits, '.', '_' and "
                f"'-' (fix: name it, e.g. --model=my-model={directory})")
        if name in models:
            raise ManifestError(
                f"--model={value!r}: a second model named {name!r} (fix: name one of them, "
                f"e.g. --model=other-{name}={directory})")
        models[name] = ImageModel(name, posixpath.join(MODELS_DIR, name), str(src))
    return list(models.values())


def model_build_args(tag: str, model: ImageModel, *, dockerfile: Path = MODEL_DOCKERFILE,
                     docker: str = "docker") -> list[str]:
    """The `docker build` that layers `model` onto the image `tag` and tags the result `tag`."""
    return [docker, "build", "-f", str(dockerfile), "-t", tag,
            "--build-arg", f"BASE_IMAGE={tag}", "--build-arg", f"MODEL_NAME={model.name}",
            "--label", f"{MODEL_LABEL}{model.name}={model.path}", model.source]


def manifest_path(image: str) -> Path:
    """Where `tandem image build` records the models of `image` on this machine:
    $XDG_CACHE_HOME/tandem/images (default ~/.cache/tandem/images), one file per image name."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", image)[-80:]
    digest = hashlib.sha256(image.encode()).hexdigest()[:10]  # slugs of two names may collide
    return Path(base) / "tandem" / "images" / f"{slug}-{digest}.json"


def write_manifest(image: str, models: Sequence[ImageModel], file: Path) -> ImageManifest:
    """Records that `image` holds `models` (an empty list too: a rebuild without models must
    not keep an older build's record)."""
    body = {"image": image, "models_dir": MODELS_DIR,
            "models": [{"name": m.name, "path": m.path, "source": m.source} for m in models]}
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(file.name + ".tmp")
        tmp.write_text(json.dumps(body, indent=2) + "\n")
        tmp.replace(file)  # a reader never sees half a file
    except OSError as e:
        raise ManifestError(f"the image's model manifest {str(file)!r} cannot be written "
                            f"({type(e).__name__}: {e}) (fix: pass --manifest FILE where "
                            f"you can write)") from None
    return ImageManifest(image, tuple(models), str(file))


def read_manifest(file: Path, flag: str = "--image-models") -> ImageManifest:
    """An image's model manifest, checked; a ManifestError names the file and a fix."""
    fix = ("fix: rebuild the image with `tandem image build --tag IMAGE --model DIR`, or pass "
           "the manifest that build wrote")
    try:
        body = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{flag}={str(file)!r} does not exist ({fix})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{flag}={str(file)!r} cannot be read as JSON "
                            f"({type(e).__name__}: {e}) ({fix})") from None
    try:
        models = tuple(ImageModel(str(m["name"]), posixpath.normpath(str(m["path"])),
                                  str(m.get("source", ""))) for m in body["models"])
        image = str(body["image"])
    except (TypeError, KeyError, AttributeError):
        raise ManifestError(
            f"{flag}={str(file)!r} is not an image model manifest (expected {{\"image\": "
            f"IMAGE, \"models\": [{{\"name\": NAME, \"path\": PATH}}, ...]}}) ({fix})") from None
    return ImageManifest(image, models, str(file))
