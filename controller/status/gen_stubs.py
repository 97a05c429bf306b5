"""Regenerates the checked-in gRPC stubs from `controller/status/status.proto`.

    python -m controller.status.gen_stubs            # rewrite controller/status/status_pb2*.py
    python -m controller.status.gen_stubs --out DIR  # write them under DIR/controller/status/

The stubs are checked in so that a plain `pip install -e .` works without grpcio-tools. They
were generated with grpcio-tools==GRPCIO_TOOLS_VERSION (pinned in the `dev` extra); the code
they contain needs protobuf >= the version in status_pb2.py's header and grpcio >= the
version in status_pb2_grpc.py (both pinned in pyproject.toml).
`tests/unit/controller/test_status.py` regenerates into a temp dir and fails if the
checked-in files drift from the proto.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

GRPCIO_TOOLS_VERSION = "1.85.1"
ROOT = Path(__file__).resolve().parents[2]  # the repository root; the proto's import root
PROTO = "controller/status/status.proto"
STUBS = ("controller/status/status_pb2.py", "controller/status/status_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Runs protoc (from grpcio-tools) on the proto; returns the written stub paths."""
    try:
        from grpc_tools import protoc
    except ImportError as e:
        raise RuntimeError(
            "grpcio-tools is not installed (fix: pip install -e '.[dev]')") from e
    out_dir = Path(out_dir)
    (out_dir / "controller" / "status").mkdir(parents=True, exist_ok=True)
    # `-I ROOT` with the path `controller/status/status.proto` makes the grpc stub import
    # `from controller.status import status_pb2`, which works from the installed package.
    rc = protoc.main([
        "grpc_tools.protoc", f"-I{ROOT}", f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}", str(ROOT / PROTO),
    ])
    if rc != 0:
        raise RuntimeError(f"protoc failed on {PROTO} with exit code {rc}")
    return [out_dir / s for s in STUBS]


def installed_tools_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("grpcio-tools")
    except PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT, help="output root (default: the repo)")
    ns = ap.parse_args(argv)
    have = installed_tools_version()
    if have != GRPCIO_TOOLS_VERSION:
        print(f"warning: grpcio-tools {have} is installed; the checked-in stubs were generated "
              f"with {GRPCIO_TOOLS_VERSION}. Update GRPCIO_TOOLS_VERSION and the pins in "
              f"pyproject.toml if you keep the new output.", file=sys.stderr)
    for p in generate(ns.out):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
