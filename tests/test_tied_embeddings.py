"""Show, Attend and Tell with its output layer tied to the word embedding (``tie_embeddings``): the same logits
as an untied decoder holding the embedding as its output matrix, V x E fewer weights, gradients from both uses,
and a saved model that stores the matrix once and loads, converts and exports as any other."""
from __future__ import annotations

from functools import partial

import pytest
import torch
from safetensors.torch import load_file

import capkit
from capkit.export import export_onnx
from capkit.models.decoders.show_attend_tell import ShowAttendTellDecoder
from capkit.registry import ATTENTIONS, DECODERS
from capkit.types import BOS_ID, EOS_ID, PAD_ID, EncoderOutput
from toys import tiny_trained, varied_pictures

VOCAB, EMBED, FEATURES = 11, 8, 10
ATTENTION = {"name": "bahdanau", "attn_dim": 6}


def decoder(tied: bool, seed: int = 0) -> ShowAttendTellDecoder:
    torch.manual_seed(seed)
    return DECODERS.build(
        {"name": "show_attend_tell", "embed_dim": EMBED, "hidden_dim": 12, "dropout": 0.0, "tie_embeddings": tied},
        attention=partial(ATTENTIONS.build, ATTENTION), encoder_dim=FEATURES, vocab_size=VOCAB,
    )


def untied_copy(tied) -> torch.nn.Module:
    """An untied decoder with the tied one's weights, the embedding copied into the output layer."""
    untied = decoder(False, seed=1)
    state = dict(tied.state_dict())
    bias = state.pop("out_bias")
    untied.load_state_dict({**state, "out.weight": state["embed.weight"].clone(), "out.bias": bias})
    return untied.eval()


def features(batch: int = 2) -> EncoderOutput:
    return EncoderOutput(torch.randn(batch, 6, FEATURES, generator=torch.Generator().manual_seed(3)), (2, 3))


CAPTIONS = torch.tensor([[BOS_ID, 4, 5, 6, EOS_ID, PAD_ID], [BOS_ID, 7, 4, EOS_ID, PAD_ID, PAD_ID]])


def test_the_output_layer_is_the_embedding_the_state_dict_holds_it_once_and_the_weights_drop_by_v_times_e():
    tied, untied = decoder(True), decoder(False)
    assert "out.weight" not in tied.state_dict() and "out.bias" not in tied.state_dict()
    assert tied.state_dict()["out_bias"].shape == (VOCAB,)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(untied) - count(tied) == VOCAB * EMBED
    with torch.no_grad():
        tied.out_bias.normal_()
    reference = untied_copy(tied.eval())
    with torch.no_grad():
        want, got = reference(features(), CAPTIONS), tied(features(), CAPTIONS)
    assert torch.equal(got.logits, want.logits) and torch.equal(got.alphas, want.alphas)
    with torch.no_grad():  # and one decoding step, as beam search calls it
        memory = tied.prepare(features())
        state = tied.init_state(memory)
        tokens = torch.tensor([5, 9])
        assert torch.equal(tied.step(tokens, state, memory)[0], reference.step(tokens, state, memory)[0])
        got, want = tied.generate(features(), beam_size=2), reference.generate(features(), beam_size=2)
    assert [[(h.tokens, h.score) for h in beams] for beams in got.hypotheses] == \
        [[(h.tokens, h.score) for h in beams] for beams in want.hypotheses]


def test_the_shared_matrix_learns_from_the_output_too_and_starts_at_fairseqs_scale():
    tied, untied = decoder(True), decoder(False)
    assert torch.equal(tied.embed.weight[PAD_ID], torch.zeros(EMBED))
    assert abs(tied.embed.weight[PAD_ID + 1:].std().item() - EMBED**-0.5) < 0.1  # N(0, 1/E)
    with torch.no_grad():  # logits of order one at initialisation: the deep output is tanh-bounded
        assert tied(features(), CAPTIONS).logits.abs().max() < 3
    for model in (tied, untied):
        logits = model(features(), CAPTIONS).logits  # (B, T, V)
        logits[..., 10].sum().backward()  # word 10 is never an input word
    assert tied.embed.weight.grad[10].abs().sum() > 0
    assert untied.embed.weight.grad[10].abs().sum() == 0
    # the shared matrix's gradient is the sum of its two uses': those of an untied copy's embedding and output
    copy = untied_copy(tied).train()
    tied.zero_grad()
    torch.manual_seed(5)
    loss = lambda model: model(features(), CAPTIONS).logits.square().mean()  # noqa: E731
    loss(tied).backward()
    loss(copy).backward()
    assert torch.allclose(tied.embed.weight.grad, copy.embed.weight.grad + copy.out.weight.grad, atol=1e-6)
    assert torch.allclose(tied.out_bias.grad, copy.out.bias.grad, atol=1e-6)


def test_a_tied_model_saves_the_matrix_once_converts_to_float16_and_exports_to_onnx(tmp_path):
    trained = tiny_trained("show_attend_tell_tied", seed=3)  # a seed whose six pictures get six captions
    pictures = varied_pictures(6)
    want = trained.caption(pictures, beam_size=2)
    assert len({r.caption for r in want}) == 6

    saved = trained.save_pretrained(tmp_path / "model")
    stored = load_file(saved / "model.safetensors")
    assert "decoder.embed.weight" in stored and not any(k.startswith("decoder.out.") for k in stored)
    loaded = capkit.from_pretrained(saved)
    assert loaded.model.decoder.tie_embeddings
    assert [r.caption for r in loaded.caption(pictures, beam_size=2)] == [r.caption for r in want]

    half = trained.save_pretrained(tmp_path / "half", dtype="float16")
    full_size = (saved / "model.safetensors").stat().st_size
    assert 0.49 < (half / "model.safetensors").stat().st_size / full_size < 0.52
    loaded = capkit.from_pretrained(half)
    assert loaded.model.decoder.tie_embeddings
    assert torch.equal(loaded.model.decoder.embed.weight, trained.model.decoder.embed.weight.half().float())

    capkit_onnx = pytest.importorskip("capkit_onnx")
    pytest.importorskip("onnxscript")
    export_onnx(trained, tmp_path / "onnx")
    runtime = capkit_onnx.OnnxCaptioner.from_pretrained(tmp_path / "onnx")
    got = runtime.caption(pictures, beam_size=2)
    assert [r.caption for r in got] == [r.caption for r in want]
    assert max(abs(g.score - w.score) for g, w in zip(got, want)) < 1e-4
