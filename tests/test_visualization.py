"""The attention visualiser: panel count, where a one-hot map lights up, headless PNG output."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import capkit
from capkit.visualization.attention import attention_figure, overlay, save_attention_figure, upsample_attention


def grey_image(h: int = 60, w: int = 90) -> np.ndarray:
    return np.full((h, w, 3), 128, dtype=np.uint8)


def test_one_panel_per_word_plus_the_image():
    words = ["a", "red", "circle", "<end>"]
    alphas = torch.softmax(torch.randn(4, 6), dim=1)
    fig = attention_figure(grey_image(), words, alphas, (2, 3), columns=3)
    titled = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titled == ["image", *words]


def test_one_hot_attention_is_brightest_over_its_cell():
    h, w = 3, 4
    image = grey_image(60, 80)
    for cell in range(h * w):
        alpha = np.zeros(h * w)
        alpha[cell] = 1.0
        heat = upsample_attention(alpha, (h, w), image.shape[:2])
        y, x = np.unravel_index(heat.argmax(), heat.shape)
        assert (y * h // 60, x * w // 80) == divmod(cell, w)
        shown = overlay(image, heat).astype(float).sum(-1)
        ys, xs = divmod(cell, w)
        inside = shown[ys * 20 : (ys + 1) * 20, xs * 20 : (xs + 1) * 20].mean()
        assert inside > shown.mean()


def test_upsampling_is_smooth_not_blocky():
    heat = upsample_attention(np.array([0.0, 1.0, 0.0, 0.0]), (2, 2), (40, 40))
    assert len(np.unique(np.round(heat, 4))) > 10  # a blocky map would have 2 values


def test_mismatched_alphas_are_rejected():
    with pytest.raises(ValueError, match="must be \\(len\\(words\\)=2, H\\*W=6\\)"):
        attention_figure(grey_image(), ["a", "b"], np.ones((3, 6)) / 6, (2, 3))


@pytest.mark.parametrize("attention", capkit.ATTENTIONS.names())
def test_every_attention_draws_a_png_headless(tmp_path, attention):
    torch.manual_seed(0)
    kwargs = {"score": "general"} if attention.startswith("luong") else {}
    model = capkit.build_captioner(
        {
            "encoder": {"name": "timm", "model_name": "test_efficientnet"},
            "attention": {"name": attention, **kwargs},
            "decoder": {"name": "show_attend_tell", "embed_dim": 8, "hidden_dim": 16},
        },
        vocab_size=9,
    ).eval()
    hyp = model.generate(images=torch.randn(1, 3, 128, 128), beam_size=2, max_len=4).best[0]
    words = [str(t) for t in hyp.tokens] + ["<end>"]
    path = save_attention_figure(tmp_path / "att.png", grey_image(), words, hyp.alphas, (4, 4))
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size[0] > 100


def test_the_grid_is_laid_over_the_region_the_encoder_saw():
    from capkit.visualization.attention import _heat

    alpha = np.zeros(4)
    alpha[3] = 1.0  # bottom-right cell of a 2 x 2 grid
    heat = _heat(alpha, (2, 2), (100, 100), region=(10, 10, 90, 90))
    assert heat[:10].max() == 0 and heat[:, :10].max() == 0 and heat[90:].max() == 0  # nothing outside the crop
    y, x = np.unravel_index(heat.argmax(), heat.shape)
    assert 50 <= y < 90 and 50 <= x < 90
