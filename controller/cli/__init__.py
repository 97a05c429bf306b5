"""The `tandem` command line (entry point: `controller.cli.main:main`)."""
