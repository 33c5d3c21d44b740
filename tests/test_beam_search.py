"""Batched beam search on a hand-made step function: which rows each step computes."""
from __future__ import annotations

import pytest
import torch

from capkit.models.attention.base import AttentionMemory
import capkit.models.beam_search as beam_search_module
from capkit.models.beam_search import _row_topk, beam_search
from capkit.types import EOS_ID, UNK_ID
from toys import repeats_an_ngram

VOCAB = 6
WORD = 4  # the one word the step function likes besides <end>


def eager_to_end_step(calls: list[int]):
    """A step function whose log-probabilities depend only on the image: image i's memory value is its
    preference for <end> over WORD (positive: it ends at once; negative: it never ends before max_len).
    Records the rows of every call."""

    def step(tokens, state, memory):
        calls.append(len(tokens))
        k = len(tokens) // memory.values.shape[0]
        eagerness = memory.values[:, 0, 0].repeat_interleave(k)  # (B * K,): memory shared by an image's beams
        logits = torch.full((len(tokens), VOCAB), -5.0)
        logits[:, EOS_ID] = eagerness
        logits[:, WORD] = -eagerness
        return logits, torch.ones(len(tokens), 1), {"t": state["t"] + 1}

    return step


def search(eagerness: list[float], calls: list[int], max_len: int = 5, beam_size: int = 2, share_memory=True):
    memory = AttentionMemory(values=torch.tensor(eagerness).view(-1, 1, 1), keys=None, grid=(1, 1))
    state = {"t": torch.zeros(len(eagerness))}
    return beam_search(
        eager_to_end_step(calls), state, memory, beam_size=beam_size, max_len=max_len, n_best=2,
        share_memory=share_memory,
    )


def test_an_image_whose_beams_have_all_ended_leaves_the_batch():
    calls: list[int] = []
    generation = search([4.0, -4.0, 4.0], calls)
    # Step 0: 3 images, 1 row each. Step 1: 2 beams each; after it, images 0 and 2 have both beams ended
    # (<end>, and WORD <end>), so steps 2..5 compute image 1's 2 rows only.
    assert calls == [3, 6, 2, 2, 2, 2]
    assert [h.tokens for h in generation.hypotheses[0]] == [[], [WORD]]
    assert generation.hypotheses[2][0].tokens == [] and generation.hypotheses[2][1].tokens == [WORD]
    longest = [h for h in generation.hypotheses[1] if h.tokens == [WORD] * 5]  # <end> forced after max_len words
    assert len(longest) == 1 and longest[0].alphas.shape == (6, 1)


@pytest.mark.parametrize("order", [[0, 1, 2], [1, 0, 2], [2, 1, 0]])
def test_results_stay_with_their_image_whatever_the_finishing_order(order):
    eagerness = [[4.0, -4.0, 0.5][i] for i in order]
    batched = search(eagerness, [])
    for i, value in enumerate(eagerness):
        alone = search([value], [])
        assert [h.tokens for h in batched.hypotheses[i]] == [h.tokens for h in alone.hypotheses[0]]
        assert [h.score for h in batched.hypotheses[i]] == pytest.approx([h.score for h in alone.hypotheses[0]])


def test_max_len_zero_gives_each_image_the_empty_caption():
    generation = search([4.0, -4.0, 0.5], [], max_len=0, beam_size=3)
    for hypotheses, eagerness in zip(generation.hypotheses, [4.0, -4.0, 0.5]):
        logits = torch.tensor([-5.0, -5.0, eagerness, -5.0, -eagerness, -5.0])  # the model's real log-probability
        assert [h.tokens for h in hypotheses] == [[]]
        assert hypotheses[0].score == pytest.approx(float(logits.log_softmax(0)[EOS_ID]), abs=1e-6)


@pytest.mark.parametrize("share_memory", [True, False])
def test_more_beams_than_words_leave_no_image_without_captions(share_memory):
    """4 generable tokens (<end> and 3 words) for 6 beams: the surplus beams are dead from the first step and
    count as ended, so each image still gets its best hypotheses and leaves the batch once its live ones end."""
    calls: list[int] = []
    generation = search([4.0, -4.0], calls, max_len=3, beam_size=6, share_memory=share_memory)
    for i, value in enumerate([4.0, -4.0]):
        alone = search([value], [], max_len=3, beam_size=6, share_memory=share_memory)
        assert [h.tokens for h in generation.hypotheses[i]] == [h.tokens for h in alone.hypotheses[0]]
        assert len(generation.hypotheses[i]) == 2
    assert calls[-1] == 6  # image 0 left the batch before the last step


def test_search_under_a_float64_default_dtype():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        generation = search([4.0, -4.0], [], max_len=2)
    finally:
        torch.set_default_dtype(previous)
    assert generation.hypotheses[0][0].tokens == []


@pytest.mark.parametrize("cols", [1, 2, 64, 192, 193, 300, 640, 1000])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_row_topk_equals_topk(cols, k):
    """Rows of 193+ columns take the chunked path at k = 3 (64-column runs, a last run of 1 at 193)."""
    values = torch.randn(7, cols, generator=torch.Generator().manual_seed(cols))
    values[0] = float("-inf")  # a row with no candidate at all
    values[1, 1:] = float("-inf")  # a row with one candidate
    values[2, :-1] = float("-inf")  # one candidate, in the last (shorter) run
    top, columns = _row_topk(values, k)
    m = min(k, cols)
    assert top.shape == columns.shape == (7, k)
    assert torch.equal(top[:, :m], values.topk(m, dim=1).values)  # the m largest, in descending order
    assert ((columns >= 0) & (columns < cols)).all()  # dead candidates too: beam search feeds them to the model
    finite = top.isfinite()
    assert torch.equal(values.gather(1, columns)[finite], top[finite])  # and the columns that hold them
    assert all(len(set(row[keep].tolist())) == int(keep.sum()) for row, keep in zip(columns, finite))  # distinct
    assert (top[:, m:] == float("-inf")).all() and (columns[:, m:] == 0).all()  # padding past the row's width


def test_chunked_and_plain_row_topk_give_the_same_search(monkeypatch):
    """Beam search over 1,000 words: the CPU's chunked row top-k (_row_topk) and torch.topk agree."""
    vocab = 1000
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)) * 3  # next-word logits per word

    def step(tokens, state, memory):
        return table[tokens] + memory.values[:, 0, :1].repeat_interleave(len(tokens) // memory.values.shape[0], 0), \
            torch.ones(len(tokens), 1), state

    def run():
        memory = AttentionMemory(values=torch.randn(4, 1, 1, generator=torch.Generator().manual_seed(1)),
                                 keys=None, grid=(1, 1))
        return beam_search(step, {}, memory, beam_size=5, max_len=6, n_best=5, share_memory=True)

    chunked = run()
    monkeypatch.setattr(beam_search_module, "TOPK_CHUNK", vocab)  # every row is "short": plain topk
    plain = run()
    for a, b in zip(chunked.hypotheses, plain.hypotheses):
        assert [h.tokens for h in a] == [h.tokens for h in b]
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-5)
        assert len(a) == 5


# ------------------------------------------------------------------------------------------ no_repeat_ngram_size
# Next-word logits by previous word over <pad> <start> <end> <unk> 4 5 6 7: greedy decoding loops 4 5 4 5 ...
NEXT_WORD = torch.tensor([
    [0.0, 0.0, -2.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # <pad> (unused)
    [0.0, 0.0, -2.0, 0.0, 3.0, 1.0, 0.5, 0.0],  # <start>: 4
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # <end> (unused)
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # <unk> (unused)
    [0.0, 0.0, -2.0, 0.0, 0.0, 3.0, 2.0, 1.0],  # 4: 5, then 6, then 7
    [0.0, 0.0, -2.0, 0.0, 3.0, 0.0, 1.0, 2.0],  # 5: 4, then 7, then 6
    [0.0, 0.0, 1.0, 0.0, 3.0, 2.0, 0.0, 0.0],  # 6: 4, then 5
    [0.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0, 1.0],  # 7: <end>
])


def word_table_search(ngram: int, beam_size: int = 1, max_len: int = 6):
    def step(tokens, state, memory):
        return NEXT_WORD[tokens], torch.ones(len(tokens), 1), state

    memory = AttentionMemory(values=torch.zeros(1, 1, 1), keys=None, grid=(1, 1))
    return beam_search(step, {}, memory, beam_size=beam_size, max_len=max_len, n_best=beam_size,
                       no_repeat_ngram_size=ngram).hypotheses[0]


@pytest.mark.parametrize("ngram, caption", [
    (0, [4, 5, 4, 5, 4, 5]),  # no constraint: the loop, until <end> is forced after max_len words
    (3, [4, 5, 4, 5, 7]),  # 4 5 4 is there, so 5 4 5 may follow, but not 4 5 4 again: 7, then <end>
    (2, [4, 5, 4, 6, 4, 7]),  # 4 5 is there: 4 6; then 4 5 and 4 6 are: 4 7
    (1, [4, 5, 7]),  # no word twice
])
def test_no_repeat_ngram_size_bans_each_repeated_ngram_and_nothing_else(ngram, caption):
    best = word_table_search(ngram)[0]
    assert best.tokens == caption
    # the words still allowed keep the model's log-probabilities: the score is their sum, <end> included
    previous = [1, *caption]
    logp = NEXT_WORD.log_softmax(dim=1)
    assert best.score == pytest.approx(sum(float(logp[p, w]) for p, w in zip(previous, [*caption, EOS_ID])))


def test_no_repeat_ngram_size_holds_for_every_beam_of_every_image():
    """Beams are reordered at every step and images leave the batch as they end: each beam keeps its own words'
    n-grams (a random next-word table over 12 words, where captions repeat without the constraint; each image
    has its own eagerness to end, so that some end early and others run to max_len)."""
    table = torch.randn(16, 16, generator=torch.Generator().manual_seed(0)) * 2
    table[:, EOS_ID] = 0.0

    def step(tokens, state, memory):
        k = len(tokens) // memory.values.shape[0]
        return table[tokens] + memory.values[:, 0].repeat_interleave(k, 0), torch.ones(len(tokens), 1), state

    values = torch.randn(6, 1, 16, generator=torch.Generator().manual_seed(1))
    values[:, 0, EOS_ID] = torch.linspace(-4.0, 3.0, 6)
    memory = AttentionMemory(values=values, keys=None, grid=(1, 1))
    for ngram in (0, 2, 3):
        generation = beam_search(step, {}, memory, beam_size=4, max_len=12, n_best=4, no_repeat_ngram_size=ngram)
        hypotheses = [h for hyps in generation.hypotheses for h in hyps]
        assert len(hypotheses) == 24
        lengths = {len(hyps[0].tokens) for hyps in generation.hypotheses}
        assert any(0 < n < 12 for n in lengths) and max(lengths) == 12  # images end at different steps
        repeating = [h.tokens for h in hypotheses if repeats_an_ngram(h.tokens, ngram or 2)]
        assert (len(repeating) > 0) if ngram == 0 else repeating == []


def test_no_repeat_ngram_size_below_zero_or_not_whole_is_refused():
    with pytest.raises(ValueError, match="no_repeat_ngram_size >= 0"):
        word_table_search(-1)
    for bad in (True, 2.0):
        with pytest.raises(TypeError, match="no_repeat_ngram_size must be a whole number"):
            word_table_search(bad)


# ------------------------------------------------------------------------------------------ suppress_unk
# Next-word logits by previous word over <pad> <start> <end> <unk> 4 5: after 4 the model's first choice is <unk>
UNK_AFTER_4 = torch.tensor([
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # <pad> (unused)
    [0.0, 0.0, -2.0, 0.0, 3.0, 0.0],  # <start>: 4
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # <end> (unused)
    [0.0, 0.0, 3.0, 0.0, 0.0, 0.0],  # <unk>: <end>
    [0.0, 0.0, -1.0, 3.0, -1.0, 1.5],  # 4: <unk>, then 5
    [0.0, 0.0, 3.0, 0.0, 0.0, 0.0],  # 5: <end>
])


@pytest.mark.parametrize("suppress_unk, caption", [(False, [4, UNK_ID]), (True, [4, 5])])
def test_suppress_unk_takes_the_models_next_choice_with_its_own_probability(suppress_unk, caption):
    def step(tokens, state, memory):
        return UNK_AFTER_4[tokens], torch.ones(len(tokens), 1), state

    memory = AttentionMemory(values=torch.zeros(1, 1, 1), keys=None, grid=(1, 1))
    best = beam_search(step, {}, memory, beam_size=2, max_len=6, suppress_unk=suppress_unk).hypotheses[0][0]
    assert best.tokens == caption
    # removed after the normaliser: the score is the model's log-probabilities over the whole vocabulary
    logp = UNK_AFTER_4.log_softmax(dim=1)
    previous = [1, *caption]
    assert best.score == pytest.approx(sum(float(logp[p, w]) for p, w in zip(previous, [*caption, EOS_ID])))


def test_suppress_unk_holds_for_every_beam_of_every_image_with_the_ngram_ban():
    table = torch.randn(16, 16, generator=torch.Generator().manual_seed(0)) * 2
    table[:, UNK_ID] += 2.5  # <unk> often among the best words

    def step(tokens, state, memory):
        k = len(tokens) // memory.values.shape[0]
        return table[tokens] + memory.values[:, 0].repeat_interleave(k, 0), torch.ones(len(tokens), 1), state

    memory = AttentionMemory(values=torch.randn(6, 1, 16, generator=torch.Generator().manual_seed(1)), keys=None,
                             grid=(1, 1))
    for ngram in (0, 3):
        found = {suppress: [h.tokens for hyps in beam_search(step, {}, memory, beam_size=4, max_len=10, n_best=4,
                                                             no_repeat_ngram_size=ngram,
                                                             suppress_unk=suppress).hypotheses for h in hyps]
                 for suppress in (False, True)}
        assert len(found[True]) == 24 and any(UNK_ID in tokens for tokens in found[False])
        assert not any(UNK_ID in tokens for tokens in found[True])
        assert not any(ngram and repeats_an_ngram(tokens, ngram) for tokens in found[True])


def test_suppress_unk_must_be_a_bool():
    memory = AttentionMemory(values=torch.zeros(1, 1, 1), keys=None, grid=(1, 1))
    for bad in (1, "true", None):
        with pytest.raises(TypeError, match="suppress_unk must be True or False"):
            beam_search(lambda *a: None, {}, memory, suppress_unk=bad)
