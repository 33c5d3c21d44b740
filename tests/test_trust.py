"""A checkpoint is only data: captioning from one imports no module it names and enables no remote code."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from capkit.cli import caption as caption_cli
from capkit.errors import ComponentNotFoundError
from capkit.recipes.inference import load_trained
from toys import MODEL, write_checkpoint


def marker_module(folder: Path, name: str, marker: Path, body: str = "") -> None:
    """A module that leaves ``marker`` behind when it is imported."""
    (folder / f"{name}.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n{body}")


@pytest.fixture
def photo(tmp_path) -> Path:
    path = tmp_path / "photo.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(path)
    return path


def test_a_checkpoints_plugin_list_is_not_imported_when_captioning(tmp_path, monkeypatch, photo, capsys):
    marker = tmp_path / "plugin_ran"
    marker_module(tmp_path, "capkit_tampered_plugin", marker)
    monkeypatch.syspath_prepend(str(tmp_path))
    checkpoint = write_checkpoint(tmp_path / "ckpt", MODEL, plugins=["capkit_tampered_plugin"])
    assert caption_cli.main(["--checkpoint", str(checkpoint), "--beam", "1", "--device", "cpu", str(photo)]) == 0
    assert capsys.readouterr().out.startswith(f"{photo}\t")
    assert not marker.exists()


def test_a_component_only_a_checkpoints_plugin_provides_is_a_clear_error(tmp_path, monkeypatch, photo, capsys):
    marker = tmp_path / "plugin_ran"
    marker_module(tmp_path, "capkit_decoder_plugin", marker)
    monkeypatch.syspath_prepend(str(tmp_path))
    stored = {**MODEL, "decoder": {"name": "tampered_decoder"}}
    checkpoint = write_checkpoint(tmp_path / "ckpt", MODEL, stored, plugins=["capkit_decoder_plugin"])
    with pytest.raises(ComponentNotFoundError, match=r"unknown decoder 'tampered_decoder'.*lists the plugin modules "
                       r"\['capkit_decoder_plugin'\].*imports none of them.*--plugin MODULE"):
        load_trained(checkpoint)
    assert caption_cli.main(["--checkpoint", str(checkpoint), "--device", "cpu", str(photo)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("capkit caption: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not marker.exists()


def hf_model_dir_with_remote_code(folder: Path, marker: Path) -> Path:
    """A tiny ViT saved with ``save_pretrained`` whose config also maps to custom code (``auto_map``), as a
    hub repository with remote code has; importing that code leaves ``marker`` behind."""
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                    image_size=32, patch_size=8)
    transformers.ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    body = textwrap.dedent("""
        from transformers import ViTConfig, ViTModel
        class EvilConfig(ViTConfig):
            model_type = "vit"
        class EvilModel(ViTModel):
            config_class = EvilConfig
    """)
    marker_module(folder, "evil", marker, body)
    doc = json.loads((folder / "config.json").read_text())
    doc["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(doc))
    return folder


def test_a_checkpoint_cannot_enable_remote_code(tmp_path, photo, capsys):
    marker = tmp_path / "remote_code_ran"
    hf_dir = hf_model_dir_with_remote_code(tmp_path / "vit", marker)
    encoder = {"name": "hf", "model_name": str(hf_dir)}
    control = subprocess.run(  # the setting, honoured, would run the code: what the test guards against
        [sys.executable, "-c", f"from transformers import AutoConfig; AutoConfig.from_pretrained({str(hf_dir)!r}, "
         f"trust_remote_code=True)"],
        env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"},
        capture_output=True, text=True, timeout=120,
    )
    assert control.returncode == 0 and marker.exists(), control.stderr[-2000:]
    marker.unlink()
    stored = {**MODEL, "encoder": {**encoder, "model_kwargs": {"trust_remote_code": True}}}
    checkpoint = write_checkpoint(tmp_path / "ckpt", {**MODEL, "encoder": encoder}, stored)
    assert caption_cli.main(["--checkpoint", str(checkpoint), "--beam", "1", "--device", "cpu", str(photo)]) == 0
    assert capsys.readouterr().out.startswith(f"{photo}\t")
    assert not marker.exists()


def test_visualize_imports_no_plugin_a_checkpoint_names_either(tmp_path, monkeypatch, photo):
    from capkit.cli import visualize as visualize_cli

    marker = tmp_path / "plugin_ran"
    marker_module(tmp_path, "capkit_tampered_plugin2", marker)
    monkeypatch.syspath_prepend(str(tmp_path))
    checkpoint = write_checkpoint(tmp_path / "ckpt", MODEL, plugins=["capkit_tampered_plugin2"])
    assert visualize_cli.main([str(photo), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "f.png"),
                               "--beam", "1", "--device", "cpu"]) == 0
    assert (tmp_path / "f.png").is_file() and not marker.exists()


def test_a_checkpoints_model_kwargs_reach_no_loader_but_the_safe_ones(tmp_path, caplog):
    """transformers also fetches and runs code for kernels named in from_pretrained's keyword arguments."""
    hf_dir = tmp_path / "vit"
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                    image_size=32, patch_size=8)
    transformers.ViTModel(config, add_pooling_layer=False).save_pretrained(hf_dir)
    encoder = {"name": "hf", "model_name": str(hf_dir)}
    stored = {**MODEL, "encoder": {**encoder, "model_kwargs": {
        "attn_implementation": "kernels-community/evil", "use_kernels": True, "revision": "main"}}}
    checkpoint = write_checkpoint(tmp_path / "ckpt", {**MODEL, "encoder": encoder}, stored)
    with caplog.at_level(logging.WARNING):
        trained = load_trained(checkpoint)
    assert "model_kwargs ['attn_implementation', 'use_kernels'] are not passed on" in caplog.text
    assert trained.model.encoder.revision == "main"
