"""step_weights: a recurrence's weight gradients computed once per pass are autograd's per-step sums."""
from __future__ import annotations

import contextlib
from functools import partial

import pytest
import torch
import torch.nn.functional as F

import capkit.models.decoders.lstm as lstm_module
from capkit.engine.device import cpu_has_native_bf16
from capkit.models.attention.bahdanau import BahdanauAttention
from capkit.models.decoders.show_attend_tell import ShowAttendTellDecoder
from capkit.models.step_weights import step_linear, step_weights
from capkit.types import BOS_ID, EOS_ID, PAD_ID, EncoderOutput

IN, OUT = 5, 4


def shrinking_recurrence(linear, weight, recurrent, bias, xs):
    """h_{t+1} = tanh(x_t W^T + h_t R^T + b) on the rows still running (xs: inputs of 4, 3, 3, 1 rows)."""
    h = torch.zeros(len(xs[0]), OUT, dtype=torch.float64)
    total = h.new_zeros(())
    for x in xs:
        h = torch.tanh(linear(x, weight, bias) + linear(h[: len(x)], recurrent))
        total = total + h.sum() * len(x)  # every step's rows reach the loss, weighted apart
    return total


def parameters():
    torch.manual_seed(0)
    weight = torch.randn(OUT, IN, dtype=torch.float64, requires_grad=True)
    recurrent = torch.randn(OUT, OUT, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(OUT, dtype=torch.float64, requires_grad=True)
    xs = [torch.randn(rows, IN, dtype=torch.float64, requires_grad=True) for rows in (4, 3, 3, 1)]
    return weight, recurrent, bias, xs


def gradients(linear, deferred: bool, backward_passes: int = 1):
    weight, recurrent, bias, xs = parameters()
    with step_weights() if deferred else contextlib.nullcontext():
        loss = shrinking_recurrence(linear, weight, recurrent, bias, xs)
    for i in range(backward_passes):
        loss.backward(retain_graph=i + 1 < backward_passes)
    return loss.detach(), [t.grad for t in (weight, recurrent, bias, *xs)]


def test_weight_gradients_once_per_pass_equal_autograds_per_step_sums():
    want_loss, want = gradients(F.linear, deferred=False)
    got_loss, got = gradients(step_linear, deferred=True)
    assert torch.equal(got_loss, want_loss)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_a_second_backward_of_the_same_pass_adds_the_same_gradients_again():
    _, once = gradients(step_linear, deferred=True)
    _, twice = gradients(step_linear, deferred=True, backward_passes=2)
    for g1, g2 in zip(once, twice):
        torch.testing.assert_close(g2, 2 * g1, rtol=1e-12, atol=1e-12)


def test_outside_a_pass_or_without_autograd_it_is_f_linear():
    weight, _, bias, xs = parameters()
    assert step_linear(xs[0], weight, bias).grad_fn.name() == F.linear(xs[0], weight, bias).grad_fn.name()
    with step_weights(), torch.no_grad():
        assert torch.equal(step_linear(xs[0], weight, bias), F.linear(xs[0], weight, bias))
    with step_weights():
        assert "StepProduct" in step_linear(xs[0], weight).grad_fn.name()


def test_the_lstm_decoders_teacher_forcing_gradients_are_unchanged(monkeypatch):
    torch.manual_seed(0)
    decoder = ShowAttendTellDecoder(partial(BahdanauAttention, attn_dim=8), 6, 20, embed_dim=8, hidden_dim=8,
                                    dropout=0.0)
    enc = EncoderOutput(torch.randn(3, 4, 6), (2, 2))
    captions = torch.tensor([[BOS_ID, 5, 6, 7, EOS_ID], [BOS_ID, 8, EOS_ID, PAD_ID, PAD_ID],
                             [BOS_ID, 9, 10, EOS_ID, PAD_ID]])

    def grads():
        decoder.zero_grad(set_to_none=True)
        out = decoder(enc, captions)
        out.logits.logsumexp(-1).sum().backward()
        return {name: p.grad.clone() for name, p in decoder.named_parameters()}

    deferred = grads()
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
