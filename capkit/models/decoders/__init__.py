"""Builtin components of this kind; see ``capkit.models``."""
