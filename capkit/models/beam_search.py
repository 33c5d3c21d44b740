"""Batched beam search: every image's beams advance together in one (B * K, ...) tensor per step."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from capkit.models.attention.base import AttentionMemory
from capkit.types import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Generation, Hypothesis

__all__ = ["beam_search", "StepFn"]

# Columns per run of the CPU row-wise top-k (``_row_topk``)
TOPK_CHUNK = 64

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
    no_repeat_ngram_size: int = 0,
    suppress_unk: bool = False,
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
    The (B * K, V) log-probabilities are never written out: log_softmax shifts each row by one constant, so a
    hypothesis's K best words are those of its logits (``_row_topk``), and an image's K best continuations
    are the K best of its K * K candidates.

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
        no_repeat_ngram_size: n > 0: a hypothesis never repeats one of its n-grams (Hugging Face's
            ``no_repeat_ngram_size``; n = 3 is the trigram blocking of Paulus et al. 2018). It only removes
            candidates: the words still allowed keep the model's log-probabilities. 0: no constraint.
        suppress_unk: never propose ``<unk>`` (ruotianluo's ``suppress_UNK``; Hugging Face's ``suppress_tokens``).
            Decoding into text drops it, so a caption that holds it reads with a word missing ("a man holding
            a"); the model's next choice takes its place. Removed after the normaliser, as the n-gram ban is.
    """
    if not isinstance(no_repeat_ngram_size, int) or isinstance(no_repeat_ngram_size, bool):
        raise TypeError(f"no_repeat_ngram_size must be a whole number, got {no_repeat_ngram_size!r}")
    if not isinstance(suppress_unk, bool):
        raise TypeError(f"suppress_unk must be True or False, got {suppress_unk!r}")
    if beam_size < 1 or n_best < 1 or max_len < 0 or no_repeat_ngram_size < 0:
        raise ValueError(f"need beam_size >= 1, n_best >= 1, max_len >= 0, no_repeat_ngram_size >= 0; got "
                         f"{beam_size}, {n_best}, {max_len}, {no_repeat_ngram_size}")
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
    scratch: Tensor | None = None  # (B*K, V) float32 for the normaliser's exponentials, reused by every step

    for t in range(max_len + 1):
        logits, alpha, state = step(tokens, state, step_memory)
        logits = logits.float()  # (B*width, V)
        if scratch is None:
            scratch = torch.empty(batch * k, logits.shape[1], dtype=torch.float32, device=device)
        norm = _log_normaliser(logits, scratch)  # (B*width, 1): log-probabilities = logits - norm
        ban_ngrams = 0 < no_repeat_ngram_size <= t < max_len  # t words so far: an n-gram to repeat needs t >= n
        if ban_ngrams or (suppress_unk and t < max_len):
            # after the normaliser: a banned word is removed, the others keep the model's probabilities
            logits = logits.clone()
            if suppress_unk:
                logits[:, UNK_ID] = float("-inf")
            if ban_ngrams:
                logits = _ban_repeated_ngrams(logits, history, no_repeat_ngram_size)
        if t == max_len:  # the last step: every hypothesis still open takes <end>
            row_logp = logits.new_full((len(logits), k), float("-inf"))
            row_logp[:, :1] = logits[:, EOS_ID : EOS_ID + 1] - norm
            row_tokens = torch.full_like(row_logp, EOS_ID, dtype=torch.long)
        else:  # each hypothesis's K best words; <pad> and <start> (ids 0 and 1) are never generated
            row_logp, row_tokens = _row_topk(logits[:, BOS_ID + 1 :], k)
            row_logp.sub_(norm)
            row_tokens.add_(BOS_ID + 1)
        if any_finished:  # a finished hypothesis continues only with <pad>, at no cost
            ended = finished.view(-1, 1)
            row_logp.masked_fill_(ended, float("-inf"))
            row_logp[:, 0].masked_fill_(ended[:, 0], 0.0)
            row_tokens[:, 0].masked_fill_(ended[:, 0], PAD_ID)

        # the K best of the image's width * K candidates are its K best continuations over the whole vocabulary
        candidates = (row_logp.view(batch, width, k) + scores.unsqueeze(2)).view(batch, width * k)
        scores, flat_index = candidates.topk(k, dim=1)  # (B, K)
        parent = flat_index // k  # (B, K)
        new_tokens = row_tokens.view(batch, width * k).gather(1, flat_index)
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


def _ban_repeated_ngrams(logits: Tensor, history: Tensor, n: int) -> Tensor:
    """logits (R, V), with -inf written at each word that would complete an n-gram already in its
    hypothesis's words so far (history (R, t), t >= n)."""
    grams = history.unfold(1, n, 1)  # (R, t - n + 1, n): every n-gram so far
    prefix = history[:, history.shape[1] - n + 1 :]  # (R, n - 1): the words the next one would extend
    rows, at = (grams[:, :, :-1] == prefix.unsqueeze(1)).all(dim=2).nonzero(as_tuple=True)
    logits[rows, grams[rows, at, -1]] = float("-inf")
    return logits


def _log_normaliser(logits: Tensor, scratch: Tensor) -> Tensor:
    """log sum_v exp(logits[r, v]) (R, 1) for logits (R, V), the exponentials written into scratch (>= R, V)."""
    peak = logits.amax(dim=1, keepdim=True)
    exps = torch.sub(logits, peak, out=scratch[: len(logits)]).exp_()
    return exps.sum(dim=1, keepdim=True).log_().add_(peak)


def _row_topk(values: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest values (R, k) of each row of values (R, C), in descending order, and their columns (R, k),
    each a valid column; -inf (at column 0) where a row has fewer than k columns.

    ``values.topk(k)`` up to the order of ties. On the CPU, where ``topk`` reads a long row slowly, the
    maximum of each run of ``TOPK_CHUNK`` columns comes first (a vectorised ``amax``); the k largest values lie
    in the k runs of highest maximum, and ``topk`` reads only those.
    """
    rows, cols = values.shape
    m = min(k, cols)
    if values.device.type != "cpu" or cols <= TOPK_CHUNK * m:
        top, columns = values.topk(m, dim=1)
    else:
        whole = cols // TOPK_CHUNK * TOPK_CHUNK
        maxima = values[:, :whole].view(rows, -1, TOPK_CHUNK).amax(dim=2)  # (R, C // TOPK_CHUNK)
        if whole < cols:  # the last, shorter run
            maxima = torch.cat([maxima, values[:, whole:].amax(dim=1, keepdim=True)], dim=1)
        runs = maxima.topk(m, dim=1).indices  # (R, m)
        candidates = (runs.unsqueeze(2) * TOPK_CHUNK + torch.arange(TOPK_CHUNK)).view(rows, -1)  # (R, m * chunk)
        past_end = candidates >= cols  # the last run's positions past the row: -inf at the last column
        candidates.clamp_(max=cols - 1)
        top, at = values.gather(1, candidates).masked_fill_(past_end, float("-inf")).topk(m, dim=1)
        columns = candidates.gather(1, at)
    if m < k:
        top = F.pad(top, (0, k - m), value=float("-inf"))
        columns = F.pad(columns, (0, k - m))
    return top, columns


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
