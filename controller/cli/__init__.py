"""The `tandem` command line: `main` dispatches to a module per command (see dispatch.py)."""

from controller.cli.dispatch import build_parser, main

__all__ = ["build_parser", "main"]
