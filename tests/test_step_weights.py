"""step_weights: a recurrence's weight and memory gradients computed once per pass are autograd's per-step sums."""
from __future__ import annotations

import contextlib
from functools import partial

import pytest
import torch
import torch.nn.functional as F

import capkit.models.decoders.lstm as lstm_module
import capkit.models.decoders.word_lstm as word_lstm
from capkit.engine.device import cpu_has_native_bf16
from capkit.models.attention.bahdanau import BahdanauAttention
from capkit.models.decoders.luong import LuongDecoder
from capkit.models.decoders.show_attend_tell import ShowAttendTellDecoder
from capkit.models.decoders.updown import UpDownDecoder
from capkit.models.step_weights import ROW_BUCKET, bucket_rows, step_linear, step_rows, step_weights
from capkit.types import BOS_ID, EOS_ID, PAD_ID, EncoderOutput

IN, OUT = 5, 4


def shrinking_recurrence(weight, recurrent, bias, memory, xs):
    """h_{t+1} = tanh(x_t W^T + h_t R^T + b + m) on the rows still running (xs: inputs of 4, 3, 3, 1 rows), each
    step reading the memory's rows m of those captions."""
    h = torch.zeros(len(xs[0]), OUT, dtype=torch.float64)
    total = h.new_zeros(())
    for x in xs:
        rows = len(x)
        h = torch.tanh(step_linear(x, weight, bias) + step_linear(h[:rows], recurrent) + step_rows(memory, rows))
        total = total + h.sum() * rows  # every step's rows reach the loss, weighted apart
    return total


def parameters():
    torch.manual_seed(0)
    weight = torch.randn(OUT, IN, dtype=torch.float64, requires_grad=True)
    recurrent = torch.randn(OUT, OUT, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(OUT, dtype=torch.float64, requires_grad=True)
    memory = torch.randn(4, OUT, dtype=torch.float64, requires_grad=True)
    xs = [torch.randn(rows, IN, dtype=torch.float64, requires_grad=True) for rows in (4, 3, 3, 1)]
    return weight, recurrent, bias, memory, xs


def gradients(deferred: bool, backward_passes: int = 1):
    weight, recurrent, bias, memory, xs = parameters()
    with step_weights() if deferred else contextlib.nullcontext():  # outside a pass: F.linear and x[:rows]
        loss = shrinking_recurrence(weight, recurrent, bias, memory, xs)
    for i in range(backward_passes):
        loss.backward(retain_graph=i + 1 < backward_passes)
    return loss.detach(), [t.grad for t in (weight, recurrent, bias, memory, *xs)]


def test_gradients_once_per_pass_equal_autograds_per_step_sums():
    want_loss, want = gradients(deferred=False)
    got_loss, got = gradients(deferred=True)
    assert torch.equal(got_loss, want_loss)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_a_second_backward_of_the_same_pass_adds_the_same_gradients_again():
    _, once = gradients(deferred=True)
    _, twice = gradients(deferred=True, backward_passes=2)
    for g1, g2 in zip(once, twice):
        torch.testing.assert_close(g2, 2 * g1, rtol=1e-12, atol=1e-12)


def test_outside_a_pass_or_without_autograd_they_are_f_linear_and_a_slice():
    weight, _, bias, memory, xs = parameters()
    assert step_linear(xs[0], weight, bias).grad_fn.name() == F.linear(xs[0], weight, bias).grad_fn.name()
    assert step_rows(memory, 2).grad_fn.name() == memory[:2].grad_fn.name()
    with step_weights(), torch.no_grad():
        assert torch.equal(step_linear(xs[0], weight, bias), F.linear(xs[0], weight, bias))
        assert torch.equal(step_rows(memory, 2), memory[:2])
    with step_weights():
        assert "StepProduct" in step_linear(xs[0], weight).grad_fn.name()
        assert "LeadingRows" in step_rows(memory, 2).grad_fn.name()
        assert torch.equal(step_rows(memory, 2), memory[:2])


@pytest.mark.parametrize("decoder_class", [ShowAttendTellDecoder, LuongDecoder, UpDownDecoder])
def test_the_lstm_decoders_teacher_forcing_gradients_are_unchanged(decoder_class, monkeypatch):
    torch.manual_seed(0)
    decoder = decoder_class(partial(BahdanauAttention, attn_dim=8), 6, 20, embed_dim=8, hidden_dim=8, dropout=0.0)
    enc = EncoderOutput(torch.randn(3, 4, 6), (2, 2))
    captions = torch.tensor([[BOS_ID, 5, 6, 7, EOS_ID], [BOS_ID, 8, EOS_ID, PAD_ID, PAD_ID],
                             [BOS_ID, 9, 10, EOS_ID, PAD_ID]])

    def grads():
        decoder.zero_grad(set_to_none=True)
        out = decoder(enc, captions)
        out.logits.logsumexp(-1).sum().backward()
        return {name: p.grad.clone() for name, p in decoder.named_parameters()}

    products = []
    with monkeypatch.context() as patch:  # which weights take the once-per-pass path
        patch.setattr(word_lstm, "step_linear", lambda x, w, *a: products.append(w) or step_linear(x, w, *a))
        deferred = grads()
    lstm_weights = [p for name, p in decoder.named_parameters() if "lstm" in name and ".weight_" in name]
    assert lstm_weights and all(any(w is p for p in products) for w in lstm_weights)
    monkeypatch.setattr(lstm_module, "step_weights", contextlib.nullcontext)  # autograd's per-step sums
    per_step = grads()
    assert deferred.keys() == per_step.keys()
    for name in per_step:
        torch.testing.assert_close(deferred[name], per_step[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16 (AVX-512 BF16 or AMX)")
def test_under_bf16_autocast_the_products_are_bf16_and_the_weight_gradient_fp32():
    torch.manual_seed(0)
    weight = torch.randn(OUT, IN, requires_grad=True)
    xs = [torch.randn(rows, IN) for rows in (4, 2)]
    with torch.autocast("cpu", dtype=torch.bfloat16), step_weights():
        outs = [step_linear(x, weight) for x in xs]
    assert all(out.dtype == torch.bfloat16 for out in outs)
    sum(out.float().sum() for out in outs).backward()
    assert weight.grad.dtype == torch.float32
    # d/dW of sum(x W^T) is the column sums of every step's x, here within bf16's rounding of x
    torch.testing.assert_close(weight.grad, torch.cat(xs).sum(0).expand(OUT, IN), rtol=2e-2, atol=2e-2)


def test_row_gradients_are_summed_in_fp32_and_returned_in_the_tensors_dtype():
    memory = torch.zeros(4, 3, dtype=torch.bfloat16, requires_grad=True)
    with step_weights():
        reads = [step_rows(memory, rows) for rows in (4, 2, 2)]
    weights = (1.0, 1 / 256, 1 / 256)
    sum(r.float().sum() * w for r, w in zip(reads, weights)).backward()
    # rows 0-1: 1 + 1/256 + 1/256. Added in bf16 (spacing 1/128 above 1) each 1/256 rounds away and the sum stays
    # 1; added in fp32 it is 1 + 1/128, which bf16 holds exactly
    assert memory.grad.dtype == torch.bfloat16
    assert memory.grad[:, 0].tolist() == [1 + 1 / 128, 1 + 1 / 128, 1.0, 1.0]


def test_rows_are_bucketed_only_where_products_run_in_reduced_precision_on_the_cpu():
    x = torch.randn(70, 3)
    assert bucket_rows(x) is x  # fp32, no autocast: nothing to gain
    with torch.autocast("cpu", dtype=torch.bfloat16):
        padded = bucket_rows(x)
    assert padded.shape == (2 * ROW_BUCKET, 3) and torch.equal(padded[:70], x) and not padded[70:].any()
    assert bucket_rows(x.bfloat16()).shape == (2 * ROW_BUCKET, 3)
    assert bucket_rows(torch.zeros(ROW_BUCKET, 3, dtype=torch.bfloat16)).shape == (ROW_BUCKET, 3)
