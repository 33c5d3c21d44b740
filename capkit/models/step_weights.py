"""Weights and memory read at every step of a recurrence, their gradients computed once per pass, not per step.

Teacher forcing runs a recurrent cell step by step, so autograd computes a product's weight gradient at every step
(grad_out_t^T @ x_t, a (out, in) matrix) and adds it to the last: for the Show, Attend and Tell LSTM that is 17
products and additions of a 2048 x 2560 matrix per batch, which cost more than the steps' own products on the
CPU, and under bf16 autocast the additions run in bf16, slower still. Within ``step_weights()``
``step_linear(x, weight)`` keeps each step's x and grad_out instead, and computes the weight's gradient as one
product over every step's rows, once all steps' gradients are known (as cuDNN's RNNs do): the same sum, in one
large matrix product. The weight is also cast to the autocast dtype once per pass instead of once per step.

The memory a recurrence reads at every step (the attention's keys, of the images still running) has the same
trouble: autograd turns each step's ``x[:rows]`` gradient into a zero-filled (B, ...) tensor and adds it to the
last, three passes over the whole tensor per step, in bf16 under autocast. ``step_rows(x, rows)`` records each
step's (rows, ...) gradient instead and sums them once, in fp32, into the first rows of one buffer.

The call's state lives in a context variable, not on the modules, so that concurrent passes (threads) never see
each other's weights. Outside ``step_weights()``, or without autograd, ``step_linear`` is ``F.linear`` and
``step_rows(x, rows)`` is ``x[:rows]``.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["step_weights", "step_linear", "step_rows", "in_step_weights", "bucket_rows", "ROW_BUCKET"]

ROW_BUCKET = 64  # see bucket_rows


class _PassToken(torch.autograd.Function):
    """tensor -> a scalar token that every step's use of the tensor depends on, so that autograd runs this backward
    after all of theirs: it returns the tensor's gradient, summed by the record from what the steps recorded."""

    @staticmethod
    def forward(ctx, tensor: Tensor, record: _StepWeight | _StepRows) -> Tensor:  # type: ignore[override]
        ctx.record = record
        return tensor.new_zeros(())

    @staticmethod
    def backward(ctx, _token_grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return ctx.record.gradient(), None


class _StepWeight:
    """One weight (out, in) within one pass: its cast copy, and every step's input and output gradient."""

    def __init__(self, weight: Tensor):
        device = weight.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        self.weight = weight.detach().to(dtype)  # (out, in), cast once per pass
        self.dtype = weight.dtype
        self.inputs: list[Tensor] = []  # each step's x (B_t, in), filled during backward
        self.grads: list[Tensor] = []  # each step's grad_out (B_t, out)
        self.token = _PassToken.apply(weight, self)

    def gradient(self) -> Tensor:
        """(out, in): every step's rows in one product (zero rows added by bucket_rows add nothing)."""
        grad = bucket_rows(torch.cat(self.grads)).t() @ bucket_rows(torch.cat(self.inputs))
        self.grads.clear()  # a second backward (retain_graph) records its steps afresh
        self.inputs.clear()
        return grad.to(self.dtype)


class _StepProduct(torch.autograd.Function):
    """x @ weight^T for one step; its backward returns x's gradient and records (x, grad_out) for the weight's."""

    @staticmethod
    def forward(ctx, x: Tensor, token: Tensor, record: _StepWeight) -> Tensor:  # type: ignore[override]
        x = x.to(record.weight.dtype)
        ctx.save_for_backward(x)
        ctx.record = record
        return x @ record.weight.t()

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        record = ctx.record
        grad_out = grad_out.to(record.weight.dtype)
        record.inputs.append(x)
        record.grads.append(grad_out)
        return grad_out @ record.weight, grad_out.new_zeros((), dtype=record.dtype), None


class _StepRows:
    """One tensor (B, ...) read a leading block of rows at a time within one pass, and each read's gradient."""

    def __init__(self, tensor: Tensor):
        self.tensor = tensor.detach()
        self.grads: list[Tensor] = []  # each step's (rows, ...) gradient, filled during backward
        self.token = _PassToken.apply(tensor, self)

    def gradient(self) -> Tensor:
        """(B, ...): the steps' row gradients summed in fp32 (at least), each into the rows it read."""
        total = self.tensor.new_zeros(self.tensor.shape, dtype=torch.promote_types(self.tensor.dtype, torch.float32))
        for grad in self.grads:
            total[: len(grad)] += grad
        self.grads.clear()  # a second backward (retain_graph) records its steps afresh
        return total.to(self.tensor.dtype)


class _LeadingRows(torch.autograd.Function):
    """tensor[:rows] for one step; its backward records the (rows, ...) gradient for the record's sum."""

    @staticmethod
    def forward(ctx, token: Tensor, record: _StepRows, rows: int) -> Tensor:  # type: ignore[override]
        ctx.record = record
        return record.tensor[:rows]

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        ctx.record.grads.append(grad)
        return grad.new_zeros((), dtype=ctx.record.tensor.dtype), None, None


def bucket_rows(x: Tensor) -> Tensor:
    """x (P, ...) with zero rows appended up to a multiple of ``ROW_BUCKET`` where its products would run in a
    reduced precision on the CPU (under CPU autocast, or x itself bf16/fp16 there); x itself elsewhere.

    oneDNN builds a bf16 matrix-product kernel for every new shape it meets, which takes longer than the product,
    and a teacher-forcing pass's step count P changes with every batch; rounded up, a few shapes recur."""
    low = x.dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled("cpu")
    if x.device.type != "cpu" or not low or len(x) % ROW_BUCKET == 0:
        return x
    return torch.cat([x, x.new_zeros(ROW_BUCKET - len(x) % ROW_BUCKET, *x.shape[1:])])


# one pass's records: ("weight" | "rows", id of the tensor) -> its record
_PASS: ContextVar[dict[tuple[str, int], _StepWeight | _StepRows] | None] = ContextVar(
    "capkit_step_weights", default=None
)


@contextmanager
def step_weights() -> Iterator[None]:
    """Within: one pass of a recurrence (teacher forcing), whose ``step_linear`` weights stay fixed."""
    token = _PASS.set({})
    try:
        yield
    finally:
        _PASS.reset(token)


def in_step_weights() -> bool:
    """Whether a ``step_weights()`` pass is open."""
    return _PASS.get() is not None


def step_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (B, in) @ weight (out, in)^T + bias -> (B, out); within ``step_weights()`` and with autograd, the
    weight's gradient is computed once for the whole pass (see the module docstring)."""
    records = _PASS.get()
    if records is None or not (torch.is_grad_enabled() and weight.requires_grad):
        return F.linear(x, weight, bias)
    record = records.get(("weight", id(weight)))
    if record is None:
        record = records["weight", id(weight)] = _StepWeight(weight)
    out = _StepProduct.apply(x, record.token, record)
    return out if bias is None else out + bias


def step_rows(x: Tensor, rows: int) -> Tensor:
    """x[:rows] for x (B, ...); within ``step_weights()`` and with autograd, x's gradient is summed once for the
    whole pass (see the module docstring)."""
    records = _PASS.get()
    if records is None or not (torch.is_grad_enabled() and x.requires_grad):
        return x[:rows]
    record = records.get(("rows", id(x)))
    if record is None:
        record = records["rows", id(x)] = _StepRows(x)
    return _LeadingRows.apply(record.token, record, rows)
