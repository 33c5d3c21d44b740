"""The top-down attention decoder (``updown``): Anderson et al.'s two LSTMs, step by step."""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

import capkit
from capkit.models.attention.bahdanau import BahdanauAttention
from capkit.models.decoders.updown import UpDownDecoder
from capkit.models.decoders.word_lstm import StepLSTMCell
from capkit.types import BOS_ID, EOS_ID, PAD_ID, EncoderOutput

C, E, H, V = 6, 5, 4, 12


F = 7  # the features are mapped from C to F first


def decoder_and_memory():
    torch.manual_seed(0)
    decoder = UpDownDecoder(partial(BahdanauAttention, attn_dim=8), C, V, embed_dim=E, hidden_dim=H,
                            feature_dim=F).eval()
    enc = EncoderOutput(torch.randn(3, 4, C), (2, 2))
    return decoder, enc, decoder.prepare(enc)


def test_it_is_registered_and_built_from_a_config():
    decoder = capkit.DECODERS.build({"name": "updown", "hidden_dim": H, "embed_dim": E},
                                    attention=partial(BahdanauAttention, attn_dim=8), encoder_dim=C, vocab_size=V)
    assert isinstance(decoder, UpDownDecoder)
    assert decoder.attention_lstm.input_size == E + H + C and decoder.language_lstm.input_size == H + C
    assert type(decoder.language_lstm) is StepLSTMCell  # its weight gradients once per teacher-forcing pass


def test_one_step_is_anderson_et_als_equations():
    decoder, enc, memory = decoder_and_memory()
    attention_lstm, language_lstm = nn.LSTMCell(E + H + F, H), nn.LSTMCell(H + F, H)
    attention_lstm.load_state_dict(decoder.attention_lstm.state_dict())
    language_lstm.load_state_dict(decoder.language_lstm.state_dict())
    tokens = torch.tensor([BOS_ID, 7, 9])
    with torch.no_grad():
        state = decoder.init_state(memory)
        logits, alpha, new = decoder.step(tokens, state, memory)

        mean = decoder.feature_proj(enc.feats).mean(dim=1)  # (B, F): the mean of the mapped features
        h2, c2 = decoder.init_h(mean).tanh(), decoder.init_c(mean).tanh()  # the language LSTM's, from the mean
        zeros = torch.zeros(3, H)  # the attention LSTM's
        h1, c1 = attention_lstm(torch.cat([decoder.embed(tokens), h2, mean], dim=1), (zeros, zeros))
        context, expected_alpha = decoder.attention(h1, memory)
        h2, c2 = language_lstm(torch.cat([h1, context], dim=1), (h2, c2))
    torch.testing.assert_close(alpha, expected_alpha)
    torch.testing.assert_close(logits, decoder.out(h2))  # eval mode: no dropout
    for name, value in {"h": h2, "c": c2, "h_att": h1, "c_att": c1, "mean": mean}.items():
        torch.testing.assert_close(new[name], value, msg=name)


def test_teacher_forcing_gives_the_steps_logits_and_attention():
    decoder, enc, memory = decoder_and_memory()
    captions = torch.tensor([[BOS_ID, 5, 6, 7, EOS_ID], [BOS_ID, 8, EOS_ID, PAD_ID, PAD_ID],
                             [BOS_ID, 9, 10, EOS_ID, PAD_ID]])
    with torch.no_grad():
        out = decoder(enc, captions)
        state = decoder.init_state(memory)
        for t in range(captions.shape[1] - 1):
            logits, alpha, state = decoder.step(captions[:, t], state, memory)
            running = captions[:, t + 1] != PAD_ID
            torch.testing.assert_close(out.logits[running, t], logits[running], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out.alphas[running, t], alpha[running], rtol=1e-5, atol=1e-5)
    assert out.logits.shape == (3, 4, V) and out.alphas.shape == (3, 4, 4)
    assert out.aux_losses == {}  # no doubly stochastic term: it is Show, Attend and Tell's
