"""Command-line entry points; ``python -m capkit <command>`` and ``tools/*.py`` both call these."""
