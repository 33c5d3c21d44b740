"""capkit's user errors: one family, so that every tool can print them as one line and exit with status 2.

A ``CapkitError`` is a mistake the user can fix (a config key, a data file, a checkpoint, a missing
dependency): its message says what is wrong, where (file, line or key) and what to do. Anything else that
escapes a tool is a bug and keeps its traceback. The classes also derive from the builtin exception a caller
would catch without knowing capkit (``ValueError``, ``FileNotFoundError``, ...).

This module imports nothing, so every layer can raise these.
"""
from __future__ import annotations

__all__ = [
    "CapkitError",
    "ConfigError",
    "ConfigKeyError",
    "ComponentNotFoundError",
    "ComponentArgumentError",
    "DuplicateComponentError",
    "PluginError",
    "DataError",
    "DatasetNotFoundError",
    "CaptionFileError",
    "MissingImagesError",
    "CorruptImageError",
    "OutputPathError",
    "RunDirError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "ModelNotFoundError",
    "WeightsUnavailableError",
    "DeviceUnavailableError",
    "TrainingDivergedError",
    "JavaNotFoundError",
    "MissingDependencyError",
    "ExportError",
]


class CapkitError(Exception):
    """Base of every user error; ``str(err)`` is the whole message (what, where, what to do)."""


class _Message:
    """For the classes that also derive from ``KeyError``, which would quote the message."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigError(CapkitError, ValueError):
    """A config file, override or setting is invalid; the message names the file or override and the key."""


class ConfigKeyError(_Message, ConfigError, KeyError):
    """A config lacks a key it needs, or names one that does not exist."""


class ComponentNotFoundError(ConfigKeyError):
    """A registry has no component of that name; the message lists close matches and every known name."""


class ComponentArgumentError(ConfigError, TypeError):
    """A component's config section sets a keyword its constructor does not take."""


class DuplicateComponentError(_Message, CapkitError, KeyError):
    """Two components (builtin or from plugins) claim one registry name."""


class PluginError(CapkitError, ImportError):
    """A plugin module or entry point cannot be imported."""


class DataError(CapkitError):
    """A dataset, caption file or image cannot be used as it is."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """A dataset's files are not where they were expected; the message says where, and how to get them."""


class CaptionFileError(DataError, ValueError):
    """A caption file has a malformed row or record; the message names the file and the line (or record)."""


class MissingImagesError(DataError, FileNotFoundError):
    """Images listed by a split do not exist."""


class CorruptImageError(DataError, OSError):
    """An image file exists but cannot be decoded."""


class OutputPathError(CapkitError, OSError):
    """An output file cannot be written where it was asked for (a folder, or a place that cannot be written)."""


class RunDirError(CapkitError):
    """A run directory cannot be used as asked: it holds another run, or another process is using it."""


class CheckpointError(CapkitError, ValueError):
    """A checkpoint is incomplete, of another format, or does not fit the model it is loaded into."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No complete checkpoint at the path given."""


class ModelNotFoundError(CapkitError, FileNotFoundError):
    """A model name that is no local directory, installed pretrained package or reachable Hub repository."""


class WeightsUnavailableError(CapkitError, RuntimeError):
    """Pretrained weights could not be had; the message says which offline weights to use instead."""


class DeviceUnavailableError(CapkitError, RuntimeError):
    """A device was asked for that this machine does not have (``cuda`` without CUDA)."""


class TrainingDivergedError(CapkitError, FloatingPointError):
    """The training loss became NaN or infinite (too high a learning rate, no gradient clipping, fp16 overflow)."""


class JavaNotFoundError(CapkitError, RuntimeError):
    """A metric or tokenizer needs Java and there is none on the PATH."""


class MissingDependencyError(CapkitError, ImportError):
    """A package that a command needs, and an install may leave out, is not installed; the message says what to
    install."""


class ExportError(CapkitError, RuntimeError):
    """A model cannot be exported as asked: a component that cannot be traced into a graph (the message names
    it), or exported graphs whose outputs differ from the model's."""
