#!/usr/bin/env python
"""Run an attention ablation: same as ``python -m capkit ablate``; see ``--help``."""
import sys

from capkit.cli.ablate import main

if __name__ == "__main__":
    sys.exit(main())
