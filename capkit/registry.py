"""Name -> component registries, with lazy third-party discovery through entry points.

This module imports nothing from capkit but its error classes (nor torch), so it can never take part in an
import cycle.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import re
from collections.abc import Callable, Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from capkit.errors import (
    CapkitError,
    ComponentArgumentError,
    ComponentNotFoundError,
    ConfigError,
    ConfigKeyError,
    DuplicateComponentError,
    PluginError,
)

__all__ = [
    "Registry",
    "ENCODERS",
    "ATTENTIONS",
    "DECODERS",
    "METRICS",
    "DATASETS",
    "REGISTRIES",
    "import_plugins",
]

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
BUILTIN = "builtin"


class Registry:
    """A mapping from snake_case names to component classes or factory functions.

    Builtins register with the ``@REGISTRY.register("name")`` decorator. Third-party packages declare an
    entry point in the registry's group (e.g. ``capkit.attentions``); the entry point's name is the key.
    Listing names never imports a plugin: ``get`` loads an entry point on first use.

    Args:
        kind: what the registry holds, in the singular ("encoder"); used in error messages.
        group: the entry-point group scanned for third-party components.
    """

    def __init__(self, kind: str, group: str):
        self.kind = kind
        self.group = group
        self._objects: dict[str, Any] = {}
        self._origins: dict[str, str] = {}
        self._entry_points: dict[str, EntryPoint] = {}
        self._scanned = False

    def __repr__(self) -> str:
        return f"Registry(kind={self.kind!r}, group={self.group!r}, names={self.names()})"

    def __contains__(self, name: str) -> bool:
        self._scan()
        return name in self._objects or name in self._entry_points

    def register(self, name: str) -> Callable[[Any], Any]:
        """Decorator that registers a class or function under ``name``."""

        def decorator(obj: Any) -> Any:
            self._add(name, obj, _describe(obj))
            return obj

        return decorator

    def _add(self, name: str, obj: Any, origin: str) -> None:
        if not _NAME_RE.match(name):
            raise ValueError(
                f"{self.kind} name {name!r} ({origin}) is not lowercase snake_case; "
                f"registry keys are config vocabulary, e.g. 'luong_local'"
            )
        taken = self._origins.get(name)
        if taken is None and self._scanned and name in self._entry_points:
            ep = self._entry_points[name]
            if ep.value == origin:  # the plugin's module registers the object its entry point names
                origin = _entry_point_origin(ep)
            taken = _entry_point_origin(ep)
        if taken is not None and taken != origin:
            raise DuplicateComponentError(
                f"{self.kind} name {name!r} is registered twice: by {taken} and by {origin}. "
                f"Rename one of them (registry names must be unique)."
            )
        self._objects[name] = obj
        self._origins[name] = origin

    def _scan(self) -> None:
        """Read the entry points of ``self.group`` once (no plugin is imported)."""
        if self._scanned:
            return
        found: dict[str, EntryPoint] = {}
        for ep in entry_points(group=self.group):
            origin = _entry_point_origin(ep)
            if ep.name in self._origins and self._origins[ep.name] != origin:  # not: loaded from this very ep
                raise DuplicateComponentError(
                    f"{self.kind} name {ep.name!r} is registered twice: by {self._origins[ep.name]} "
                    f"and by {origin}. Rename the plugin's entry point or uninstall one of them."
                )
            if ep.name in found and found[ep.name].value != ep.value:
                raise DuplicateComponentError(
                    f"{self.kind} name {ep.name!r} is registered twice: by {_entry_point_origin(found[ep.name])} "
                    f"and by {origin}. Uninstall one of the two distributions."
                )
            found[ep.name] = ep
        self._entry_points = found
        self._scanned = True

    def names(self) -> list[str]:
        """Every registered name, builtins and entry points, sorted."""
        self._scan()
        return sorted(set(self._objects) | set(self._entry_points))

    def origin(self, name: str) -> str:
        """``builtin`` for capkit's own components, else the distribution (or module) that provides ``name``."""
        self._scan()
        if name in self._entry_points:  # loaded or not (a clashing registration is refused), so it is stable
            return _distribution(self._entry_points[name]) or self._entry_points[name].value
        self.get(name)
        origin = self._origins[name]
        return BUILTIN if origin.startswith("capkit.") else origin.split(":")[0]

    def get(self, name: str) -> Any:
        """The class or function registered as ``name``; loads a plugin's entry point on first use."""
        self._scan()
        if name in self._objects:
            return self._objects[name]
        if name in self._entry_points:
            ep = self._entry_points[name]
            try:
                obj = ep.load()
            except Exception as err:  # a broken plugin fails only when selected, and says which
                raise PluginError(
                    f"could not load {self.kind} {name!r} from entry point {ep.value!r} "
                    f"({_entry_point_origin(ep)}): {err}"
                ) from err
            self._objects[name] = obj
            self._origins[name] = _entry_point_origin(ep)
            return obj
        raise ComponentNotFoundError(self._unknown_message(name))

    def _unknown_message(self, name: str) -> str:
        known = self.names()
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        return (
            f"unknown {self.kind} {name!r}.{hint} Known {self.kind}s: {', '.join(known) or '(none)'}. "
            f"A plugin's {self.kind} must be installed (entry-point group {self.group!r}) "
            f"or imported through the config's `plugins:` list."
        )

    def build(self, cfg: Mapping[str, Any], **derived: Any) -> Any:
        """Build a component from ``cfg = {"name": ..., **kwargs}`` plus builder-derived kwargs.

        Every config key must be a keyword the constructor accepts; a derived kwarg (a size the builder
        computes) must not also be set in the config.
        """
        if "name" not in cfg:
            raise ConfigKeyError(f"{self.kind} config has no 'name' key; known {self.kind}s: {', '.join(self.names())}")
        kwargs = {k: v for k, v in cfg.items() if k != "name"}
        name = cfg["name"]
        target = self.get(name)
        clash = sorted(set(kwargs) & set(derived))
        if clash:
            raise ConfigError(
                f"{self.kind} {name!r}: {', '.join(clash)} is set by the builder from the other components; "
                f"remove it from the config"
            )
        accepted, takes_any = _keyword_parameters(target)
        unknown = sorted(k for k in kwargs if k not in accepted)
        if unknown and not takes_any:
            suggestions = {k: difflib.get_close_matches(k, accepted, n=1) for k in unknown}
            hints = ", ".join(f"{k!r}" + (f" (did you mean {s[0]!r}?)" if s else "") for k, s in suggestions.items())
            raise ComponentArgumentError(
                f"{self.kind} {name!r} does not accept {hints}. "
                f"Accepted keys: {', '.join(a for a in accepted if a not in derived) or '(none)'}"
            )
        flags = sorted(k for k in kwargs if k in _bool_parameters(target) and not isinstance(kwargs[k], bool))
        if flags:  # a string such as "no" would otherwise switch the flag on
            raise ComponentArgumentError(
                f"{self.kind} {name!r}: {', '.join(f'{k} must be true or false, got {kwargs[k]!r}' for k in flags)}")
        if self.kind in SIZED_KINDS:
            for key, value in {**kwargs, **derived}.items():
                if SIZE_NAME.search(key) and isinstance(value, int) and not isinstance(value, bool) and value < 1:
                    origin = " (set by the builder from the other components' sizes)" if key in derived else ""
                    raise ComponentArgumentError(
                        f"{self.kind} {name!r}: {key}{origin} must be a positive size, got {value}")
        try:
            return target(**kwargs, **derived)
        except CapkitError:
            raise
        except (ValueError, TypeError, RuntimeError, ArithmeticError, AssertionError, KeyError) as err:
            # the constructor refused the config's values (a negative size, a dropout over 1, an unknown timm
            # model, heads that do not divide the width): the user's to fix, so one line naming the settings
            sizes = {k: v for k, v in derived.items() if isinstance(v, (int, float, str))}  # not the factories
            settings = ", ".join(f"{k}={v!r}" for k, v in {**kwargs, **sizes}.items()) or "no settings"
            detail = " ".join(str(err).split()) or type(err).__name__
            raise ComponentArgumentError(
                f"{self.kind} {name!r} cannot be built with {settings}: {detail[:300]}; check these settings"
            ) from err


# the model's components: a setting named like a size (``attn_dim``, ``hidden_dim``, ``num_heads``, ...) must be >= 1
SIZED_KINDS = ("encoder", "attention", "decoder")
SIZE_NAME = re.compile(r"(_dim|_size|heads|layers)$")


def _keyword_parameters(target: Any) -> tuple[list[str], bool]:
    sig = inspect.signature(target)
    names, takes_any = [], False
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            takes_any = True
        elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            names.append(p.name)
    return names, takes_any


def _bool_parameters(target: Any) -> set[str]:
    """The constructor's parameters annotated ``bool`` (as a string under ``from __future__ import annotations``)."""
    return {p.name for p in inspect.signature(target).parameters.values() if p.annotation in (bool, "bool")}


def _describe(obj: Any) -> str:
    return f"{obj.__module__}:{obj.__qualname__}"


def _distribution(ep: EntryPoint) -> str | None:
    dist = getattr(ep, "dist", None)
    return dist.name if dist is not None else None


def _entry_point_origin(ep: EntryPoint) -> str:
    dist = _distribution(ep)
    return f"{dist} (entry point {ep.name} = {ep.value})" if dist else f"entry point {ep.name} = {ep.value}"


def import_plugins(modules: list[str]) -> None:
    """Import unpackaged plugin modules (the config's ``plugins:`` list) so their components register."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise PluginError(
                f"plugin module {module!r} (from the config's `plugins:` list or --plugin) could not be imported: "
                f"{err}. "
                f"Check the module path and that its package is on PYTHONPATH or installed."
            ) from err


ENCODERS = Registry("encoder", "capkit.encoders")
ENCODERS.__doc__ = """Image encoders: ``forward(images (B, 3, H, W)) -> EncoderOutput``; attribute ``out_channels``."""
ATTENTIONS = Registry("attention", "capkit.attentions")
DECODERS = Registry("decoder", "capkit.decoders")
METRICS = Registry("metric", "capkit.metrics")
DATASETS = Registry("dataset", "capkit.datasets")

REGISTRIES: dict[str, Registry] = {
    r.kind: r for r in (ENCODERS, ATTENTIONS, DECODERS, METRICS, DATASETS)
}
