"""WordLSTMCell and WordGates: nn.LSTMCell's results and state dict, each word's gates computed once per call."""
from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from capkit.models.attention.bahdanau import BahdanauAttention
from capkit.models.beam_search import beam_search
from capkit.models.decoders.luong import LuongDecoder
from capkit.models.decoders.show_attend_tell import ShowAttendTellDecoder
from capkit.models.decoders.transformer import TransformerDecoder
from capkit.models.decoders.word_lstm import WordGates, WordLSTMCell
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


def test_precomputed_word_gates_give_the_cells_result():
    cell, emb, x, hx = cell_and_inputs()
    with torch.no_grad():
        expected = cell(emb, x, hx)
        got = cell(emb, x, hx, word_gates=cell.embedding_gates(emb))
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, atol=1e-6)


def test_lazy_word_gates_compute_each_fed_word_once():
    cell, _, _, _ = cell_and_inputs()
    embed = nn.Embedding(V, E)
    gates = WordGates(embed, cell, lazy=True)
    all_rows = WordGates(embed, cell, lazy=False)(torch.arange(V))  # (V, 4H), every word at once
    tokens = torch.tensor([3, 7, 3, 3])
    assert torch.allclose(gates(tokens), all_rows[tokens], atol=1e-6)
    assert gates.known.nonzero().view(-1).tolist() == [3, 7]
    first_row = gates.rows[3].clone()
    assert torch.allclose(gates(torch.tensor([7, 9, 3])), all_rows[[7, 9, 3]], atol=1e-6)
    assert gates.known.nonzero().view(-1).tolist() == [3, 7, 9]
    assert torch.equal(gates.rows[3], first_row)  # a known word's row is not recomputed


def test_word_gates_are_built_without_autograd():
    cell, _, _, _ = cell_and_inputs()
    gates = WordGates(nn.Embedding(V, E), cell, lazy=True)
    assert not gates(torch.tensor([1, 2])).requires_grad


@pytest.mark.parametrize("decoder_class", [ShowAttendTellDecoder, LuongDecoder])
def test_generate_with_word_gates_equals_beam_search_over_the_plain_step(decoder_class):
    torch.manual_seed(0)
    decoder = decoder_class(partial(BahdanauAttention, attn_dim=8), 10, V, embed_dim=E, hidden_dim=H).eval()
    step = decoder.decoding_step()
    assert isinstance(step.keywords["word_gates"], WordGates)
    enc = EncoderOutput(torch.randn(4, 9, 10), (3, 3))
    generation = decoder.generate(enc, beam_size=3, max_len=6)
    with torch.no_grad():
        memory = decoder.prepare(enc)
        plain = beam_search(decoder.step, decoder.init_state(memory), memory, beam_size=3, max_len=6)
    assert generation.tokens == plain.tokens
    assert torch.allclose(generation.scores, plain.scores, atol=1e-5)


def test_a_decoder_without_a_word_lstm_decodes_with_its_plain_step():
    decoder = TransformerDecoder(partial(BahdanauAttention), 10, V, d_model=8, num_layers=1, num_heads=2, ffn_dim=8)
    assert decoder.decoding_step() == decoder.step
