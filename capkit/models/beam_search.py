"""Batched beam search: every image's beams advance together in one (B * K, ...) tensor per step."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from capkit.models.attention.base import AttentionMemory
from capkit.types import BOS_ID, EOS_ID, PAD_ID, Generation, Hypothesis

__all__ = ["beam_search", "StepFn"]

# (previous tokens (B*K,), state, memory) -> (logits (B*K, V), alpha (B*K, N), new state)
StepFn = Callable[[Tensor, dict[str, Tensor], AttentionMemory], tuple[Tensor, Tensor, dict[str, Tensor]]]


def beam_search(
    step: StepFn,
    state: dict[str, Tensor],
    memory: AttentionMemory,
    *,
    beam_size: int = 3,
    max_len: int = 16,
    length_penalty: float = 0.0,
    n_best: int = 1,
    share_memory: bool = False,
) -> Generation:
    """Find, for each image, the captions of highest log-probability.

    A hypothesis holds at most ``max_len`` words followed by ``<end>``: one that has not emitted ``<end>``
    after ``max_len`` words takes ``<end>`` at the next step (with its real log-probability), so every
    hypothesis ends and none is empty of steps. ``<pad>`` and ``<start>`` are never generated. A finished
    hypothesis stays in its beam with its score frozen. Hypotheses are ranked by
    ``score / length ** length_penalty`` (length counts ``<end>``); 0 ranks by total log-probability.
    Beam size 1 is greedy decoding.

    The first step runs once per image (all of an image's beams start from the same ``<start>``), and the
    beams of every image advance together after it: one ``step`` call of B * K rows per step. An image leaves
    the batch as soon as its K hypotheses have all ended, so that later steps compute only the open ones.

    Args:
        step: the decoder's step function.
        state: decoder state for the B images, each tensor batch-first (B, ...).
        memory: attention memory for the B images.
        beam_size: K, hypotheses kept per image.
        max_len: most words per caption.
        length_penalty: exponent of the length normalisation of the final ranking.
        n_best: hypotheses returned per image (at most ``beam_size``).
        share_memory: pass ``memory`` to ``step`` as it is, B rows for B * K hypotheses (the attention must
            support it, see ``Attention``), instead of one copy per hypothesis.
    """
    if beam_size < 1 or n_best < 1 or max_len < 0:
        raise ValueError(f"need beam_size >= 1, n_best >= 1, max_len >= 0; got {beam_size}, {n_best}, {max_len}")
    n_best = min(n_best, beam_size)
    batch, k = memory.values.shape[0], beam_size
    device = memory.values.device
    step_memory = memory  # B rows at the first step; then B * K rows unless shared
    hypotheses: list[list[Hypothesis]] = [[] for _ in range(batch)]
    active = torch.arange(batch, device=device)  # the input index of each image still decoding

    tokens = torch.full((batch,), BOS_ID, dtype=torch.long, device=device)
    width = 1  # live hypotheses per image: 1 at the first step, K after
    scores = torch.zeros(batch, 1, device=device)
    finished = torch.zeros(batch, 1, dtype=torch.bool, device=device)
    any_finished = False
    lengths = torch.zeros(batch, 1, dtype=torch.long, device=device)
    history = torch.empty(batch, 0, dtype=torch.long, device=device)  # (B*width, t)
    alpha_history: Tensor | None = None  # (B*width, t, N)
    logp_buffer: Tensor | None = None  # (B*K, V), reused by every step: no fresh (B*K, V) tensors per step

    for t in range(max_len + 1):
        logits, alpha, state = step(tokens, state, step_memory)
        vocab = logits.shape[-1]
        if logp_buffer is None:
            logp_buffer = torch.empty(batch * k, vocab, dtype=torch.float32, device=device)
        logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32, out=logp_buffer[: len(logits)])
        logp[:, PAD_ID] = float("-inf")
        logp[:, BOS_ID] = float("-inf")
        if t == max_len:  # the last step: every hypothesis still open takes <end>
            eos = logp[:, EOS_ID].clone()
            logp.fill_(float("-inf"))
            logp[:, EOS_ID] = eos
        logp = logp.view(batch, width, vocab)
        if any_finished:  # a finished hypothesis continues only with <pad>, at no cost
            logp.masked_fill_(finished.unsqueeze(2), float("-inf"))
            logp[:, :, PAD_ID].masked_fill_(finished, 0.0)

        candidates = logp.add_(scores.unsqueeze(2)).view(batch, width * vocab)
        if width * vocab < k:  # fewer candidates than beams (a tiny vocabulary): the rest start dead
            candidates = F.pad(candidates, (0, k - width * vocab), value=float("-inf"))
        scores, flat_index = candidates.topk(k, dim=1)  # (B, K)
        parent = (flat_index // vocab).clamp(max=width - 1)  # (B, K)
        new_tokens = flat_index % vocab
        rows = (torch.arange(batch, device=device).unsqueeze(1) * width + parent).view(-1)  # rows of this step

        was_finished = finished.gather(1, parent)
        lengths = lengths.gather(1, parent) + (~was_finished).long()
        # a beam of score -inf (fewer live candidates than beams) is dead: it counts as ended
        finished = was_finished | (new_tokens == EOS_ID) | scores.isneginf()
        history = torch.cat([history.index_select(0, rows), new_tokens.view(-1, 1)], dim=1)
        step_alpha = alpha.index_select(0, rows).unsqueeze(1)
        alpha_history = (
            step_alpha if alpha_history is None else torch.cat([alpha_history.index_select(0, rows), step_alpha], 1)
        )
        state = {name: value.index_select(0, rows) for name, value in state.items()}
        tokens = new_tokens.view(-1)
        if t == 0 and not share_memory:
            step_memory = memory.index_select(torch.arange(batch, device=device).repeat_interleave(k))
        width = k

        any_finished = bool(finished.any())
        if not any_finished:
            continue
        image_done = finished.all(dim=1)  # (B,): every beam of the image has ended
        done = image_done.nonzero().squeeze(1)
        if len(done) == 0:
            continue
        done_rows = _beam_rows(done, k)
        ranked = _rank(
            scores[done], lengths[done], history[done_rows], alpha_history[done_rows], n_best, length_penalty
        )
        for image, best in zip(active[done].tolist(), ranked):
            hypotheses[image] = best
        if len(done) == batch:
            break
        # Compaction: the finished images leave the batch, so that later steps compute only open ones.
        keep = (~image_done).nonzero().squeeze(1)
        keep_rows = _beam_rows(keep, k)
        active, scores, finished, lengths = active[keep], scores[keep], finished[keep], lengths[keep]
        tokens, history, alpha_history = tokens[keep_rows], history[keep_rows], alpha_history[keep_rows]
        state = {name: value.index_select(0, keep_rows) for name, value in state.items()}
        step_memory = step_memory.index_select(keep if share_memory else keep_rows)
        batch = len(keep)
    return Generation(hypotheses=hypotheses, grid=memory.grid)


def _beam_rows(images: Tensor, k: int) -> Tensor:
    """Rows (D * K,) of the K hypotheses of each of the images (D,) in the (B * K, ...) tensors of a step."""
    return (images.unsqueeze(1) * k + torch.arange(k, device=images.device)).view(-1)


def _rank(
    scores: Tensor, lengths: Tensor, history: Tensor, alpha_history: Tensor, n_best: int, length_penalty: float
) -> list[list[Hypothesis]]:
    """The ``n_best`` hypotheses of each of D finished images, best first: scores and lengths (D, K), token
    history (D * K, T), attention history (D * K, T, N). Hypotheses that never lived (score -inf) are left out."""
    k = scores.shape[1]
    ranked = scores / lengths.clamp(min=1).float().pow(length_penalty)
    ranked = ranked.masked_fill(~torch.isfinite(scores), float("-inf"))
    order = ranked.argsort(dim=1, descending=True)
    hypotheses = []
    for b in range(scores.shape[0]):
        best = []
        for j in order[b, :n_best].tolist():
            if not torch.isfinite(scores[b, j]):
                break
            row, length = b * k + j, int(lengths[b, j])
            best.append(
                Hypothesis(
                    tokens=history[row, : length - 1].tolist(),
                    score=float(scores[b, j]),
                    norm_score=float(ranked[b, j]),
                    alphas=alpha_history[row, :length].cpu(),
                )
            )
        hypotheses.append(best)
    return hypotheses
