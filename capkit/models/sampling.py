"""Batched sampling of captions from a decoder's step function (self-critical training), with gradients."""
from __future__ import annotations

import torch
from torch import Tensor

from capkit.models.attention.base import AttentionMemory
from capkit.models.beam_search import StepFn
from capkit.types import BOS_ID, EOS_ID, PAD_ID, SampledCaptions

__all__ = ["sample_captions"]


def sample_captions(
    step: StepFn,
    state: dict[str, Tensor],
    memory: AttentionMemory,
    *,
    num_samples: int,
    max_len: int = 16,
    temperature: float = 1.0,
    share_memory: bool = False,
    generator: torch.Generator | None = None,
) -> SampledCaptions:
    """Draw ``num_samples`` captions per image, every word from the step's softmax at ``temperature``.

    The rules match ``beam_search``: ``<pad>`` and ``<start>`` are never drawn (the distribution is
    renormalised over the other words), and a caption that has no ``<end>`` after ``max_len`` words takes it
    at the next step. The log-probabilities keep their graph, for the policy gradient.

    Args:
        step: the decoder's step function.
        state: decoder state for the B images, each tensor batch-first (B, ...).
        memory: attention memory for the B images.
        num_samples: S, captions per image.
        max_len: most words per caption.
        temperature: words are drawn from softmax(logits / temperature); the log-probabilities returned are
            those of that distribution, the policy the samples come from.
        share_memory: pass ``memory`` to ``step`` as it is (B rows for B * S queries, see ``Attention``).
        generator: the random generator of the draws (default: the global one).
    """
    if num_samples < 1 or max_len < 0 or not temperature > 0:
        raise ValueError(
            f"need num_samples >= 1, max_len >= 0 and temperature > 0, got {num_samples}, {max_len} and {temperature}"
        )
    batch = memory.values.shape[0]
    device = memory.values.device
    rows = torch.arange(batch, device=device).repeat_interleave(num_samples)  # (B * S,) image of each row
    state = {name: value.index_select(0, rows) for name, value in state.items()}
    step_memory = memory if share_memory else memory.index_select(rows)

    tokens = torch.full((batch * num_samples,), BOS_ID, dtype=torch.long, device=device)
    done = torch.zeros(batch * num_samples, dtype=torch.bool, device=device)
    drawn, log_probs = [], []
    for t in range(max_len + 1):
        logits, _, state = step(tokens, state, step_memory)
        banned = torch.zeros(logits.shape[-1], dtype=torch.bool, device=device)  # (V,)
        banned[[PAD_ID, BOS_ID]] = True
        if t == max_len:  # the last step: <end> only
            banned.fill_(True)
            banned[EOS_ID] = False
        logp = (logits.float() / temperature).masked_fill(banned, float("-inf")).log_softmax(dim=-1)  # (B * S, V)
        with torch.no_grad():
            tokens = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
            tokens = tokens.masked_fill(done, PAD_ID)
        log_probs.append(logp.gather(1, tokens.unsqueeze(1)).squeeze(1).masked_fill(done, 0.0))
        drawn.append(tokens)
        done = done | (tokens == EOS_ID)
        if bool(done.all()):
            break
    return SampledCaptions(torch.stack(drawn, dim=1), torch.stack(log_probs, dim=1), num_samples)
