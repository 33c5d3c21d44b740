#!/usr/bin/env python
"""Caption images: same as ``python -m capkit caption``; see ``--help``."""
import sys

from capkit.cli.caption import main

if __name__ == "__main__":
    sys.exit(main())
