"""`tandem submit` and `tandem image build`: a job to a Pathways cluster, and its image.

The config is validated and its device split checked here; `deploy/` builds the xpk command
and the image.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from controller.cli.args import fail, split_args

SUBMIT_EPILOG = """\
examples:
  # see exactly what would be submitted (xpk's dry run; prints the JobSet manifest)
  tandem submit job.yaml topology.backend=native --cluster my-cluster --tpu-type v5p-128 \\
      --num-slices 2 --project my-project --zone us-east5-a \\
      --docker-image us-docker.pkg.dev/my-project/tandem/tandem:0.1.0 --dry-run
  # submit it
  tandem submit job.yaml topology.backend=native --cluster my-cluster --tpu-type v5p-128 ...
  # print the xpk command line and run xpk yourself
  tandem submit job.yaml topology.backend=native ... --print-command

The config is validated and its trainer/sampler split checked against the TPU type and slice
count before xpk runs. model.path must be readable in the pod: a gs:// URL, or a model baked
into the image (`tandem image build --model DIR`, then model.path=/opt/tandem/models/NAME); a
path on this machine is refused. xpk is found via --xpk, $TANDEM_XPK or PATH (it is not
installed with Tandem: `python3 -m venv ~/.xpk-venv && ~/.xpk-venv/bin/pip install xpk`).
"""


def cmd_submit(ns: argparse.Namespace) -> int:
    from controller.config import ConfigError
    from deploy import xpk as X

    config_path, overrides = split_args(ns.args)
    try:
        # model.path is checked for the pod (gs:// or declared in the image), not here.
        cfg = X.load_submit_config(config_path, overrides)
        spec = X.build_spec(
            cfg, cluster=ns.cluster, tpu_type=ns.tpu_type, num_slices=ns.num_slices,
            docker_image=ns.docker_image, project=ns.project, zone=ns.zone,
            priority=ns.priority, workload=ns.workload, backend_target=ns.backend_target,
            persistence=ns.pathways_persistence, extra_args=ns.xpk_arg or (),
            image_models=ns.image_models)
    except ConfigError as e:
        return fail(str(e))

    info = sys.stderr
    where = ", ".join(x for x in (f"project {spec.project}" if spec.project else "",
                                  f"zone {spec.zone}" if spec.zone else "") if x)
    print(f"tandem submit: workload '{spec.workload}' (run.name '{cfg.run.name}', config "
          f"{cfg.digest()}) on cluster '{spec.cluster}'" + (f" ({where})" if where else ""),
          file=info)
    print(f"  tpu:   {spec.tpu.describe(spec.num_slices)}", file=info)
    print(f"  split: {spec.plan.describe(cfg)}", file=info)
    print(f"  image: {spec.docker_image}", file=info)
    if spec.model:
        print(f"  model: {spec.model}", file=info)
    print(f"  runs:  tandem run {X.config_path_in_container(spec.workload)} (the resolved "
          f"config, shipped inside --command)", file=info)
    for w in (*spec.plan.warnings, *spec.warnings):
        print(f"  warning: {w}", file=info)

    if ns.print_command:
        print(shlex.join(X.xpk_args(spec, ns.xpk or "xpk", dry_run=ns.dry_run)))
        return 0
    try:
        xpk = X.find_xpk(ns.xpk)
    except X.XpkNotFoundError as e:
        return fail(str(e))

    if ns.dry_run:
        # xpk's log goes to stderr so stdout carries only the manifest (pipe it to a file).
        rc, manifest = X.submit_streaming(spec, xpk, dry_run=True, log=sys.stderr)
        if rc != 0:
            return fail(f"xpk exited with status {rc} (its output is above)")
        if manifest is None:
            return fail("xpk's dry run printed no manifest (its output is above)")
        print(f"# JobSet manifest that `xpk workload create-pathways` would apply for "
              f"'{spec.workload}' (dry run: nothing was submitted)")
        sys.stdout.write(manifest)
        return 0

    rc, _ = X.submit_streaming(spec, xpk, dry_run=False, log=sys.stdout)
    if rc != 0:
        return fail(f"xpk exited with status {rc} (its output is above)")
    print(f"\nsubmitted '{spec.workload}'. Follow it with:\n"
          f"  {xpk} workload list --cluster={spec.cluster}"
          + (f" --project={spec.project}" if spec.project else "")
          + (f" --zone={spec.zone}" if spec.zone else "") + "\n"
          f"  kubectl logs -f -l jobset.sigs.k8s.io/jobset-name={spec.workload},"
          f"jobset.sigs.k8s.io/replicatedjob-name=pathways-head -c jax-tpu")
    return 0


def cmd_image_build(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from deploy import image as I

    dockerfile = Path(ns.file) if ns.file else I.DOCKERFILE
    context = Path(ns.context) if ns.context else I.REPO_ROOT
    build_arg = dict(a.split("=", 1) for a in ns.build_arg or [] if "=" in a)
    bad = [a for a in ns.build_arg or [] if "=" not in a]
    if bad:
        return fail(f"--build-arg {bad[0]!r}: expected KEY=VALUE (e.g. --build-arg "
                    f"VLLM_TPU_VERSION=0.25.0)")
    if ns.vllm_tpu:
        build_arg["WITH_VLLM_TPU"] = "1"
    try:
        I.check_sources(dockerfile, context)
        models = I.plan_models(ns.model or [])
    except (FileNotFoundError, I.ManifestError) as e:
        return fail(str(e))
    manifest = Path(ns.manifest) if ns.manifest else I.manifest_path(ns.tag)

    def commands(docker: str) -> list[list[str]]:
        # The image, then one layer per model on top of it (same tag), then the push.
        cmds = [I.build_args(ns.tag, dockerfile=dockerfile, context=context,
                             build_arg=build_arg, docker=docker)]
        cmds += [I.model_build_args(ns.tag, m, docker=docker) for m in models]
        if ns.push:
            cmds.append(I.push_args(ns.tag, docker))
        return cmds

    if ns.print_command:
        print("\n".join(shlex.join(c) for c in commands("docker")))
        if ns.manifest:  # asked for by name: the models these commands will bake in
            try:
                I.write_manifest(ns.tag, models, manifest)
            except I.ManifestError as e:
                return fail(str(e))
            print(f"image models recorded in {manifest} (for tandem submit --image-models)",
                  file=sys.stderr)
        return 0
    try:
        docker = I.find_docker()
        I.check_daemon(docker)
    except I.DockerUnavailableError as e:
        return fail(str(e))
    rc = I.run_all(commands(docker))
    if rc != 0:
        return fail(f"docker exited with status {rc} (its output is above)")
    # Recorded only once the image exists: `tandem submit` trusts this record.
    try:
        I.write_manifest(ns.tag, models, manifest)
    except I.ManifestError as e:
        return fail(str(e))
    print(f"image {ns.tag} built" + (" and pushed" if ns.push else "")
          + "".join(f"\n  model {m.path} (from {m.source})" for m in models)
          + f"\nits models are recorded in {manifest} (tandem submit reads it for this tag)")
    return 0


def add_deploy_commands(sub: argparse._SubParsersAction) -> None:
    """Adds `submit` and `image` to the `tandem` command line."""
    from deploy.xpk import DEFAULT_BACKEND_TARGET, PRIORITIES

    s = sub.add_parser(
        "submit", help="submit a job to a Pathways cluster with `xpk workload create-pathways`",
        description="Validate a job config, check its device split against the TPU slices, and "
        "submit it to a GKE cluster with Pathways via `xpk workload create-pathways`.",
        epilog=SUBMIT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("args", nargs="*", metavar="[config.yaml] [key=value]")
    s.add_argument("--cluster", required=True, help="GKE cluster name (xpk --cluster)")
    s.add_argument("--tpu-type", required=True,
                   help="TPU type of one slice, as xpk names it (v5p-128, v6e-256, ...)")
    s.add_argument("--num-slices", type=int, default=1, help="number of slices (default 1)")
    s.add_argument("--docker-image", required=True,
                   help="the Tandem image the controller runs in (see `tandem image build`)")
    s.add_argument("--project", help="Google Cloud project (default: gcloud's)")
    s.add_argument("--zone", help="the cluster's zone (default: gcloud's)")
    s.add_argument("--workload", help="workload name (default: derived from run.name)")
    s.add_argument("--priority", choices=PRIORITIES, help="xpk priority (default: xpk's)")
    s.add_argument("--pathways-persistence", action="store_true",
                   help="ENABLE_PATHWAYS_PERSISTENCE=1: Pathways workers write checkpoints "
                   "directly to storage (use with a gs:// output directory)")
    s.add_argument("--backend-target", default=DEFAULT_BACKEND_TARGET,
                   help=f"JAX_BACKEND_TARGET for the controller (default {DEFAULT_BACKEND_TARGET})")
    s.add_argument("--image-models", metavar="FILE",
                   help="the manifest of the models baked into --docker-image, as written by "
                   "`tandem image build --model DIR` (default: the one recorded for that tag on "
                   "this machine); needed only for model.path=/opt/tandem/models/NAME")
    s.add_argument("--xpk", help="path of the xpk executable (default: $TANDEM_XPK, then PATH)")
    s.add_argument("--xpk-arg", action="append", metavar="ARG",
                   help="extra argument passed to xpk verbatim; repeatable "
                   "(e.g. --xpk-arg=--pathways-gcs-location=gs://BUCKET/pathways)")
    s.add_argument("--dry-run", action="store_true",
                   help="run xpk's dry run: print the manifest it would apply, submit nothing")
    s.add_argument("--print-command", action="store_true",
                   help="print the xpk command line and exit (xpk is not needed)")
    s.set_defaults(func=cmd_submit)

    img = sub.add_parser("image", help="build the Tandem container image",
                         description="Container image commands.")
    isub = img.add_subparsers(dest="image_command", metavar="COMMAND", required=True)
    b = isub.add_parser(
        "build", help="docker build (and push) deploy/Dockerfile",
        description="Build the Tandem image from deploy/Dockerfile with docker, bake models "
        "into it (--model), and optionally push it.")
    b.add_argument("--tag", required=True, help="image tag, e.g. "
                   "us-docker.pkg.dev/PROJECT/REPO/tandem:0.1.0")
    b.add_argument("--push", action="store_true", help="docker push the tag after building")
    b.add_argument("--vllm-tpu", action="store_true",
                   help="also install vLLM on TPU (tpu-inference, vllm-tpu) for the vllm sampler "
                   "backend (build arg WITH_VLLM_TPU=1)")
    b.add_argument("--model", action="append", metavar="[NAME=]DIR",
                   help="bake the Hugging Face model directory DIR into the image at "
                   "/opt/tandem/models/NAME (NAME: DIR's name), for model.path in jobs "
                   "submitted with this image; repeatable")
    b.add_argument("--manifest", metavar="FILE",
                   help="where to record the image's models for `tandem submit` (default: "
                   "~/.cache/tandem/images/, keyed by --tag); with --print-command, written only "
                   "when given")
    b.add_argument("--build-arg", action="append", metavar="KEY=VALUE",
                   help="passed to docker build (e.g. VLLM_TPU_VERSION=0.25.0); repeatable")
    b.add_argument("--file", help="Dockerfile (default: deploy/Dockerfile of this checkout)")
    b.add_argument("--context", help="build context (default: this checkout's root)")
    b.add_argument("--print-command", action="store_true",
                   help="print the docker commands and exit")
    b.set_defaults(func=cmd_image_build)
