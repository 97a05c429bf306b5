"""`python -m controller.cli ...` runs the `tandem` command line."""

import sys

from controller.cli import main

sys.exit(main())
