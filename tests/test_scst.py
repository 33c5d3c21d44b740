"""Self-critical sequence training: sampling, the CIDEr-D reward, the loss, the criterion and the CLI stage."""
from __future__ import annotations

import json
import math

import pytest
import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from torch.utils.data import DataLoader

from capkit.cli import train as train_cli
from capkit.engine import (
    CrossEntropyCriterion,
    SelfCriticalCriterion,
    Trainer,
    build_optimizer,
    build_train_sampler,
    load_checkpoint,
    load_optimizer_moments,
    self_critical_loss,
)
from capkit.evaluation import CiderD, SentenceBleu, build_reward
from capkit.types import BOS_ID, EOS_ID, PAD_ID, CaptionBatch, EncoderOutput, SampledCaptions
from toys import TINY_SHAPES_CONFIG, ToyData, tiny_model

GRID = (2, 2)


def features(n: int, seed: int = 0) -> EncoderOutput:
    return EncoderOutput(torch.randn(n, 4, 256, generator=torch.Generator().manual_seed(seed)), GRID)


def test_samples_follow_the_search_rules():
    torch.manual_seed(0)
    model = tiny_model().eval()
    samples = model(features=features(6), num_samples=4, max_len=3)
    tokens = samples.tokens
    assert tokens.shape[0] == 24 and tokens.shape[1] <= 4 and samples.log_probs.shape == tokens.shape
    for row in tokens.tolist():
        end = row.index(EOS_ID)  # every sample ends, within max_len words
        assert end <= 3 and all(t == PAD_ID for t in row[end + 1 :])
        assert all(t not in (PAD_ID, BOS_ID, EOS_ID) for t in row[:end])
    assert samples.mask.sum().item() == sum(row.index(EOS_ID) + 1 for row in tokens.tolist())
    assert samples.words() == [row[: row.index(EOS_ID)] for row in tokens.tolist()]


def test_sampled_log_probs_are_the_teacher_forced_ones_under_the_same_rules():
    """Drawn tokens' log-probabilities = teacher forcing on the drawn caption, with <pad> and <start> banned
    (renormalised), and 0 for the <end> forced after max_len words."""
    torch.manual_seed(1)
    model = tiny_model().eval()  # no dropout: both passes see the same function
    max_len, s = 4, 3
    enc = features(5)
    samples = model(features=enc, num_samples=s, max_len=max_len)
    captions = torch.cat([torch.full((len(samples.tokens), 1), BOS_ID), samples.tokens], dim=1)
    repeated = EncoderOutput(enc.feats.repeat_interleave(s, dim=0), GRID)
    logits = model(captions, features=repeated).logits  # (B * S, T, V)
    logits[..., [PAD_ID, BOS_ID]] = float("-inf")
    expected = logits.log_softmax(-1).gather(2, samples.tokens.unsqueeze(2)).squeeze(2)
    expected = expected.masked_fill(~samples.mask, 0.0)
    if samples.tokens.shape[1] == max_len + 1:
        forced = samples.tokens[:, max_len] == EOS_ID
        assert forced.any()  # this seed reaches the limit, so the forced <end> is exercised
        assert torch.equal(samples.log_probs[forced, max_len], torch.zeros(int(forced.sum())))
        expected[:, max_len] = samples.log_probs[:, max_len]
    torch.testing.assert_close(samples.log_probs, expected, rtol=1e-5, atol=1e-5)
    assert samples.log_probs.requires_grad


def test_sampling_draws_from_the_given_generator():
    model = tiny_model().eval()
    draw = lambda seed: model.decoder.sample(  # noqa: E731
        features(3), num_samples=2, max_len=5, generator=torch.Generator().manual_seed(seed)
    ).tokens
    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))


CORPUS = {
    "a": ["a dog runs on the grass", "a brown dog is running", "the dog runs fast"],
    "b": ["a cat sits on a mat", "a cat is sitting", "the cat sits on the red mat"],
    "c": ["two men ride bikes", "men are riding bicycles on a road", "two people cycle on the road"],
}


def test_cider_d_is_pycocoevalcaps_when_the_corpus_is_the_scored_set():
    ids = ["a", "b", "c", "a", "b"]
    candidates = ["a dog runs on grass", "a cat on the mat", "two men riding bikes on a road", "a cat", "dog"]
    ours = CiderD(CORPUS)(ids, candidates)
    for image_id, candidate, score in zip(ids, candidates, ours):  # pycocoevalcap scores one set per call
        gts = {k: v for k, v in CORPUS.items()}
        res = {k: [candidate if k == image_id else v[0]] for k, v in CORPUS.items()}
        _, expected = Cider().compute_score(gts, res)
        assert score == pytest.approx(expected[list(CORPUS).index(image_id)], rel=1e-12, abs=1e-12)
    assert min(ours[:3]) > 1.0
    assert ours[3] == ours[4] == 0.0  # "a" is in every image's references (idf 0); "cat", "dog" not in these


def test_cider_d_known_answer_with_corpus_document_frequencies():
    """A candidate equal to the only reference: cosine 1 for the 1-, 2- and 3-grams, no 4-grams, no length
    penalty, so (1 + 1 + 1 + 0) / 4 * 10 = 7.5; a word in every image's references has idf 0."""
    cider = CiderD({"x": ["a dog runs"], "y": ["a cat sits"]})
    assert cider(["x", "y", "x"], ["a dog runs", "a", "a"]) == [pytest.approx(7.5, abs=1e-12), 0.0, 0.0]
    with pytest.raises(KeyError, match=r"no references for the images \['z'\]"):
        cider(["z"], ["a dog"])


def test_sentence_bleu_is_pycocoevalcaps_per_image_bleu4():
    ids = ["a", "b", "c", "a"]
    candidates = ["a dog runs on the grass", "a cat is sitting on a mat", "two men ride", "a brown dog is running"]
    ours = SentenceBleu(CORPUS)(ids, candidates)
    for image_id, candidate, score in zip(ids, candidates, ours):
        _, per_image = Bleu(4).compute_score({image_id: CORPUS[image_id]}, {image_id: [candidate]}, verbose=0)
        assert score == pytest.approx(per_image[3][0], rel=1e-12)
    assert ours[0] == pytest.approx(1.0, abs=1e-8)  # a reference itself
    assert ours[2] < 0.05 < ours[3]  # 3 words: no 4-gram to match
    with pytest.raises(KeyError, match=r"SentenceBleu has no references for the images \['z'\]"):
        SentenceBleu(CORPUS)(["z"], ["a dog"])


def test_build_reward_sums_the_weighted_rewards_and_names_the_choices():
    ids, candidates = ["a", "b"], ["a dog runs fast", "a cat sits on the mat"]
    mixed = build_reward({"cider": 1.0, "bleu4": 2.0}, CORPUS)(ids, candidates)
    cider, bleu = CiderD(CORPUS)(ids, candidates), SentenceBleu(CORPUS)(ids, candidates)
    assert mixed == pytest.approx([c + 2 * b for c, b in zip(cider, bleu)], rel=1e-12)
    with pytest.raises(ValueError, match=r"names come from cider, bleu4 .* \(unknown: spice\)"):
        build_reward({"spice": 1.0}, CORPUS)
    with pytest.raises(ValueError, match="at least one weight is non-zero"):
        build_reward({"cider": 0.0}, CORPUS)


def test_self_critical_loss_uses_the_other_samples_mean_as_baseline():
    tokens = torch.tensor([[5, EOS_ID], [EOS_ID, PAD_ID], [6, EOS_ID], [7, EOS_ID]])  # 2 images x 2 samples
    log_probs = torch.tensor([[-1.0, -2.0], [-0.5, 0.0], [-1.5, -1.0], [-0.2, -0.3]], requires_grad=True)
    loss, advantage = self_critical_loss(SampledCaptions(tokens, log_probs, 2), torch.tensor([1.0, 0.0, 2.0, 2.0]))
    assert advantage.tolist() == [1.0, -1.0, 0.0, 0.0]  # r - mean of the image's other samples
    assert loss.item() == pytest.approx(-(1.0 * -3.0 + -1.0 * -0.5) / 7)  # 7 drawn tokens
    loss.backward()
    assert torch.allclose(log_probs.grad, torch.tensor([[-1, -1], [1, 0], [0, 0], [0, 0]]) / 7.0)
    with pytest.raises(ValueError, match="num_samples >= 2"):
        self_critical_loss(SampledCaptions(tokens, log_probs, 1), torch.zeros(4))


def test_a_given_baseline_replaces_the_other_samples_mean():
    """The greedy baseline: one reward per image, subtracted from each of its samples; one sample suffices."""
    tokens = torch.tensor([[5, EOS_ID], [EOS_ID, PAD_ID], [6, EOS_ID], [7, EOS_ID]])  # 2 images x 2 samples
    log_probs = torch.tensor([[-1.0, -2.0], [-0.5, 0.0], [-1.5, -1.0], [-0.2, -0.3]], requires_grad=True)
    samples = SampledCaptions(tokens, log_probs, 2)
    loss, advantage = self_critical_loss(samples, torch.tensor([1.0, 0.0, 2.0, 2.0]), torch.tensor([0.5, 3.0]))
    assert advantage.tolist() == [0.5, -0.5, -1.0, -1.0]
    assert loss.item() == pytest.approx(-(0.5 * -3.0 - 0.5 * -0.5 - 1.0 * -2.5 - 1.0 * -0.5) / 7)
    one = SampledCaptions(tokens[:2], log_probs[:2], 1)
    _, advantage = self_critical_loss(one, torch.tensor([1.0, 0.0]), torch.tensor([0.25, 0.5]))
    assert advantage.tolist() == [0.75, -0.5]


class RecordingReward:
    """A caption's length as its reward; records each call's image ids and captions."""

    def __init__(self):
        self.calls: list[tuple[list[str], list[list[int]]]] = []

    def __call__(self, ids, words):
        self.calls.append((list(ids), [list(w) for w in words]))
        return [float(len(w)) for w in words]


def three_images(seed: int):
    """A tiny model in training mode, and a per-image batch of 3 images with their features."""
    torch.manual_seed(seed)
    enc = features(3)
    return tiny_model().train(), enc, CaptionBatch(["x", "y", "z"], features=enc, references=[["r"]] * 3)


def test_the_greedy_baseline_is_the_reward_of_the_dropout_free_greedy_caption():
    model, enc, batch = three_images(seed=0)
    reward = RecordingReward()
    SelfCriticalCriterion(reward, num_samples=2, max_len=5, baseline="greedy")(model, batch)
    assert model.training  # back in training mode after the greedy decoding
    assert reward.calls[1][0] == ["x", "y", "z"]  # the candidates first, then one greedy caption per image
    greedy = model.eval().generate(features=enc, beam_size=1, max_len=5).tokens
    assert reward.calls[1][1] == [[t for t in g if t != EOS_ID] for g in greedy]
    with pytest.raises(ValueError, match="choose one of mean, greedy"):
        SelfCriticalCriterion(reward, baseline="best")


def test_beam_candidates_are_the_beam_searchs_n_best_with_teacher_forced_log_probs():
    model, enc, batch = three_images(seed=3)
    reward = RecordingReward()
    criterion = SelfCriticalCriterion(reward, num_samples=3, max_len=5, candidates="beam")
    loss, parts = criterion(model, batch)
    assert model.training and loss.requires_grad
    model.eval()
    hypotheses = model.generate(features=enc, beam_size=3, n_best=3, max_len=5).hypotheses
    assert reward.calls[0][1] == [h.tokens for hyps in hypotheses for h in hyps]  # image-major, best first
    candidates = criterion._beam_captions(model, batch)  # eval mode now: the log-probs are the search's scores
    torch.testing.assert_close(
        candidates.log_probs.sum(dim=1), torch.tensor([h.score for hyps in hypotheses for h in hyps]),
        rtol=1e-4, atol=1e-4,
    )
    with pytest.raises(ValueError, match="choose one of sample, beam"):
        SelfCriticalCriterion(reward, candidates="top")


def test_beam_candidates_run_the_encoders_trainable_stage_once_per_image(monkeypatch):
    """Over a cached trunk, the fine-tuned last stage runs on the B images, not on the B * S candidates, and
    the candidates' teacher-forced log-probabilities are those of the repeated finished features."""
    torch.manual_seed(4)
    model = tiny_model(finetune="last").eval()  # eval: both passes see the same function (no dropout, BN stats)
    with torch.no_grad():
        trunk = model.encoder.forward_frozen(torch.randn(3, 3, 64, 64))
    batch = CaptionBatch(["x", "y", "z"], features=trunk, references=[["r"]] * 3)
    finish, rows = model.encoder.finish, []
    monkeypatch.setattr(model.encoder, "finish", lambda f: rows.append(f.feats.shape[0]) or finish(f))
    candidates = SelfCriticalCriterion(RecordingReward(), num_samples=4, max_len=5)._beam_captions(model, batch)
    assert rows == [3, 3]  # the beam search's pass, then the teacher-forced pass with gradients
    candidates.log_probs.sum().backward()
    assert all(p.grad is not None for p in model.encoder.parameters() if p.requires_grad)
    finished = finish(trunk)
    repeated = finished.with_feats(finished.feats.repeat_interleave(4, dim=0))
    captions = torch.cat([torch.full((12, 1), BOS_ID), candidates.tokens], dim=1)
    logits = model(captions, features=repeated).logits
    expected = logits.log_softmax(-1).gather(2, candidates.tokens.unsqueeze(2)).squeeze(2)
    torch.testing.assert_close(candidates.log_probs, expected.masked_fill(candidates.tokens == PAD_ID, 0.0))
    with pytest.raises(ValueError, match="12 captions for 3 images at captions_per_image=3"):
        model(captions, features=trunk, captions_per_image=3)
    with pytest.raises(ValueError, match="captions_per_image=2: a whole number of at least 1, with captions="):
        model(features=trunk, num_samples=2, captions_per_image=2)


def test_the_sampling_temperature_sharpens_or_flattens_the_drawn_distribution():
    """At temperature T the log-probabilities are those of softmax(logits / T): a low T draws the argmax."""
    torch.manual_seed(2)
    model = tiny_model().eval()
    enc = features(4)
    cold = model.decoder.sample(enc, num_samples=3, max_len=4, temperature=1e-4)
    greedy = model.generate(features=enc, beam_size=1, max_len=4).tokens
    assert [w for i, w in enumerate(cold.words()) if i % 3 == 0] == [[t for t in g if t != EOS_ID] for g in greedy]
    assert torch.allclose(cold.log_probs, torch.zeros_like(cold.log_probs), atol=1e-4)
    hot = model.decoder.sample(
        enc, num_samples=3, max_len=4, temperature=2.0, generator=torch.Generator().manual_seed(0)
    )
    first = hot.tokens[:, 0]
    memory = model.decoder.prepare(EncoderOutput(enc.feats.repeat_interleave(3, dim=0), GRID))
    logits, _, _ = model.decoder.step(torch.full((12,), BOS_ID), model.decoder.init_state(memory), memory)
    logits[:, [PAD_ID, BOS_ID]] = float("-inf")
    expected = (logits / 2.0).log_softmax(-1).gather(1, first.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(hot.log_probs[:, 0], expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="temperature > 0"):
        model.decoder.sample(enc, num_samples=2, temperature=0.0)


class ImageBatches(ToyData):
    """ToyData as per-image batches with references (what the self-critical criterion trains on)."""

    def collate(self, items) -> CaptionBatch:
        ids, xs, _ = zip(*items)
        return CaptionBatch(list(ids), features=EncoderOutput(torch.stack(xs), GRID), references=[["r"]] * len(ids))


def mean_reward_of_word(model, word: int, n: int = 64) -> float:
    with torch.no_grad():
        samples = model(features=features(n, seed=5), num_samples=4, max_len=6)
    return sum(word in ws for ws in samples.words()) / len(samples.words())


@pytest.mark.parametrize("candidates", ["sample", "beam"])
def test_self_critical_training_raises_the_reward(candidates):
    """Rewarding the captions that contain word 7 makes the model draw it more often."""
    torch.manual_seed(0)
    model = tiny_model()
    data = ImageBatches(32)
    loader = DataLoader(data, batch_size=8, sampler=build_train_sampler(data, seed=0), collate_fn=data.collate)
    reward = lambda ids, words: [float(7 in ws) for ws in words]  # noqa: E731
    trainer = Trainer(
        model, build_optimizer(model, lr=1e-2), loader, epochs=6, device="cpu",
        criterion=SelfCriticalCriterion(reward, num_samples=4, max_len=6, candidates=candidates),
    )
    before = mean_reward_of_word(model.eval(), 7)
    trainer.fit()
    after = mean_reward_of_word(model.eval(), 7)
    assert after > before + 0.3, (before, after)
    assert set(trainer.loss_parts) == {"scst", "reward"}


def test_criteria_name_the_loader_they_need():
    model = tiny_model()
    per_image = ImageBatches(4).collate([ImageBatches(4)[i] for i in range(4)])
    with pytest.raises(ValueError, match="per_image=False"):
        CrossEntropyCriterion()(model, per_image)
    captions = ToyData(4).collate([ToyData(4)[i] for i in range(4)])
    scst = SelfCriticalCriterion(lambda ids, words: [0.0] * len(words), num_samples=2)
    with pytest.raises(ValueError, match="per_image=True"):
        scst(model, captions)
    with pytest.raises(ValueError, match="num_samples >= 2"):
        SelfCriticalCriterion(lambda ids, words: [], num_samples=1)
    SelfCriticalCriterion(lambda ids, words: [], num_samples=1, baseline="greedy")  # one sample suffices


def test_cli_self_critical_stage_starts_from_a_cross_entropy_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CAPKIT_CACHE", str(tmp_path / "cache"))
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_SHAPES_CONFIG)
    monkeypatch.chdir(tmp_path)  # runs/ lands here
    assert train_cli.main([str(config), "train.run_name=xent"]) == 0
    best = tmp_path / "runs" / "xent" / "checkpoints" / "best"
    assert train_cli.main([
        str(config), "train.run_name=scst", "train.objective=scst", f"train.init_from={best}", "train.scst_samples=3",
        "train.lr=1e-4", "train.batch_size=2", "train.epochs=2",  # 12 steps: the log's every 10th is written
    ]) == 0
    scst_run, xent_run = tmp_path / "runs" / "scst", tmp_path / "runs" / "xent"
    assert json.loads((scst_run / "vocab.json").read_text()) == json.loads((xent_run / "vocab.json").read_text())
    steps = [json.loads(line) for line in (scst_run / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert steps and all(math.isfinite(s["loss/scst"]) and s["loss/reward"] >= 0.0 for s in steps)

    capsys.readouterr()
    wrong = [str(config), "train.objective=scst", f"train.init_from={best}", "model.decoder.hidden_dim=32"]
    assert train_cli.main(wrong) == 2
    assert f"train.init_from={best}: its weights do not fit" in capsys.readouterr().err
    assert train_cli.main([str(config), "train.objective=rl"]) == 2
    assert "train.objective is 'rl'; choose one of xent, scst" in capsys.readouterr().err
    assert train_cli.main([str(config), "train.objective=scst", "train.scst_reward={spice: 1.0}"]) == 2
    assert "train.scst_reward: reward weights {'cider': 1.0, 'spice': 1.0}: names come from cider, bleu4" in (
        capsys.readouterr().err
    )
    scst = [str(config), "train.objective=scst", f"train.init_from={best}"]
    assert train_cli.main([*scst, "train.scst_samples=1"]) == 2
    err = capsys.readouterr().err
    assert "train.scst_samples: the mean baseline averages the other samples of an image, so it needs at least 2" in err
    assert train_cli.main([*scst, "train.scst_baseline=best"]) == 2
    assert "train.scst_baseline is 'best'; choose one of mean, greedy" in capsys.readouterr().err
    assert train_cli.main([*scst, "train.scst_temperature=0"]) == 2
    assert "train.scst_temperature" in capsys.readouterr().err
    assert train_cli.main([*scst, "train.scst_baseline=greedy", "train.scst_samples=1"]) == 2
    assert "train.scst_samples: a beam of 1 is the greedy caption" in capsys.readouterr().err
    assert train_cli.main([*scst, "train.scst_temperature=0.5"]) == 2
    assert ("train.scst_temperature=0.5 applies to sampled captions, and train.scst_candidates is beam; set "
            "train.scst_candidates=sample") in capsys.readouterr().err
    greedy = [*scst, "train.scst_baseline=greedy", "train.scst_samples=1", "train.scst_temperature=0.5",
              "train.scst_candidates=sample",
              "train.run_name=greedy", "train.batch_size=2", "train.epochs=2", "train.init_moments=false"]
    assert train_cli.main(greedy) == 0
    steps = [json.loads(line) for line in (tmp_path / "runs" / "greedy" / "metrics.jsonl").read_text().splitlines()]
    assert any(math.isfinite(s.get("loss/scst", math.nan)) for s in steps)

    def adam_steps(run: str) -> float:
        state = load_checkpoint(tmp_path / "runs" / run / "checkpoints" / "last")["optimizer"]["state"]
        return float(next(iter(state.values()))["step"])

    # the carried moments continue the cross-entropy run's count; fresh ones count this run's 12 steps alone
    assert adam_steps("scst") == adam_steps("xent") + 12 and adam_steps("greedy") == 12


def test_optimizer_moments_continue_with_this_runs_learning_rate():
    model = tiny_model()
    first = build_optimizer(model, lr=1e-2)
    model(ToyData(4).captions, features=features(4)).logits.square().mean().backward()
    first.step()
    second = build_optimizer(model, lr=5e-5)
    assert load_optimizer_moments(second, first.state_dict())
    assert second.param_groups[0]["lr"] == 5e-5 and "initial_lr" not in second.param_groups[0]
    for p in model.parameters():
        if p.requires_grad:
            assert torch.equal(second.state[p]["exp_avg_sq"], first.state[p]["exp_avg_sq"])
    other = build_optimizer(tiny_model("all"), lr=5e-5)  # an encoder group too: the groups differ
    assert not load_optimizer_moments(other, first.state_dict()) and not other.state


def test_the_reward_counts_end_so_a_caption_cut_off_mid_phrase_scores_lower():
    """With ``<end>`` a word of every caption (the default), "a dog in a" no longer shares "in a"'s n-grams with
    a reference that ends "... in a park" for free: its reward falls further below a complete caption's, and it is
    the CIDEr-D of the strings with " <end>" appended (which is pycocoevalcap's, see above)."""
    from omegaconf import OmegaConf

    from capkit.config import ExperimentConfig
    from capkit.data import Vocabulary
    from capkit.data.records import ImageRecord
    from capkit.recipes.train import build_criterion

    refs = ["a dog runs in a park", "a brown dog runs in a park", "a dog plays in a park"]
    records = [ImageRecord("x", refs), ImageRecord("y", ["a cat sits on a mat"] * 3)]
    vocab = Vocabulary(["a", "dog", "runs", "in", "park", "brown", "plays", "cat", "sits", "on", "mat"])
    cut, whole = [vocab.encode("a dog runs in a")[1:-1], vocab.encode("a dog runs in a park")[1:-1]]
    scored = {}
    for end in (True, False):
        cfg = OmegaConf.merge(OmegaConf.structured(ExperimentConfig),
                              {"train": {"objective": "scst", "scst_end_token": end}})
        reward = build_criterion(cfg, records, vocab).reward
        scored[end] = reward(["x", "x"], [cut, whole])
    suffix = " <end>"
    corpus = {i: [r + suffix for r in r_.captions] for i, r_ in (("x", records[0]), ("y", records[1]))}
    expected = CiderD(corpus)(["x"], ["a dog runs in a" + suffix])[0]
    assert scored[True][0] == pytest.approx(expected, abs=1e-9)
    assert scored[True][0] / scored[True][1] < scored[False][0] / scored[False][1]
