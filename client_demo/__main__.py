"""`python -m client_demo host|viewer|watch|gift|...`: the terminal client (client_demo/cli.py)."""

from __future__ import annotations

import contextlib
import sys

from client_demo.cli import main

with contextlib.suppress(BrokenPipeError):
    sys.exit(main())
