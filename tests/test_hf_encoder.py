"""The ``hf`` encoder: grids of the common families, preprocessing from the image processor, freezing,
loading a save_pretrained directory, and quick clear errors for a missing model. Tiny random models only."""
from __future__ import annotations

import time

import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")

import capkit  # noqa: E402
from capkit.data import build_transform  # noqa: E402
from capkit.models.encoders.hf_encoder import IMAGENET_MEAN, HFEncoder, _data_config, _layer_list  # noqa: E402

TINY = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32}


def tiny_vit(**kwargs) -> dict:
    return {"model_type": "vit", **TINY, "image_size": 64, "patch_size": 16, **kwargs}


def hidden(enc: HFEncoder, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return enc.model(pixel_values=x).last_hidden_state


def test_registered_and_listed():
    assert "hf" in capkit.ENCODERS.names()
    assert capkit.ENCODERS.origin("hf") == "builtin"


def test_tiny_vit_gives_the_patch_grid_without_the_class_token():
    enc = HFEncoder(config=tiny_vit())
    x = torch.randn(2, 3, 64, 64)
    out = enc(x)
    assert out.grid == (4, 4)
    assert out.feats.shape == (2, 16, 16) and enc.out_channels == 16
    assert torch.equal(out.feats, hidden(enc, x)[:, 1:])  # 17 tokens: CLS first


def test_non_square_input_interpolates_positions():
    enc = HFEncoder(config=tiny_vit())
    out = enc(torch.randn(1, 3, 96, 64))
    assert out.grid == (6, 4) and out.feats.shape == (1, 24, 16)


@pytest.mark.parametrize(
    "config,image,grid,prefix",
    [
        ({"model_type": "dinov2_with_registers", **TINY, "image_size": 64, "patch_size": 16, "num_register_tokens": 4},
         64, (4, 4), 5),
        ({"model_type": "dinov2", **TINY, "image_size": 64, "patch_size": 16}, 64, (4, 4), 1),
        ({"model_type": "deit", **TINY, "image_size": 64, "patch_size": 16}, 64, (4, 4), 2),  # CLS + distillation
        ({"model_type": "clip_vision_model", **TINY, "image_size": 64, "patch_size": 16}, 64, (4, 4), 1),
        ({"model_type": "siglip_vision_model", **TINY, "image_size": 64, "patch_size": 16}, 64, (4, 4), 0),
        # Swin: 4 px patches, merged 2 x 2 once per extra stage; no class token
        ({"model_type": "swin", "embed_dim": 8, "depths": [1, 1], "num_heads": [1, 1], "image_size": 64,
          "patch_size": 4, "window_size": 4}, 64, (8, 8), 0),
    ],
    ids=["dinov2_registers", "dinov2", "deit", "clip_vision", "siglip_vision", "swin"],
)
def test_prefix_tokens_are_dropped_in_every_family(config, image, grid, prefix):
    enc = HFEncoder(config=config)
    x = torch.randn(1, 3, image, image)
    out = enc(x)
    tokens = hidden(enc, x)
    assert out.grid == grid
    assert tokens.shape[1] == grid[0] * grid[1] + prefix
    assert torch.equal(out.feats, tokens[:, prefix:])
    assert out.feats.shape[-1] == enc.out_channels


def test_feature_map_models_are_flattened():
    enc = HFEncoder(config={"model_type": "convnext", "hidden_sizes": [8, 16], "depths": [1, 1], "num_stages": 2,
                            "image_size": 64})
    out = enc(torch.randn(1, 3, 64, 64))
    assert out.grid == (8, 8) and out.feats.shape == (1, 64, 16) and enc.out_channels == 16


def test_channels_probed_in_eval_mode_for_a_config_without_hidden_sizes():
    """MobileNetV2's config names no width: the channels come from a probe, which updates no batch-norm statistics."""
    enc = HFEncoder(config={"model_type": "mobilenet_v2", "image_size": 64, "depth_multiplier": 0.35},
                    finetune="all")
    norms = [m for m in enc.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(int(m.num_batches_tracked) == 0 for m in norms)
    assert enc.training and enc.out_channels == enc(torch.randn(1, 3, 64, 64)).feats.shape[-1] == 1280


def test_random_config_gets_imagenet_defaults_that_the_transforms_accept():
    enc = HFEncoder(config=tiny_vit(image_size=48))
    assert enc.data_config["input_size"] == (3, 48, 48)
    assert enc.data_config["mean"] == IMAGENET_MEAN
    image = Image.new("RGB", (80, 60), (120, 30, 200))
    assert build_transform(enc.data_config)(image).shape == (3, 48, 48)


def test_frozen_encoder_has_no_gradients_and_stays_in_eval_mode():
    enc = HFEncoder(config=tiny_vit())
    assert enc.frozen
    assert not enc.training and not enc.model.training  # from construction on
    enc.train()
    assert not enc.training and not enc.model.training
    assert not enc(torch.randn(1, 3, 64, 64)).feats.requires_grad


def test_finetune_last_layer_trains_that_layer_and_the_final_norm():
    enc = HFEncoder(config=tiny_vit(), finetune="last", finetune_layers=1)
    path, layers = _layer_list(enc.model)  # encoder.layer (transformers 4) or layers (5)
    assert len(layers) == 2
    trainable = {n for n, p in enc.model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if not n.startswith("layernorm.")} == {
        f"{path}.1.{n}" for n, _ in layers[1].named_parameters()
    }
    assert {"layernorm.weight", "layernorm.bias"} <= trainable
    enc.train()
    assert enc.training
    with pytest.raises(ValueError, match="finetune_layers must be in 1..2"):
        HFEncoder(config=tiny_vit(), finetune="last", finetune_layers=3)


def test_finetune_all_freezes_parameters_that_never_reach_the_features():
    # DINOv2's mask token is only used with bool_masked_pos; a CLIP tower's post-layernorm only on the pooled token
    for config, unused in [
        ({"model_type": "dinov2", **TINY, "image_size": 32, "patch_size": 16}, "mask_token"),
        ({"model_type": "clip_vision_model", **TINY, "image_size": 32, "patch_size": 16}, "post_layernorm"),
    ]:
        enc = HFEncoder(config=config, finetune="all")
        frozen = {n for n, p in enc.model.named_parameters() if not p.requires_grad}
        assert frozen and all(unused in n for n in frozen)
        enc(torch.randn(2, 3, 32, 32)).feats.sum().backward()
        assert all(p.grad is not None for p in enc.parameters() if p.requires_grad)


def test_save_pretrained_directory_loads_by_path_with_its_processor(tmp_path):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    reference = ViTModel(ViTConfig(**TINY, image_size=64, patch_size=16), add_pooling_layer=False).eval()
    reference.save_pretrained(tmp_path)
    ViTImageProcessor(size={"height": 64, "width": 64}, resample=2).save_pretrained(tmp_path)

    enc = capkit.ENCODERS.build({"name": "hf", "model_name": str(tmp_path)})
    assert enc.weights == "pretrained"
    cfg = enc.data_config
    assert cfg["input_size"] == (3, 64, 64) and cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.5, 0.5, 0.5)
    assert cfg["interpolation"] == "bilinear" and cfg["crop_mode"] == "squash" and cfg["crop_pct"] == 1.0
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(enc(x).feats, reference(pixel_values=x).last_hidden_state[:, 1:], atol=1e-6)
    key = enc.cache_key()
    assert key["encoder"] == "hf" and key["model_name"] == str(tmp_path) and "files" in key


def test_directory_without_processor_falls_back_to_defaults(tmp_path):
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(**TINY, image_size=32, patch_size=16)).save_pretrained(tmp_path)
    enc = HFEncoder(model_name=str(tmp_path))
    assert enc.data_config["input_size"] == (3, 32, 32) and enc.data_config["mean"] == IMAGENET_MEAN
    assert enc(torch.randn(1, 3, 32, 32)).grid == (2, 2)


def test_dual_clip_checkpoint_loads_only_the_vision_tower(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    clip = CLIPModel(CLIPConfig(text_config=TINY, vision_config={**TINY, "image_size": 32, "patch_size": 16},
                                projection_dim=8))
    clip.save_pretrained(tmp_path)
    enc = HFEncoder(model_name=str(tmp_path))
    assert type(enc.model).__name__ == "CLIPVisionModel"
    name, weight = next((n, p) for n, p in enc.model.named_parameters() if n.endswith("patch_embedding.weight"))
    assert torch.equal(weight, clip.state_dict()["vision_model.embeddings.patch_embedding.weight"])
    assert enc(torch.randn(1, 3, 32, 32)).grid == (2, 2)


def test_processor_with_resize_and_centre_crop_maps_to_timm_crop_pct():
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224})
    cfg = _data_config(processor, None)
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_mode"] == "center"
    assert cfg["crop_pct"] == pytest.approx(224 / 256) and cfg["interpolation"] == "bicubic"
    image = Image.new("RGB", (300, 250))
    assert build_transform(cfg)(image).shape == (3, 224, 224)


def test_missing_hub_model_offline_is_a_quick_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="(?s)could not load 'nobody/no-such-vision-model'.*save_pretrained"):
        HFEncoder(model_name="nobody/no-such-vision-model")
    assert time.monotonic() - start < 10


def test_missing_local_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        HFEncoder(model_name=str(tmp_path / "missing"))


def test_bad_arguments():
    with pytest.raises(ValueError, match="exactly one of model_name"):
        HFEncoder()
    with pytest.raises(ValueError, match="needs a model_type"):
        HFEncoder(config={"hidden_size": 16})
    with pytest.raises(ValueError, match="finetune must be one of"):
        HFEncoder(config=tiny_vit(), finetune="some")


def test_in_a_captioner_with_a_transformer_decoder():
    model = capkit.build_captioner(
        {"encoder": {"name": "hf", "config": tiny_vit()}, "attention": {"name": "none"},
         "decoder": {"name": "transformer", "d_model": 16, "num_layers": 1, "num_heads": 2, "ffn_dim": 16}},
        vocab_size=9,
    ).eval()
    generation = model.generate(images=torch.randn(2, 3, 64, 64), beam_size=2, max_len=4)
    assert generation.grid == (4, 4) and len(generation.hypotheses) == 2


def test_a_config_file_with_an_hf_encoder_gets_no_timm_defaults(tmp_path):
    from capkit.config import load_config, to_container

    path = tmp_path / "hf.yaml"
    path.write_text("model:\n  encoder: {name: hf, config: {model_type: vit, hidden_size: 16, num_hidden_layers: 1,"
                    " num_attention_heads: 2, intermediate_size: 32, image_size: 32, patch_size: 16}}\n"
                    "  attention: {name: none}\n  decoder: {name: transformer, d_model: 16, num_heads: 2}\n")
    cfg = load_config(path)
    assert "model_name" not in cfg.model.encoder  # the schema's default timm model_name does not leak in
    model = capkit.build_captioner(to_container(cfg.model), vocab_size=9)
    assert model.encoder.cache_key()["model_name"] == "random-vit"
