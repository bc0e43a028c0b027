"""`python -m dasgd` (and `torchrun -m dasgd train ...`) runs the command line."""

from __future__ import annotations

import sys

from dasgd.cli import main

sys.exit(main())
