#!/usr/bin/env python
"""Train a captioner: ``python tools/train.py CONFIG [key=value ...] [--resume RUN_DIR]`` (see --help)."""
import sys

from capkit.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
