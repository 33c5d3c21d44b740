"""Batched beam search in numpy: the twin of ``capkit/models/beam_search.py``, step for step, so that the
onnxruntime graphs give the captions of the PyTorch model.

Same rules: at most ``max_len`` words then ``<end>`` (taken with its real log-probability), ``<pad>`` and
``<start>`` never generated, with ``no_repeat_ngram_size`` n > 0 no word that would repeat one of the hypothesis's
n-grams and with ``suppress_unk`` no ``<unk>`` (both banned after the normaliser, so the words still allowed keep
the model's log-probabilities), a finished hypothesis kept with its score frozen (it continues with ``<pad>`` at no
cost), a beam of score -inf dead, hypotheses ranked by ``score / length ** length_penalty`` (length counts
``<end>``); the first step runs once per image, an image leaves the batch when all its beams have ended.
Everything is float32, as in torch. Ties between equal scores go to the lower index (torch leaves their order
unspecified; equal float32 scores do not occur between distinct captions in practice).

The memory is never shared between beams: after the first step every hypothesis has its own rows (torch's
``share_memory=False``), which the exported step graph expects.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["PAD_ID", "BOS_ID", "EOS_ID", "UNK_ID", "Hypothesis", "StepFn", "beam_search"]

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3  # capkit.types: every vocabulary starts <pad> <start> <end> <unk>

Arrays = dict[str, np.ndarray]
# (previous tokens (R,), state, memory) -> (logits (R, V), alpha (R, N), new state); every array batch-first
StepFn = Callable[[np.ndarray, Arrays, Arrays], tuple[np.ndarray, np.ndarray, Arrays]]


@dataclass
class Hypothesis:
    """One generated caption (``capkit.types.Hypothesis`` with numpy arrays).

    Attributes:
        tokens: word ids, without ``<start>`` and ``<end>``.
        score: total log-probability, ``<end>`` included.
        norm_score: ``score`` after the length penalty (what beams are ranked by).
        alphas: (len(tokens) + 1, N) attention weights of every step, the ``<end>`` step last.
    """

    tokens: list[int]
    score: float
    norm_score: float
    alphas: np.ndarray


def beam_search(
    step: StepFn,
    state: Arrays,
    memory: Arrays,
    *,
    beam_size: int = 3,
    max_len: int = 16,
    length_penalty: float = 0.0,
    n_best: int = 1,
    no_repeat_ngram_size: int = 0,
    suppress_unk: bool = False,
) -> list[list[Hypothesis]]:
    """For each of the B images whose ``memory`` (B, ...) and initial ``state`` (B, ...) are given, its
    ``n_best`` best hypotheses, best first."""
    if not isinstance(no_repeat_ngram_size, int) or isinstance(no_repeat_ngram_size, bool):
        raise TypeError(f"no_repeat_ngram_size must be a whole number, got {no_repeat_ngram_size!r}")
    if not isinstance(suppress_unk, bool):
        raise TypeError(f"suppress_unk must be True or False, got {suppress_unk!r}")
    if beam_size < 1 or n_best < 1 or max_len < 0 or no_repeat_ngram_size < 0:
        raise ValueError(f"need beam_size >= 1, n_best >= 1, max_len >= 0, no_repeat_ngram_size >= 0; got "
                         f"{beam_size}, {n_best}, {max_len}, {no_repeat_ngram_size}")
    n_best = min(n_best, beam_size)
    batch, k = len(next(iter(memory.values()))), beam_size
    step_memory = memory  # B rows at the first step, B * K after
    hypotheses: list[list[Hypothesis]] = [[] for _ in range(batch)]
    active = np.arange(batch)  # the input index of each image still decoding

    tokens = np.full(batch, BOS_ID, dtype=np.int64)
    width = 1  # live hypotheses per image: 1 at the first step, K after
    scores = np.zeros((batch, 1), dtype=np.float32)
    finished = np.zeros((batch, 1), dtype=bool)
    any_finished = False
    lengths = np.zeros((batch, 1), dtype=np.int64)
    history = np.empty((batch, 0), dtype=np.int64)  # (B*width, t)
    alpha_history: np.ndarray | None = None  # (B*width, t, N)

    for t in range(max_len + 1):
        logits, alpha, state = step(tokens, state, step_memory)
        logits = logits.astype(np.float32, copy=False)  # (B*width, V)
        norm = _log_normaliser(logits)  # (B*width, 1)
        ban_ngrams = 0 < no_repeat_ngram_size <= t < max_len  # t words so far: an n-gram to repeat needs t >= n
        if ban_ngrams or (suppress_unk and t < max_len):
            logits = logits.copy()
            if suppress_unk:
                logits[:, UNK_ID] = -np.inf
            if ban_ngrams:
                logits = _ban_repeated_ngrams(logits, history, no_repeat_ngram_size)
        if t == max_len:  # the last step: every hypothesis still open takes <end>
            row_logp = np.full((len(logits), k), -np.inf, dtype=np.float32)
            row_logp[:, :1] = logits[:, EOS_ID : EOS_ID + 1] - norm
            row_tokens = np.full((len(logits), k), EOS_ID, dtype=np.int64)
        else:  # each hypothesis's K best words; <pad> and <start> (ids 0 and 1) are never generated
            row_logp, row_tokens = _topk(logits[:, BOS_ID + 1 :], k)
            row_logp -= norm
            row_tokens += BOS_ID + 1
        if any_finished:  # a finished hypothesis continues only with <pad>, at no cost
            ended = finished.reshape(-1)
            row_logp[ended] = -np.inf
            row_logp[ended, 0] = 0.0
            row_tokens[ended, 0] = PAD_ID

        # the K best of the image's width * K candidates are its K best continuations over the whole vocabulary
        candidates = (row_logp.reshape(batch, width, k) + scores[:, :, None]).reshape(batch, width * k)
        scores, flat_index = _topk(candidates, k)  # (B, K)
        parent = flat_index // k
        new_tokens = np.take_along_axis(row_tokens.reshape(batch, width * k), flat_index, axis=1)
        rows = (np.arange(batch)[:, None] * width + parent).reshape(-1)  # rows of this step

        was_finished = np.take_along_axis(finished, parent, axis=1)
        lengths = np.take_along_axis(lengths, parent, axis=1) + ~was_finished
        # a beam of score -inf (fewer live candidates than beams) is dead: it counts as ended
        finished = was_finished | (new_tokens == EOS_ID) | np.isneginf(scores)
        history = np.concatenate([history[rows], new_tokens.reshape(-1, 1)], axis=1)
        step_alpha = alpha[rows][:, None]
        alpha_history = step_alpha if alpha_history is None else np.concatenate([alpha_history[rows], step_alpha], 1)
        state = {name: value[rows] for name, value in state.items()}
        tokens = new_tokens.reshape(-1)
        if t == 0:
            step_memory = {name: np.repeat(value, k, axis=0) for name, value in memory.items()}
        width = k

        any_finished = bool(finished.any())
        if not any_finished:
            continue
        image_done = finished.all(axis=1)  # (B,): every beam of the image has ended
        done = np.flatnonzero(image_done)
        if len(done) == 0:
            continue
        done_rows = _beam_rows(done, k)
        ranked = _rank(scores[done], lengths[done], history[done_rows], alpha_history[done_rows], n_best,
                       length_penalty)
        for image, best in zip(active[done].tolist(), ranked):
            hypotheses[image] = best
        if len(done) == batch:
            break
        # the finished images leave the batch, so that later steps compute only open ones
        keep = np.flatnonzero(~image_done)
        keep_rows = _beam_rows(keep, k)
        active, scores, finished, lengths = active[keep], scores[keep], finished[keep], lengths[keep]
        tokens, history, alpha_history = tokens[keep_rows], history[keep_rows], alpha_history[keep_rows]
        state = {name: value[keep_rows] for name, value in state.items()}
        step_memory = {name: value[keep_rows] for name, value in step_memory.items()}
        batch = len(keep)
    return hypotheses


def _ban_repeated_ngrams(logits: np.ndarray, history: np.ndarray, n: int) -> np.ndarray:
    """logits (R, V), with -inf written at each word that would complete an n-gram already in its
    hypothesis's words so far (history (R, t), t >= n)."""
    grams = np.lib.stride_tricks.sliding_window_view(history, n, axis=1)  # (R, t - n + 1, n)
    prefix = history[:, history.shape[1] - n + 1 :]  # (R, n - 1): the words the next one would extend
    rows, at = np.nonzero((grams[:, :, :-1] == prefix[:, None]).all(axis=2))
    logits[rows, grams[rows, at, -1]] = -np.inf
    return logits


def _log_normaliser(logits: np.ndarray) -> np.ndarray:
    """log sum_v exp(logits[r, v]) (R, 1) for logits (R, V), in float32 as torch computes it."""
    peak = logits.max(axis=1, keepdims=True)
    return np.log(np.exp(logits - peak).sum(axis=1, keepdims=True)) + peak


def _topk(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest values (R, k) of each row of values (R, C), in descending order (ties: lower column first),
    and their columns (R, k); -inf at column 0 where a row has fewer than k columns."""
    rows, cols = values.shape
    m = min(k, cols)
    if m < cols:  # the m largest, unordered, then ordered
        part = np.argpartition(-values, m - 1, axis=1)[:, :m]
    else:
        part = np.broadcast_to(np.arange(cols), (rows, cols))
    chosen = np.take_along_axis(values, part, axis=1)
    order = np.lexsort((part, -chosen), axis=1)  # by value descending, then column
    columns = np.take_along_axis(part, order, axis=1)
    top = np.take_along_axis(chosen, order, axis=1)
    if m < k:
        top = np.pad(top, ((0, 0), (0, k - m)), constant_values=-np.inf)
        columns = np.pad(columns, ((0, 0), (0, k - m)))
    return top.astype(np.float32, copy=False), columns.astype(np.int64, copy=False)


def _beam_rows(images: np.ndarray, k: int) -> np.ndarray:
    """Rows (D * K,) of the K hypotheses of each of the images (D,) in the (B * K, ...) arrays of a step."""
    return (images[:, None] * k + np.arange(k)).reshape(-1)


def _rank(
    scores: np.ndarray, lengths: np.ndarray, history: np.ndarray, alpha_history: np.ndarray, n_best: int,
    length_penalty: float,
) -> list[list[Hypothesis]]:
    """The ``n_best`` hypotheses of each of D finished images, best first: scores and lengths (D, K), token
    history (D * K, T), attention history (D * K, T, N). Hypotheses that never lived (score -inf) are left out."""
    k = scores.shape[1]
    ranked = scores / np.power(np.maximum(lengths, 1).astype(np.float32), np.float32(length_penalty))
    ranked = np.where(np.isfinite(scores), ranked, -np.inf).astype(np.float32)
    order = np.argsort(-ranked, axis=1, kind="stable")
    hypotheses = []
    for b in range(scores.shape[0]):
        best = []
        for j in order[b, :n_best].tolist():
            if not np.isfinite(scores[b, j]):
                break
            row, length = b * k + j, int(lengths[b, j])
            best.append(Hypothesis(tokens=history[row, : length - 1].tolist(), score=float(scores[b, j]),
                                   norm_score=float(ranked[b, j]), alphas=alpha_history[row, :length]))
        hypotheses.append(best)
    return hypotheses
