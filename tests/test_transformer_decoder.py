"""The ``transformer`` decoder: parallel teacher forcing, the key/value cache, causality, positions, errors.

The shared behaviour (shapes, alphas summing to 1, gradients, log-prob == score, exact beam search) is
covered for it by tests/test_models_matrix.py.
"""
from __future__ import annotations

import pytest
import torch

import capkit
from capkit.models.decoders.transformer import TransformerDecoder, sinusoidal_table
from capkit.types import BOS_ID, EOS_ID, PAD_ID, EncoderOutput

VOCAB = 11
GRID = (3, 4)
C = 10


def decoder(seed: int = 0, **kwargs) -> TransformerDecoder:
    torch.manual_seed(seed)
    options = {"d_model": 16, "num_layers": 2, "num_heads": 4, "ffn_dim": 32, "dropout": 0.1, "max_len": 24}
    return capkit.DECODERS.build({"name": "transformer", **options, **kwargs}, attention=None, encoder_dim=C,
                                 vocab_size=VOCAB).eval()


def features(b: int, seed: int = 1) -> EncoderOutput:
    g = torch.Generator().manual_seed(seed)
    return EncoderOutput(torch.randn(b, GRID[0] * GRID[1], C, generator=g), GRID)


def captions() -> torch.Tensor:
    return torch.tensor([[BOS_ID, 4, 5, 6, 7, EOS_ID, PAD_ID], [BOS_ID, 8, 9, 10, 4, 5, EOS_ID]])


def test_registered_and_listed():
    assert "transformer" in capkit.DECODERS.names()
    assert capkit.DECODERS.origin("transformer") == "builtin"


@pytest.mark.parametrize("positional", ["sinusoidal", "learned"])
@pytest.mark.parametrize("beam_size", [1, 3, 5])
def test_cache_and_recomputation_give_the_same_tokens_and_scores(positional, beam_size):
    dec = decoder(positional=positional)
    enc = features(4)
    cached = dec.generate(enc, beam_size=beam_size, max_len=10, n_best=beam_size)
    dec.use_cache = False
    recomputed = dec.generate(enc, beam_size=beam_size, max_len=10, n_best=beam_size)
    for hyps_a, hyps_b in zip(cached.hypotheses, recomputed.hypotheses):
        assert [h.tokens for h in hyps_a] == [h.tokens for h in hyps_b]
        for a, b in zip(hyps_a, hyps_b):
            assert a.score == pytest.approx(b.score, abs=1e-5)
            assert torch.allclose(a.alphas, b.alphas, atol=1e-5)


def test_cache_grows_one_step_per_call_batch_first():
    dec = decoder()
    memory = dec.prepare(features(3))
    state = dec.init_state(memory)
    assert set(state) == {f"self_{kv}_{i}" for i in range(2) for kv in "kv"}
    tokens = torch.full((3,), BOS_ID)
    for t in range(1, 4):
        logits, alpha, state = dec.step(tokens, state, memory)
        assert logits.shape == (3, VOCAB) and alpha.shape == (3, GRID[0] * GRID[1])
        assert all(v.shape == (3, t, 16) for v in state.values())
        tokens = logits.argmax(-1)
    dec.use_cache = False
    state = dec.init_state(memory)
    _, _, state = dec.step(torch.full((3,), BOS_ID), state, memory)
    assert set(state) == {"tokens"} and state["tokens"].shape == (3, 1)


def test_teacher_forcing_is_one_parallel_pass_equal_to_stepping(monkeypatch):
    dec = decoder()
    enc, caps = features(2), captions()
    memory = dec.prepare(enc)
    state, step_logits, step_alphas = dec.init_state(memory), [], []
    for t in range(caps.shape[1] - 1):
        logits, alpha, state = dec.step(caps[:, t], state, memory)
        step_logits.append(logits)
        step_alphas.append(alpha)

    def no_step(*args, **kwargs):
        raise AssertionError("teacher forcing must not run step by step")

    monkeypatch.setattr(dec, "step", no_step)
    out = dec(enc, caps)
    assert torch.allclose(out.logits, torch.stack(step_logits, 1), atol=1e-5)
    assert torch.allclose(out.alphas, torch.stack(step_alphas, 1), atol=1e-5)
    assert out.aux_losses == {}


def test_causal_later_tokens_do_not_change_earlier_predictions():
    dec = decoder()
    enc, caps = features(2), captions()
    changed = caps.clone()
    changed[:, 3:] = 4
    a, b = dec(enc, caps), dec(enc, changed)
    assert torch.allclose(a.logits[:, :3], b.logits[:, :3], atol=1e-6)
    assert not torch.allclose(a.logits[:, 3:], b.logits[:, 3:])


def test_alpha_is_the_chosen_layers_head_averaged_cross_attention():
    enc, caps = features(2), captions()
    first, last = decoder(attention_layer=0)(enc, caps), decoder(attention_layer=-1)(enc, caps)
    assert torch.allclose(first.logits, last.logits)  # same weights: only the reported map differs
    assert not torch.allclose(first.alphas, last.alphas)
    for out in (first, last):
        assert torch.allclose(out.alphas.sum(-1), torch.ones(2, caps.shape[1] - 1), atol=1e-5)


def test_dropout_is_active_in_training_only():
    dec = decoder(dropout=0.5)
    enc, caps = features(2), captions()
    assert torch.equal(dec(enc, caps).logits, dec(enc, caps).logits)
    dec.train()
    assert not torch.equal(dec(enc, caps).logits, dec(enc, caps).logits)


def test_too_long_a_caption_is_a_clear_error():
    dec = decoder(max_len=5)
    with pytest.raises(ValueError, match="exceed its max_len 5"):
        dec(features(2), captions())
    with pytest.raises(ValueError, match="exceed its max_len 5"):
        dec.generate(features(1), beam_size=2, max_len=5)
    dec.generate(features(1), beam_size=2, max_len=4)  # 5 input tokens: fits


def test_bad_options():
    with pytest.raises(ValueError, match="not divisible"):
        decoder(d_model=10, num_heads=4)
    with pytest.raises(ValueError, match="positional must be one of"):
        decoder(positional="rotary")
    with pytest.raises(ValueError, match="attention_layer 2 out of range"):
        decoder(attention_layer=2)


def test_sinusoidal_table():
    table = sinusoidal_table(6, 8)
    assert table.shape == (6, 8)
    assert torch.allclose(table[0, 0::2], torch.zeros(4)) and torch.allclose(table[0, 1::2], torch.ones(4))
    assert table[3, 0].item() == pytest.approx(torch.sin(torch.tensor(3.0)).item())


def test_builder_requires_attention_none():
    cfg = {"encoder": {"name": "timm", "model_name": "test_efficientnet"},
           "decoder": {"name": "transformer", "d_model": 16, "num_layers": 1, "num_heads": 2, "ffn_dim": 16}}
    with pytest.raises(ValueError, match=r"supports only 'none' \(set model.attention: \{name: none\}\)"):
        capkit.build_captioner({**cfg, "attention": {"name": "bahdanau"}}, vocab_size=VOCAB)
    model = capkit.build_captioner({**cfg, "attention": {"name": "none"}}, vocab_size=VOCAB)
    assert isinstance(model.decoder, TransformerDecoder)
