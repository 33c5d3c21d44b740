"""Registry behaviour: names, suggestions, clashes, build-time argument checks, entry-point discovery."""
from __future__ import annotations

import subprocess
import sys
from importlib.metadata import EntryPoint

import pytest

import capkit
from capkit import registry as registry_module
from capkit.registry import ATTENTIONS, Registry


class Widget:
    def __init__(self, size: int, depth: int = 2, *, colour: str = "red"):
        self.size, self.depth, self.colour = size, depth, colour


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(registry_module, "entry_points", lambda group: [])
    reg = Registry("widget", "capkit.widgets")
    reg.register("widget")(Widget)
    yield reg
    for shared in registry_module.REGISTRIES.values():  # rescan real entry points after the patch
        shared._scanned = False


def fake_entry_points(*eps: EntryPoint):
    return lambda group: [ep for ep in eps if ep.group == group]


def test_builtins_are_listed_with_their_origin():
    assert {"bahdanau", "luong_global", "luong_local", "none"} <= set(ATTENTIONS.names())
    assert "timm" in capkit.ENCODERS.names()
    assert {"show_attend_tell", "luong"} <= set(capkit.DECODERS.names())
    assert ATTENTIONS.origin("bahdanau") == "builtin"


def test_unknown_name_suggests_close_matches_and_lists_all():
    with pytest.raises(KeyError) as info:
        ATTENTIONS.get("bahdanu")
    message = str(info.value)
    assert "unknown attention 'bahdanu'" in message
    assert "Did you mean 'bahdanau'" in message
    for name in ("bahdanau", "luong_global", "luong_local", "none"):
        assert name in message
    assert "capkit.attentions" in message


def test_duplicate_name_names_both_origins(fresh):
    class Other:
        pass

    with pytest.raises(KeyError) as info:
        fresh.register("widget")(Other)
    message = str(info.value)
    assert "registered twice" in message
    assert "test_registry:Widget" in message and "Other" in message


def test_names_must_be_snake_case(fresh):
    with pytest.raises(ValueError, match="snake_case"):
        fresh.register("MyWidget")(Widget)


def test_build_maps_config_keys_to_keyword_arguments(fresh):
    built = fresh.build({"name": "widget", "depth": 5, "colour": "blue"}, size=3)
    assert (built.size, built.depth, built.colour) == (3, 5, "blue")


def test_build_rejects_unknown_keys_and_lists_accepted_ones(fresh):
    with pytest.raises(TypeError) as info:
        fresh.build({"name": "widget", "dpeth": 5}, size=3)
    message = str(info.value)
    assert "'dpeth' (did you mean 'depth'?)" in message
    assert "Accepted keys: depth, colour" in message


def test_build_rejects_a_derived_size_set_in_the_config(fresh):
    with pytest.raises(ValueError, match="size is set by the builder"):
        fresh.build({"name": "widget", "size": 4}, size=3)


def test_build_needs_a_name(fresh):
    with pytest.raises(KeyError, match="no 'name' key"):
        fresh.build({"depth": 1})


def test_entry_points_are_listed_without_import_and_loaded_on_use(monkeypatch, fresh):
    ok = EntryPoint(name="ordered", value="collections:OrderedDict", group="capkit.widgets")
    broken = EntryPoint(name="broken", value="capkit_no_such_plugin.module:Thing", group="capkit.widgets")
    monkeypatch.setattr(registry_module, "entry_points", fake_entry_points(ok, broken))
    fresh._scanned = False
    assert fresh.names() == ["broken", "ordered", "widget"]  # listing imports nothing: 'broken' is fine here
    assert "capkit_no_such_plugin" not in sys.modules
    from collections import OrderedDict

    assert fresh.get("ordered") is OrderedDict
    with pytest.raises(ImportError, match="could not load widget 'broken' from entry point"):
        fresh.get("broken")


def test_entry_point_clashing_with_a_builtin_names_both(monkeypatch, fresh):
    clash = EntryPoint(name="widget", value="collections:OrderedDict", group="capkit.widgets")
    monkeypatch.setattr(registry_module, "entry_points", fake_entry_points(clash))
    fresh._scanned = False
    with pytest.raises(KeyError) as info:
        fresh.names()
    assert "test_registry:Widget" in str(info.value) and "collections:OrderedDict" in str(info.value)


def test_two_entry_points_with_one_name_are_an_error(monkeypatch, fresh):
    a = EntryPoint(name="dup", value="collections:OrderedDict", group="capkit.widgets")
    b = EntryPoint(name="dup", value="collections:Counter", group="capkit.widgets")
    monkeypatch.setattr(registry_module, "entry_points", fake_entry_points(a, b))
    fresh._scanned = False
    with pytest.raises(KeyError, match="'dup' is registered twice.*OrderedDict.*Counter"):
        fresh.names()


def test_plugin_modules_from_the_config_are_imported_with_a_clear_error():
    with pytest.raises(ImportError, match="plugin module 'capkit_missing_plugin'"):
        registry_module.import_plugins(["capkit_missing_plugin"])


def test_cli_list_prints_kind_name_origin():
    out = subprocess.run(
        [sys.executable, "-m", "capkit", "list"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    rows = {tuple(line.split("\t")) for line in out}
    for kind, name in [
        ("encoder", "timm"),
        ("attention", "bahdanau"),
        ("attention", "luong_global"),
        ("attention", "luong_local"),
        ("attention", "none"),
        ("decoder", "show_attend_tell"),
        ("decoder", "luong"),
    ]:
        assert (kind, name, "builtin") in rows
