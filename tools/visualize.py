#!/usr/bin/env python
"""Draw a trained model's attention for one image: same as ``python -m capkit visualize``; see ``--help``."""
import sys

from capkit.cli.visualize import main

if __name__ == "__main__":
    sys.exit(main())
