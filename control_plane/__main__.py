"""`python -m control_plane` (and the `mlcp` script): the CLI; without a command, serve."""

from __future__ import annotations

import sys

from control_plane.cli import main

if __name__ == "__main__":
    sys.exit(main())
