"""WordLSTMCell and WordGates: nn.LSTMCell's results and state dict, each word's gates computed once per call."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import partial

import pytest
import torch
from torch import nn

from capkit.models.attention.bahdanau import BahdanauAttention
from capkit.models.beam_search import beam_search
from capkit.models.decoders.luong import LuongDecoder
from capkit.models.decoders.show_attend_tell import ShowAttendTellDecoder
from capkit.models.decoders.transformer import TransformerDecoder
from capkit.models.decoders.updown import UpDownDecoder
from capkit.models.decoders.word_lstm import WordGates, WordLSTMCell, step_words, word_gate_cache
from capkit.types import EncoderOutput

E, X, H, V = 6, 5, 4, 11


def cell_and_inputs(batch: int = 3):
    torch.manual_seed(0)
    cell = WordLSTMCell(E, X, H)
    emb, x = torch.randn(batch, E), torch.randn(batch, X)
    hx = (torch.randn(batch, H), torch.randn(batch, H))
    return cell, emb, x, hx


def test_the_cell_is_an_lstm_cell_over_the_concatenated_input():
    cell, emb, x, hx = cell_and_inputs()
    reference = nn.LSTMCell(E + X, H)
    assert cell.state_dict().keys() == reference.state_dict().keys()
    cell.load_state_dict(reference.state_dict())  # checkpoints of nn.LSTMCell decoders load as they are
    expected = reference(torch.cat([emb, x], dim=1), hx)
    for got, want in zip(cell(emb, x, hx), expected):
        assert torch.equal(got, want)


def test_cached_word_gates_give_the_cells_result(monkeypatch):
    cell, _, x, hx = cell_and_inputs()
    embed, tokens = nn.Embedding(V, E), torch.tensor([3, 7, 3])
    with torch.no_grad():
        emb = embed(tokens)
        expected = cell(emb, x, hx)  # outside a decoding call: nn.LSTMCell
        fed = count_word_gate_calls(monkeypatch)
        with word_gate_cache(V), step_words(tokens, emb):
            got = cell(emb, x, hx)
    assert fed == [3]
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, atol=1e-6)


def test_a_cell_outside_step_words_or_with_autograd_runs_the_plain_lstm(monkeypatch):
    cell, emb, x, hx = cell_and_inputs()
    monkeypatch.setattr(WordGates, "__call__", lambda *args: pytest.fail("no word gates outside a decoding step"))
    with word_gate_cache(V):
        with torch.no_grad():
            cell(emb, x, hx)  # a decoding call, but no step's words announced
        with step_words(torch.tensor([1, 2, 3]), emb):
            cell(emb, x, hx)  # autograd on: training, the weights change
        with torch.no_grad(), step_words(torch.tensor([1, 2, 3]), emb):
            cell(emb * 2, x, hx)  # another input than the announced embeddings (a scaled one, a stacked layer's)'


def test_word_gates_compute_each_fed_word_once():
    cell, _, _, _ = cell_and_inputs()
    embed = nn.Embedding(V, E)
    gates = WordGates(cell, V)
    with torch.no_grad():
        expected = cell.embedding_gates(embed.weight)  # (V, 4H): every word's row
    tokens = torch.tensor([3, 7, 3, 3])
    assert torch.allclose(gates(tokens, embed(tokens)), expected[tokens], atol=1e-6)
    assert gates.known.nonzero().view(-1).tolist() == [3, 7]
    gates.rows[3] = 123.0  # a known word's row is read back, not recomputed
    tokens = torch.tensor([7, 9, 3])
    rows = gates(tokens, embed(tokens))
    assert torch.allclose(rows[:2], expected[[7, 9]], atol=1e-6) and (rows[2] == 123.0).all()
    assert gates.known.nonzero().view(-1).tolist() == [3, 7, 9]


def test_word_gates_are_built_without_autograd():
    cell, _, _, _ = cell_and_inputs()
    tokens = torch.tensor([1, 2])
    assert not WordGates(cell, V)(tokens, nn.Embedding(V, E)(tokens)).requires_grad


def decoder_and_features(decoder_class, seed: int = 0):
    torch.manual_seed(seed)
    decoder = decoder_class(partial(BahdanauAttention, attn_dim=8), 10, V, embed_dim=E, hidden_dim=H).eval()
    with torch.no_grad():
        decoder.out.weight.mul_(5.0)  # peaked distributions, like a trained model's
    return decoder, EncoderOutput(torch.randn(4, 9, 10), (3, 3))


def plain_search(decoder, enc, **kwargs):
    memory = decoder.prepare(enc)
    return beam_search(decoder.step, decoder.init_state(memory), memory, share_memory=True, **kwargs)


@pytest.mark.parametrize("decoder_class", [ShowAttendTellDecoder, LuongDecoder, UpDownDecoder])
def test_generate_decodes_with_word_gates_and_equals_the_plain_step(decoder_class, monkeypatch):
    decoder, enc = decoder_and_features(decoder_class)
    fed = []
    call = WordGates.__call__
    monkeypatch.setattr(WordGates, "__call__", lambda self, tokens, emb: fed.append(len(tokens)) or call(self, tokens, emb))
    generation = decoder.generate(enc, beam_size=3, max_len=6)
    assert fed == [4] + [12] * 6  # every step: the first once per image, then 3 beams for each of the 4 images
    with torch.no_grad():
        plain = plain_search(decoder, enc, beam_size=3, max_len=6)
    assert generation.tokens == plain.tokens
    assert torch.allclose(generation.scores, plain.scores, atol=1e-5)


@pytest.mark.parametrize("decoder_class", [ShowAttendTellDecoder, LuongDecoder, UpDownDecoder])
def test_word_gates_under_cpu_autocast_give_the_plain_steps_captions(decoder_class):
    decoder, enc = decoder_and_features(decoder_class)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        generation = decoder.generate(enc, beam_size=3, max_len=6)
        plain = plain_search(decoder, enc, beam_size=3, max_len=6)
    assert generation.tokens == plain.tokens
    assert torch.allclose(generation.scores, plain.scores, atol=0.1)  # bf16 products, summed in another order


class OwnStep(ShowAttendTellDecoder):
    """A subclass with its own step, which does not announce its words (``step_words``)."""

    def step(self, tokens, state, memory):
        emb = self.embed(tokens)
        out, alpha, state = self.recur(emb, state, memory)
        return self.output(emb, out), alpha, state


def count_word_gate_calls(monkeypatch) -> list[int]:
    fed: list[int] = []
    call = WordGates.__call__
    monkeypatch.setattr(WordGates, "__call__", lambda self, tokens, emb: fed.append(len(tokens)) or call(self, tokens, emb))
    return fed


def test_a_step_that_announces_no_words_decodes_with_the_plain_cell(monkeypatch):
    decoder, enc = decoder_and_features(OwnStep)
    fed = count_word_gate_calls(monkeypatch)
    with torch.no_grad():
        plain = plain_search(decoder, enc, beam_size=3, max_len=4)
    assert decoder.generate(enc, beam_size=3, max_len=4).tokens == plain.tokens
    assert fed == []


def test_a_decoder_without_a_word_lstm_decodes_with_its_plain_step(monkeypatch):
    decoder = TransformerDecoder(partial(BahdanauAttention), 10, V, d_model=8, num_layers=1, num_heads=2, ffn_dim=8)
    fed = count_word_gate_calls(monkeypatch)
    decoder.eval().generate(EncoderOutput(torch.randn(2, 9, 10), (3, 3)), beam_size=2, max_len=3)
    assert fed == []


def test_concurrent_decoding_calls_keep_their_own_words():
    """The call's words live in a context variable: threads decoding at once give their sequential results."""
    decoder, enc = decoder_and_features(ShowAttendTellDecoder)
    halves = [EncoderOutput(enc.feats[:2], enc.grid), EncoderOutput(enc.feats[2:], enc.grid)]
    alone = [decoder.generate(h, beam_size=3, max_len=6).tokens for h in halves]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda h: decoder.generate(h, beam_size=3, max_len=6).tokens, halves * 4))
    assert together == alone * 4


@pytest.mark.parametrize("bias, batched", [(True, True), (False, True), (True, False)])
def test_a_step_cell_in_a_teacher_forcing_pass_is_the_lstm_cell(bias, batched):
    from capkit.models.decoders.word_lstm import StepLSTMCell
    from capkit.models.step_weights import step_weights

    torch.manual_seed(0)
    cell, reference = StepLSTMCell(X, H, bias=bias), nn.LSTMCell(X, H, bias=bias)
    reference.load_state_dict(cell.state_dict())
    shape = (3,) if batched else ()
    x, hx = torch.randn(*shape, X), (torch.randn(*shape, H), torch.randn(*shape, H))
    with step_weights():  # no bias or an unbatched input: nn.LSTMCell's own path
        got = cell(x, hx)
    for a, b in zip(got, reference(x, hx)):
        torch.testing.assert_close(a, b)
