"""``python -m capkit <command> [args]``: the command line, the one way into it from outside the package."""
import sys

from .cli.main import main

if __name__ == "__main__":
    sys.exit(main())
