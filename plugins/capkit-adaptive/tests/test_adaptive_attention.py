"""AdaptiveAttention: the interface contract, the sentinel mixture against an explicit (N+1)-softmax, both
builtin decoders, and the per-word sentinel shares for the visualiser."""
from __future__ import annotations

import pytest

pytest.importorskip("capkit_adaptive")

import torch  # noqa: E402

import capkit  # noqa: E402
from capkit.models.attention.base import weighted_context  # noqa: E402
from capkit.types import BOS_ID, EOS_ID, PAD_ID  # noqa: E402
from capkit_adaptive import AdaptiveAttention, hypothesis_sentinel_shares, sentinel_shares  # noqa: E402

B, N, C, DQ = 3, 6, 5, 4


def build(sentinel: str = "gated", seed: int = 0) -> AdaptiveAttention:
    torch.manual_seed(seed)
    return capkit.ATTENTIONS.build({"name": "adaptive", "attn_dim": 7, "sentinel": sentinel}, query_dim=DQ, key_dim=C)


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, DQ, generator=g), torch.randn(B, N, C, generator=g)


def test_builds_by_name_through_the_registry():
    att = build()
    assert isinstance(att, AdaptiveAttention)
    assert (att.query_dim, att.key_dim) == (DQ, C)
    assert capkit.ATTENTIONS.origin("adaptive") == "capkit-adaptive"


def test_rejects_an_unknown_sentinel_and_a_derived_size_in_the_config():
    with pytest.raises(ValueError, match="unknown sentinel 'lstm'.*gated, tanh"):
        capkit.ATTENTIONS.build({"name": "adaptive", "sentinel": "lstm"}, query_dim=DQ, key_dim=C)
    with pytest.raises(ValueError, match="key_dim is set by the builder"):
        capkit.ATTENTIONS.build({"name": "adaptive", "key_dim": 3}, query_dim=DQ, key_dim=C)


@pytest.mark.parametrize("sentinel", ["gated", "tanh"])
def test_shapes_sums_and_beta_range(sentinel):
    att = build(sentinel)
    query, feats = inputs()
    memory = att.precompute(feats, (2, 3))
    context, alpha, beta = att.forward_with_sentinel(query, memory)
    assert context.shape == (B, C) and alpha.shape == (B, N) and beta.shape == (B,)
    assert torch.allclose(alpha.sum(1), torch.ones(B), atol=1e-6)
    assert (alpha >= 0).all()
    assert ((beta >= 0) & (beta <= 1)).all()
    plain_context, plain_alpha = att(query, memory)  # forward is forward_with_sentinel without beta
    assert torch.equal(plain_context, context) and torch.equal(plain_alpha, alpha)


@pytest.mark.parametrize("sentinel", ["gated", "tanh"])
def test_matches_an_explicit_softmax_over_regions_and_sentinel(sentinel):
    att = build(sentinel)
    query, feats = inputs()
    memory = att.precompute(feats, (2, 3))
    context, alpha, beta = att.forward_with_sentinel(query, memory)
    with torch.no_grad():
        s = att.sentinel_value(query).tanh()
        if sentinel == "gated":
            s = torch.sigmoid(att.sentinel_gate(query)) * s
        candidates = torch.cat([feats, s.unsqueeze(1)], dim=1)  # (B, N + 1, C): regions, then the sentinel
        keys = torch.cat([att.key_proj(feats), att.sentinel_proj(s).unsqueeze(1)], dim=1)
        scores = att.score((keys + att.query_proj(query).unsqueeze(1)).tanh()).squeeze(2)  # (B, N + 1)
        full = scores.softmax(dim=1)
        assert torch.allclose(beta, full[:, -1], atol=1e-6)
        assert torch.allclose(alpha, full[:, :N] / (1 - full[:, -1:]), atol=1e-6)
        assert torch.allclose(context, weighted_context(full, candidates), atol=1e-6)
        c_hat = weighted_context(alpha, feats)
        assert torch.allclose(context, beta[:, None] * s + (1 - beta[:, None]) * c_hat, atol=1e-6)


def test_extreme_scores_stay_finite_and_normalised():
    att = build()
    query, feats = inputs()
    with torch.no_grad():
        att.score.weight.mul_(1e4)  # softmax saturates: beta is 0 or 1 to float precision
    context, alpha, beta = att.forward_with_sentinel(query, att.precompute(feats, (2, 3)))
    assert torch.isfinite(context).all() and torch.isfinite(alpha).all() and torch.isfinite(beta).all()
    assert torch.allclose(alpha.sum(1), torch.ones(B), atol=1e-5)


def test_gradients_reach_every_parameter_the_query_and_the_features():
    att = build()
    query, feats = inputs()
    query.requires_grad_(True)
    feats.requires_grad_(True)
    context, alpha, beta = att.forward_with_sentinel(query, att.precompute(feats, (2, 3)))
    (context.square().sum() + beta.sum()).backward()
    for name, p in att.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert query.grad.abs().sum() > 0 and feats.grad.abs().sum() > 0


def test_memory_rows_follow_index_select_as_beam_search_does():
    att = build()
    query, feats = inputs()
    memory = att.precompute(feats, (2, 3))
    index = torch.tensor([2, 0, 0, 1])
    picked = att.forward_with_sentinel(query[index], memory.index_select(index))
    full = att.forward_with_sentinel(query, memory)
    for got, want in zip(picked, full):
        assert torch.allclose(got, want[index], atol=1e-6)


# --- through the builder, with both builtin decoders --------------------------------------------------

VOCAB = 7
IMAGE = 96  # test_efficientnet: a 3 x 3 grid


def captioner(decoder: str) -> capkit.Captioner:
    torch.manual_seed(0)
    return capkit.build_captioner(
        {
            "encoder": {"name": "timm", "model_name": "test_efficientnet", "finetune": "all"},
            "attention": {"name": "adaptive", "attn_dim": 8},
            "decoder": {"name": decoder, "embed_dim": 12, "hidden_dim": 16, "feature_dim": 16, "dropout": 0.1},
        },
        vocab_size=VOCAB,
    )


def images(n: int) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("decoder", ["show_attend_tell", "luong"])
def test_trains_and_generates_with_each_builtin_decoder(decoder):
    model = captioner(decoder).train()
    assert model.decoder.attention.query_dim == 16 and model.decoder.attention.key_dim == 16
    captions = torch.tensor([[BOS_ID, 4, 5, 6, EOS_ID, PAD_ID], [BOS_ID, 6, 3, 4, 5, EOS_ID]])
    out = model(captions, images=images(2))
    running = captions[:, 1:] != PAD_ID  # the targets up to each caption's <end>; zeros after it
    assert torch.allclose(out.alphas.sum(-1), running.float(), atol=1e-5)
    loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, VOCAB), captions[:, 1:].reshape(-1),
                                             ignore_index=PAD_ID)
    (loss + sum(out.aux_losses.values())).backward()
    attention_grads = [p.grad for p in model.decoder.attention.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in attention_grads)

    model.eval()
    x = images(2)
    generation = model.generate(images=x, beam_size=3, max_len=5)
    betas = sentinel_shares(model, captions, images=images(2))
    assert betas.shape == (2, 5) and ((betas >= 0) & (betas <= 1)).all()
    for b, hyp in enumerate(generation.best):
        shares = hypothesis_sentinel_shares(model, hyp, images=x[b : b + 1])
        assert shares.shape == (len(hyp.tokens) + 1,)
        # teacher forcing on the generated caption replays beam search's steps: same attention maps
        forced = model(torch.tensor([[BOS_ID, *hyp.tokens, EOS_ID]]), images=x[b : b + 1]).alphas[0]
        assert torch.allclose(forced, hyp.alphas, atol=1e-5)


def test_sentinel_shares_need_the_adaptive_attention():
    model = capkit.build_captioner(
        {"encoder": {"name": "timm", "model_name": "test_efficientnet"}, "attention": {"name": "none"},
         "decoder": {"name": "luong", "embed_dim": 8, "hidden_dim": 8}},
        vocab_size=VOCAB,
    )
    with pytest.raises(TypeError, match="model.attention.name=adaptive"):
        sentinel_shares(model, torch.tensor([[BOS_ID, 4, EOS_ID]]), images=images(1))
