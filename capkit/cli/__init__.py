"""The commands of ``capkit <command>``; ``python -m capkit`` and the ``tools/*.py`` shims run the same ones."""
