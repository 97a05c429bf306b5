"""Build and run `xpk workload create-pathways` for a Tandem job.

A Pathways workload made by xpk is a JobSet with a head pod (the Pathways resource manager, the
IFRT proxy, and our controller container, which runs `--command`) and one worker job per TPU
slice. The controller is the only process that runs Tandem code; it sees every chip of every
slice through the proxy. This module turns a validated `JobConfig` plus the cluster flags into
xpk's argument list:

    xpk workload create-pathways --workload NAME --cluster C --tpu-type v5p-128 --num-slices N
        --docker-image IMG --command "<unpack config> && JAX_PLATFORMS=proxy ... tandem run ..."

The resolved config travels inside `--command` (base64, so no quoting or YAML-indentation can
break it) and is unpacked in the container before `tandem run` reads it: what runs is exactly
the config that was checked here. Its model.path must be one the pod can read: a gs:// URL, or
a model baked into the image and declared by the image's manifest (`tandem image build
--model DIR`, deploy/image.py); a path on the submitting machine is refused.

xpk is a separate tool with its own dependency pins; it is not a dependency of Tandem. It is
found through `--xpk PATH`, `$TANDEM_XPK`, or `PATH`.
"""

from __future__ import annotations

import base64
import math
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from controller.config import (
    ConfigError,
    JobConfig,
    TopologyError,
    apply_overrides,
    read_config_file,
    validate_config,
)
from deploy.image import MODELS_DIR, ImageManifest, ManifestError, manifest_path, read_manifest

# The IFRT proxy address a pod made by `xpk workload create-pathways` listens on (its sidecar);
# the controller's JAX_BACKEND_TARGET.
DEFAULT_BACKEND_TARGET = "grpc://127.0.0.1:29000"
XPK_ENV_VAR = "TANDEM_XPK"
PRIORITIES = ("very-low", "low", "medium", "high", "very-high")  # xpk's --priority choices
# xpk's own rule for --workload and --cluster (xpk/parser/validators.py): a Kubernetes
# DNS-1035 label, at most 40 characters so the pod names JobSet derives from it stay legal.
NAME_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
NAME_MAX = 40
CONFIG_DIR = "/tmp/tandem"  # where the container unpacks the shipped config


class XpkNotFoundError(RuntimeError):
    """xpk is not installed where we looked; the message says how to install it."""


class SubmitError(ConfigError):
    """A submission that cannot work; the message names the flag or field, value and fix."""


# ---------------------------------------------------------------------------------------------
# TPU types: how many chips, and how many JAX devices the controller will see


@dataclass(frozen=True)
class TpuGeneration:
    name_counts_cores: bool  # True: the number in "v5p-128" counts TensorCores, not chips
    cores_per_chip: int
    devices_per_chip: int  # JAX devices per chip: 1 with megacore (v4, v5p) or 1 core/chip


# Facts from xpk's system_characteristics (device name = prefix-(chips x cores per chip)) and
# JAX's TPU table (v4 and v5p fuse their two TensorCores into one "megacore" device; TPU7x has
# two TensorCores per chip and no megacore, so JAX sees two devices per chip).
TPU_GENERATIONS: dict[str, TpuGeneration] = {
    "v4": TpuGeneration(True, 2, 1),
    "v5p": TpuGeneration(True, 2, 1),
    "v5litepod": TpuGeneration(False, 1, 1),  # v5e
    "v6e": TpuGeneration(False, 1, 1),  # Trillium
    "tpu7x": TpuGeneration(True, 2, 2),  # Ironwood
}
_ALIASES = {"v5e": "v5litepod"}


@dataclass(frozen=True)
class TpuType:
    """One slice of a TPU type, e.g. v5p-128: 64 chips, 64 JAX devices."""

    name: str
    generation: str
    chips: int  # chips per slice
    devices: int  # JAX devices per slice (what the controller counts)

    def describe(self, num_slices: int = 1) -> str:
        per = f"{self.chips} chips" + (
            f" ({self.devices} JAX devices)" if self.devices != self.chips else "")
        if num_slices == 1:
            return f"{self.name}: {per}"
        return (f"{num_slices} x {self.name} ({per} each) = {self.chips * num_slices} chips, "
                f"{self.devices * num_slices} JAX devices")


def parse_tpu_type(name: str) -> TpuType:
    """`v5p-128` / `v6e-16` / `v5p-4x4x4` -> TpuType, or a SubmitError naming the fix."""
    known = ", ".join(f"{g}-N" for g in TPU_GENERATIONS)
    m = re.fullmatch(r"([a-z0-9]+)-(\d+(?:x\d+)*)", name.strip())
    if not m:
        raise SubmitError(
            f"--tpu-type={name!r}: expected GENERATION-SIZE like v5p-128, v6e-16 or v5p-4x4x4 "
            f"(known generations: {known})")
    gen_name, size = m.groups()
    if gen_name in _ALIASES:
        fixed = f"{_ALIASES[gen_name]}-{size}"
        raise SubmitError(
            f"--tpu-type={name!r}: xpk names this {fixed!r} (fix: --tpu-type={fixed})")
    gen = TPU_GENERATIONS.get(gen_name)
    if gen is None:
        raise SubmitError(
            f"--tpu-type={name!r}: unknown TPU generation {gen_name!r} for a Pathways job "
            f"(known: {known})")
    if "x" in size:  # a topology: the product of its dimensions is the chip count
        chips = math.prod(int(d) for d in size.split("x"))
    else:
        n = int(size)
        if gen.name_counts_cores and n % gen.cores_per_chip:
            raise SubmitError(
                f"--tpu-type={name!r}: {gen_name} sizes count TensorCores ({gen.cores_per_chip} "
                f"per chip), so {n} is not a whole number of chips (fix: e.g. "
                f"--tpu-type={gen_name}-{max(8, n - n % gen.cores_per_chip)})")
        chips = n // gen.cores_per_chip if gen.name_counts_cores else n
    if chips < 1:
        raise SubmitError(f"--tpu-type={name!r} has no chips")
    return TpuType(name=name, generation=gen_name, chips=chips,
                   devices=chips * gen.devices_per_chip)


# ---------------------------------------------------------------------------------------------
# The device split, checked against the cluster shape before anything is submitted


@dataclass(frozen=True)
class DevicePlan:
    total: int  # JAX devices the controller will see: devices per slice x slices
    trainer: int
    sampler: int
    trainer_shape: tuple[int, ...]
    sampler_shape: tuple[int, ...]
    warnings: tuple[str, ...] = ()

    def describe(self, cfg: JobConfig) -> str:
        def mesh(names: Sequence[str], shape: tuple[int, ...]) -> str:
            return ", ".join(f"{k}={v}" for k, v in zip(names, shape, strict=True))

        t = mesh(list(cfg.topology.trainer_mesh), self.trainer_shape)
        s = mesh(list(cfg.topology.sampler_mesh), self.sampler_shape)
        return (f"trainer {self.trainer} devices mesh({t}) | "
                f"sampler {self.sampler} devices mesh({s})")


def plan_devices(cfg: JobConfig, tpu: TpuType, num_slices: int) -> DevicePlan:
    """Checks the config's trainer/sampler split against `num_slices` slices of `tpu`.

    The same functions that split the real devices at run time (`TopologyConfig.split_counts`,
    `mesh_shape`) run here on the device count the controller will see, so a split that cannot
    be built fails now, with both numbers, instead of after the cluster has been allocated.
    """
    if cfg.topology.backend != "native":
        raise SubmitError(
            f"topology.backend={cfg.topology.backend}: a Pathways job must use the cluster's "
            "devices (fix: add topology.backend=native to the config or the command line)")
    if num_slices < 1:
        raise SubmitError(f"--num-slices={num_slices}: must be >= 1 (fix: --num-slices=1)")
    total = tpu.devices * num_slices
    where = f"on {tpu.describe(num_slices)}"
    try:
        n_train, n_samp = cfg.topology.split_counts(total)
        t_shape = cfg.topology.mesh_shape("trainer", n_train)
        s_shape = cfg.topology.mesh_shape("sampler", n_samp)
    except TopologyError as e:
        raise SubmitError(f"{e} [{where}]") from None
    warnings = []
    if num_slices > 1:
        # A side that ends inside a slice shares that slice with the other side: legal, but its
        # collectives then cross DCN as well as ICI. Whole slices per side keep them on ICI.
        per = tpu.devices
        if n_train % per:
            warnings.append(
                f"the trainer's {n_train} devices are not a whole number of {tpu.name} slices "
                f"({per} devices each): one slice is shared by trainer and sampler (consider "
                f"topology.trainer_devices={max(per, n_train - n_train % per)})")
    return DevicePlan(total, n_train, n_samp, t_shape, s_shape, tuple(warnings))


# ---------------------------------------------------------------------------------------------
# Names


def validate_name(value: str, flag: str) -> str:
    """A Kubernetes name xpk accepts (DNS-1035 label, <= 40 chars), or a SubmitError."""
    if len(value) > NAME_MAX or not NAME_RE.match(value):
        why = (f"is {len(value)} characters (at most {NAME_MAX})" if len(value) > NAME_MAX
               else "must be lowercase letters, digits and '-', start with a letter and end "
               "with a letter or digit")
        hint = slugify(value)
        raise SubmitError(f"{flag}={value!r} {why} (fix: e.g. {flag}={hint})")
    return value


def slugify(text: str) -> str:
    """Maps any text to a valid workload name: lowercase, '-' separated, <= 40 characters."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    if not s or not s[0].isalpha():
        s = f"tandem-{s}".rstrip("-")
    return s[:NAME_MAX].rstrip("-")


def workload_name(cfg: JobConfig, override: str | None = None) -> str:
    """The xpk workload (JobSet) name: `--workload` if given, else derived from run.name."""
    if override is not None:
        return validate_name(override, "--workload")
    return validate_name(slugify(cfg.run.name), "--workload")


# ---------------------------------------------------------------------------------------------
# model.path, as the controller's pod sees it


def load_submit_config(config_path: str | Path | None, overrides: Sequence[str]) -> JobConfig:
    """The job's config, validated as `load_config` does, except that model.path is not looked
    for on this machine.

    `tandem run` checks that model.path holds a model where it runs, and for a submission that
    is the pod: a model baked into the image does not exist here, and a bucket may not be
    readable from here. So the config is validated without model.path, which `build_spec` then
    checks against what the pod can read (`pod_model_path`). The rule that model.path is not
    combined with the shape fields is kept.
    """
    data = read_config_file(config_path) if config_path is not None else {}
    data = apply_overrides(data, list(overrides))
    model = data.get("model")
    path = model.get("path") if isinstance(model, dict) else None
    if not isinstance(path, str):  # unset, null, or a wrong type that validation reports
        return validate_config(data)
    rest = {k: v for k, v in model.items() if k != "path"}
    cfg = validate_config({**data, "model": rest})
    clash = sorted(set(rest) - {"dtype"})
    if clash:
        names = ", ".join(f"model.{k}" for k in clash)
        raise SubmitError(
            f"model.path={path!r} defines the model, but {names} "
            f"{'is' if len(clash) == 1 else 'are'} also set (fix: drop {names})")
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": path})})


_POD_FIX = ("fix: upload it to a bucket and set model.path=gs://..., or bake it into the image "
            f"with `tandem image build --model DIR` and set model.path={MODELS_DIR}/NAME")


def pod_model_path(path: str, docker_image: str,
                   manifest: ImageManifest | None = None) -> tuple[str, str, tuple[str, ...]]:
    """model.path for the pod: (the path to ship, a line describing it, warnings).

    A gs:// URL is shipped as is (the job reads it from the bucket). A path under MODELS_DIR
    is accepted when the image's manifest declares it: `manifest` (from --image-models), else
    the one `tandem image build` recorded for `docker_image` on this machine. Anything else is
    a path on this machine, which the pod cannot see, and is refused.
    """
    if path.startswith("gs://"):
        return path, f"{path} (read from the bucket by the job)", ()
    if "://" in path:
        scheme = path.split("://", 1)[0]
        raise SubmitError(f"model.path={path!r}: the job reads a model from a gs:// bucket or "
                          f"from its image, not from {scheme}:// ({_POD_FIX})")
    norm = posixpath.normpath(path)
    if norm != MODELS_DIR and not norm.startswith(MODELS_DIR + "/"):
        raise SubmitError(
            f"model.path={path!r} is a path on this machine, and the job runs in a pod that "
            f"sees only gs:// URLs and the files of its image ({_POD_FIX})")
    if manifest is None:
        default = manifest_path(docker_image)
        if not default.is_file():
            raise SubmitError(
                f"model.path={path!r} is inside the image, but no models are recorded for "
                f"--docker-image={docker_image} on this machine (looked for {default}) (fix: "
                f"build it with `tandem image build --tag {docker_image} --model DIR`, or pass "
                f"the manifest that build wrote with --image-models FILE)")
        try:
            manifest = read_manifest(default, flag="the manifest of --docker-image")
        except ManifestError as e:
            raise SubmitError(str(e)) from None
    if norm not in manifest.paths():
        declared = ", ".join(manifest.paths()) or "no models"
        raise SubmitError(
            f"model.path={path!r} is not a model of --docker-image={docker_image}: "
            f"{manifest.file} declares {declared} (fix: set model.path to one of those, or "
            f"rebuild the image with `tandem image build --tag {docker_image} --model DIR`)")
    warnings = ()
    if manifest.image != docker_image:
        warnings = (f"{manifest.file} was recorded for {manifest.image}, not for "
                    f"--docker-image={docker_image}: make sure that image holds {norm}",)
    return norm, f"{norm} (in the image; declared by {manifest.file})", warnings


# ---------------------------------------------------------------------------------------------
# The command the controller container runs


def config_path_in_container(workload: str) -> str:
    return f"{CONFIG_DIR}/{workload}/config.yaml"


def container_command(cfg: JobConfig, workload: str, *, backend_target: str,
                      persistence: bool) -> str:
    """The shell command for xpk's `--command`: unpack the resolved config, run it on Pathways.

    The YAML is base64-encoded so that it survives xpk's templating (the command is pasted into
    a YAML block and run by `bash -c`) byte for byte.
    """
    # to_yaml reads back to the same config; with model.path its model section is path and
    # dtype only, which the pod's validator accepts.
    blob = base64.b64encode(cfg.to_yaml().encode()).decode()
    path = config_path_in_container(workload)
    env = ["JAX_PLATFORMS=proxy", f"JAX_BACKEND_TARGET={backend_target}",
           f"ENABLE_PATHWAYS_PERSISTENCE={1 if persistence else 0}"]
    return (f"mkdir -p {shlex.quote(str(Path(path).parent))} && "
            f"echo {blob} | base64 -d > {shlex.quote(path)} && "
            f"{' '.join(env)} tandem run {shlex.quote(path)}")


def decode_shipped_config(command: str) -> str:
    """The config YAML inside a `container_command` (for tests and `--print-command` readers)."""
    m = re.search(r"echo ([A-Za-z0-9+/=]+) \| base64 -d", command)
    if not m:
        raise ValueError("no shipped config in this command")
    return base64.b64decode(m.group(1)).decode()


# ---------------------------------------------------------------------------------------------
# The xpk argument list


@dataclass(frozen=True)
class SubmitSpec:
    """Everything `tandem submit` passes to xpk, checked."""

    cluster: str
    tpu: TpuType
    num_slices: int
    docker_image: str
    workload: str
    command: str
    plan: DevicePlan
    project: str | None = None
    zone: str | None = None
    priority: str | None = None
    extra_args: tuple[str, ...] = field(default_factory=tuple)
    model: str | None = None  # model.path as the pod reads it, described
    warnings: tuple[str, ...] = ()


def build_spec(cfg: JobConfig, *, cluster: str, tpu_type: str, num_slices: int,
               docker_image: str, project: str | None = None, zone: str | None = None,
               priority: str | None = None, workload: str | None = None,
               backend_target: str = DEFAULT_BACKEND_TARGET, persistence: bool = False,
               extra_args: Sequence[str] = (),
               image_models: str | Path | None = None) -> SubmitSpec:
    """Checks every input (names, TPU type, split, image, model.path) and builds the
    submission. `image_models`: the manifest of the models baked into `docker_image`
    (default: the one `tandem image build` recorded for it on this machine)."""
    validate_name(cluster, "--cluster")
    tpu = parse_tpu_type(tpu_type)
    plan = plan_devices(cfg, tpu, num_slices)
    if not docker_image or any(c.isspace() for c in docker_image):
        raise SubmitError(
            f"--docker-image={docker_image!r}: expected an image reference such as "
            "us-docker.pkg.dev/PROJECT/REPO/tandem:TAG (build one with `tandem image build`)")
    manifest = None
    if image_models is not None:  # read even when unused: a wrong file is a mistake either way
        try:
            manifest = read_manifest(Path(image_models))
        except ManifestError as e:
            raise SubmitError(str(e)) from None
    model_note, warnings = None, ()
    if cfg.model.path is not None:
        path, model_note, warnings = pod_model_path(cfg.model.path, docker_image, manifest)
        if path != cfg.model.path:
            cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": path})})
    if priority is not None and priority not in PRIORITIES:
        raise SubmitError(f"--priority={priority!r}: must be one of {', '.join(PRIORITIES)}")
    name = workload_name(cfg, workload)
    if not backend_target.startswith("grpc://"):
        raise SubmitError(f"--backend-target={backend_target!r}: must be grpc://host:port "
                          f"(fix: --backend-target={DEFAULT_BACKEND_TARGET})")
    command = container_command(cfg, name, backend_target=backend_target,
                                persistence=persistence)
    return SubmitSpec(cluster=cluster, tpu=tpu, num_slices=num_slices,
                      docker_image=docker_image, workload=name, command=command, plan=plan,
                      project=project, zone=zone, priority=priority,
                      extra_args=tuple(extra_args), model=model_note, warnings=warnings)


def xpk_args(spec: SubmitSpec, xpk: str = "xpk", *, dry_run: bool = False,
             manifest_file: str | None = None) -> list[str]:
    """The argv for `xpk workload create-pathways` (argv[0] is `xpk`)."""
    args = [xpk, "workload", "create-pathways",
            f"--workload={spec.workload}", f"--cluster={spec.cluster}"]
    if spec.project:
        args.append(f"--project={spec.project}")
    if spec.zone:
        args.append(f"--zone={spec.zone}")
    args += [f"--tpu-type={spec.tpu.name}", f"--num-slices={spec.num_slices}",
             f"--docker-image={spec.docker_image}", f"--command={spec.command}"]
    if spec.priority:
        args.append(f"--priority={spec.priority}")
    args += list(spec.extra_args)
    if dry_run:
        args.append("--dry-run")
    if manifest_file:
        args.append(f"--output-manifest-file={manifest_file}")
    return args


# ---------------------------------------------------------------------------------------------
# Finding and running xpk


INSTALL_HINT = (
    "xpk is a separate tool with its own pinned dependencies, so Tandem does not install it. "
    "Install it in its own virtual environment:\n"
    "    python3 -m venv ~/.xpk-venv && ~/.xpk-venv/bin/pip install xpk\n"
    "then pass --xpk ~/.xpk-venv/bin/xpk, or export TANDEM_XPK=~/.xpk-venv/bin/xpk, or put it "
    "on PATH. (A real submission also needs xpk's prerequisites: gcloud, kubectl and crane; "
    "`--dry-run` and `--print-command` need none of them.)"
)


def find_xpk(explicit: str | None = None, environ: dict[str, str] | None = None) -> str:
    """The xpk executable: `--xpk`, then `$TANDEM_XPK`, then PATH."""
    env = os.environ if environ is None else environ
    for source, value in (("--xpk", explicit), (f"${XPK_ENV_VAR}", env.get(XPK_ENV_VAR))):
        if value:
            path = Path(value).expanduser()
            if path.is_file() and os.access(path, os.X_OK):
                return str(path)
            found = shutil.which(value, path=env.get("PATH"))
            if found:
                return found
            raise XpkNotFoundError(
                f"{source}={value!r}: no executable xpk there (fix: point it at the `xpk` "
                f"inside the virtual environment where xpk is installed).\n{INSTALL_HINT}")
    found = shutil.which("xpk", path=env.get("PATH"))
    if found:
        return found
    raise XpkNotFoundError(f"xpk not found (looked at --xpk, ${XPK_ENV_VAR} and PATH).\n"
                           f"{INSTALL_HINT}")


def stream(argv: Sequence[str], out: TextIO, env: dict[str, str] | None = None,
           on_line: Callable[[str], None] | None = None) -> int:
    """Runs `argv`, copying its stdout and stderr line by line to `out`; returns its exit code."""
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, env=env)
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            out.write(line)
            out.flush()
            if on_line is not None:
                on_line(line)
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        raise
    return proc.wait()


_MANIFEST_START = re.compile(r"^\[XPK\] Temp file \([0-9a-f]+\) content:\s*$")


def manifest_from_log(log: str) -> str | None:
    """The JobSet YAML that xpk prints in a dry run (between 'Temp file (...) content:' and
    the next '[XPK]' line); None if the log has none."""
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if _MANIFEST_START.match(line):
            body = []
            for nxt in lines[i + 1:]:
                if nxt.startswith("[XPK]"):
                    break
                body.append(nxt)
            return "\n".join(body).strip("\n") + "\n"
    return None


def submit_streaming(spec: SubmitSpec, xpk: str, *, dry_run: bool, log: TextIO = sys.stdout,
                     workdir: Path | None = None) -> tuple[int, str | None]:
    """Runs xpk, streaming its output to `log`. Returns (exit code, manifest or None).

    In a dry run xpk prints the commands it would run without running them, and writes the
    JobSet manifest to a file we read back. An xpk too old for `--output-manifest-file` is run
    again without it, and the manifest is taken from its log.
    """
    import tempfile

    if not dry_run:
        return stream(xpk_args(spec, xpk), log), None
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        mfile = str(Path(tmp) / f"{spec.workload}.yaml")
        captured: list[str] = []
        rc = stream(xpk_args(spec, xpk, dry_run=True, manifest_file=mfile), log,
                    on_line=captured.append)
        text = "".join(captured)
        if rc != 0 and "unrecognized arguments" in text and "--output-manifest-file" in text:
            captured.clear()
            rc = stream(xpk_args(spec, xpk, dry_run=True), log, on_line=captured.append)
        if Path(mfile).is_file():
            return rc, Path(mfile).read_text()
        return rc, manifest_from_log("".join(captured))
