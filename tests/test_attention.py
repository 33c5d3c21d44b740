"""Attention mechanisms in isolation: known answers and invariants."""
from __future__ import annotations

import pytest
import torch

from capkit.models.attention import base as attention_base
from capkit.models.attention.bahdanau import BahdanauAttention
from capkit.models.attention.luong import LuongGlobalAttention, LuongLocalAttention
from capkit.models.attention.uniform import UniformAttention


def grid_features(b: int, h: int, w: int, c: int) -> torch.Tensor:
    return torch.randn(b, h * w, c, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("window", [0.5, 1.0, 1.5, 3.0])
def test_luong_local_is_exactly_zero_outside_its_window(window):
    torch.manual_seed(0)
    att = LuongLocalAttention(query_dim=6, key_dim=5, window=window, attn_dim=8)
    h, w = 5, 7
    memory = att.precompute(grid_features(16, h, w, 5), (h, w))
    query = torch.randn(16, 6) * 3
    context, alpha = att(query, memory)
    centre = att.centre(query, (h, w))  # (B, 2)
    ys = torch.arange(h).repeat_interleave(w).float()
    xs = torch.arange(w).repeat(h).float()
    inside = ((ys - centre[:, :1]).abs() <= window) & ((xs - centre[:, 1:]).abs() <= window)
    assert inside.any(dim=1).all()
    assert (alpha[~inside] == 0).all()
    assert (alpha[inside] > 0).all()
    assert torch.allclose(alpha.sum(1), torch.ones(16), atol=1e-6)
    assert torch.allclose(context, torch.einsum("bn,bnc->bc", alpha, memory.values), atol=1e-6)


def test_luong_local_centre_lies_on_the_grid():
    att = LuongLocalAttention(query_dim=4, key_dim=4, score="dot")
    centre = att.centre(torch.randn(64, 4) * 100, (4, 9))
    assert (centre >= 0).all() and (centre[:, 0] <= 3).all() and (centre[:, 1] <= 8).all()


def test_luong_local_gaussian_weights_against_a_hand_computation():
    att = LuongLocalAttention(query_dim=2, key_dim=2, score="dot", window=1.0)
    feats = torch.zeros(1, 9, 2)  # scores all 0: alpha is the normalised Gaussian inside the window
    memory = att.precompute(feats, (3, 3))
    query = torch.zeros(1, 2)  # sigmoid(0) = 0.5: the centre is (1, 1) whatever the predictor's weights...
    with torch.no_grad():
        for p in att.position.parameters():
            p.zero_()  # ...once its bias is zero too
    _, alpha = att(query, memory)
    sigma2 = 0.5**2
    d2 = torch.tensor([2, 1, 2, 1, 0, 1, 2, 1, 2], dtype=torch.float)
    expected = torch.exp(-d2 / (2 * sigma2))
    assert torch.allclose(alpha[0], expected / expected.sum(), atol=1e-6)


def test_luong_global_dot_score_is_a_softmax_of_dot_products():
    att = LuongGlobalAttention(query_dim=3, key_dim=3, score="dot")
    feats = grid_features(2, 2, 2, 3)
    query = torch.randn(2, 3)
    context, alpha = att(query, att.precompute(feats, (2, 2)))
    expected = torch.einsum("bnc,bc->bn", feats, query).softmax(1)
    assert torch.allclose(alpha, expected, atol=1e-6)


def test_unknown_luong_score():
    with pytest.raises(ValueError, match="unknown Luong score 'cosine'; choose one of dot, general, concat"):
        LuongGlobalAttention(query_dim=3, key_dim=3, score="cosine")


def test_bahdanau_projects_the_features_once_per_image_not_per_step():
    att = BahdanauAttention(query_dim=4, key_dim=6, attn_dim=5)
    calls = []
    att.key_proj.register_forward_hook(lambda *args: calls.append(1))
    memory = att.precompute(grid_features(2, 3, 3, 6), (3, 3))
    for _ in range(7):
        _, alpha = att(torch.randn(2, 4), memory)
    assert len(calls) == 1
    assert torch.allclose(alpha.sum(1), torch.ones(2), atol=1e-6)


@pytest.mark.parametrize("kind", ["bahdanau", "luong_concat"])
def test_additive_scores_in_chunks_equal_one_pass(kind, monkeypatch):
    """Decoding on the CPU (no autograd) computes the (B, K, N, A) hidden layer a few images at a time in one
    reused buffer: the same scores as one pass with autograd, a ragged last chunk included."""
    torch.manual_seed(0)
    if kind == "bahdanau":
        att = BahdanauAttention(query_dim=4, key_dim=6, attn_dim=5)
        score_layer = att.score
    else:
        att = LuongGlobalAttention(query_dim=4, key_dim=6, score="concat", attn_dim=5)
        score_layer = att.score.v
    memory = att.precompute(grid_features(5, 2, 3, 6), (2, 3))  # B = 5 images, N = 6
    query = torch.randn(5 * 3, 4)  # K = 3 hypotheses per image, reading its memory row
    context, alpha = att(query, memory)  # autograd on: one pass
    chunks = []
    score_layer.register_forward_hook(lambda module, args, out: chunks.append(args[0].shape[0]))
    monkeypatch.setattr(attention_base, "ADDITIVE_CHUNK_ELEMENTS", 2 * 3 * 6 * 5)  # 2 images per chunk
    with torch.no_grad():
        chunked_context, chunked_alpha = att(query, memory)
    assert chunks == [2, 2, 1]
    torch.testing.assert_close(chunked_alpha, alpha, rtol=0, atol=1e-6)
    torch.testing.assert_close(chunked_context, context, rtol=0, atol=1e-6)
    assert alpha.shape == (15, 6)


def test_uniform_attention_is_mean_pooling():
    att = UniformAttention(query_dim=4, key_dim=6)
    feats = grid_features(2, 2, 3, 6)
    context, alpha = att(torch.randn(2, 4), att.precompute(feats, (2, 3)))
    assert torch.equal(alpha, torch.full((2, 6), 1 / 6))
    assert torch.allclose(context, feats.mean(1))
    assert not list(att.parameters())
