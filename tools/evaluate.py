#!/usr/bin/env python
"""Score captions: same as ``python -m capkit evaluate``; see ``--help``."""
import sys

from capkit.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
