"""`tandem`: the command line's one dispatcher; each command lives in its own module.

    tandem run     controller/cli/run.py      run a GRPO job
    tandem plan    controller/cli/plan.py     memory and weight-sync plan for a topology
    tandem export  controller/cli/export.py   a checkpoint -> a Hugging Face directory
    tandem status  controller/cli/status.py   query a running job over gRPC
    tandem submit  controller/cli/submit.py   submit to a Pathways cluster with xpk
    tandem image   controller/cli/submit.py   build the container image
"""

from __future__ import annotations

import argparse
import os
import sys

from controller.cli.eval import add_eval_parser
from controller.cli.export import add_export_parser
from controller.cli.plan import add_plan_parser
from controller.cli.run import add_run_parser
from controller.cli.status import add_status_parser
from controller.cli.submit import add_deploy_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tandem",
        description="Tandem: single-controller GRPO post-training on JAX, with disjoint trainer "
        "and sampler sub-meshes. With no config, `tandem run` trains a tiny model on a built-in "
        "task in CPU simulation.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_run_parser(sub)
    add_deploy_commands(sub)  # `tandem submit`, `tandem image build`
    add_plan_parser(sub)
    add_status_parser(sub)
    add_export_parser(sub)
    add_eval_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help()
        return 0
    try:
        return ns.func(ns)
    except KeyboardInterrupt:  # a second Ctrl-C: the first one already asked for a clean stop
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `tandem run --print-config | head`: the reader is gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
