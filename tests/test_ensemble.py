"""Ensembles: two copies of one model decode exactly as the model alone, models of different decoders over one
encoder decode together, and models that cannot be ensembled are one clear error."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import capkit
from capkit.cli import caption as caption_cli
from capkit.data import Vocabulary, load_split
from capkit.errors import ConfigError
from capkit.models.ensemble import CaptionerEnsemble
from capkit.pretrained import EnsembleCaptioner, TrainedCaptioner

SHAPES_TEST = {"name": "shapes", "num_train": 12, "num_val": 4, "num_test": 12, "image_size": 64}
TRANSFORMER = {"name": "transformer", "d_model": 16, "num_layers": 2, "num_heads": 2, "ffn_dim": 32}


@pytest.fixture(scope="module")
def model(tiny_run) -> TrainedCaptioner:
    return TrainedCaptioner.from_checkpoint(tiny_run.best)


@pytest.fixture(scope="module")
def images():
    return [r.open() for r in load_split(SHAPES_TEST, "test").records]


def with_decoder(model: TrainedCaptioner, decoder: dict, seed: int, attention: dict | None = None) -> TrainedCaptioner:
    """``model`` with its encoder and vocabulary and another (random) decoder."""
    torch.manual_seed(seed)
    section = {**capkit.config.to_container(model.config.model), "decoder": decoder}
    if attention is not None:
        section["attention"] = attention
    other = capkit.build_captioner(section, len(model.vocab))
    other.encoder.load_state_dict(model.model.encoder.state_dict())
    return dataclasses.replace(model, model=other.eval())


@pytest.mark.parametrize("beam", [1, 3])
def test_two_copies_of_one_model_decode_exactly_as_the_model_alone(tiny_run, model, images, beam):
    alone = model.caption(images, beam_size=beam, n_best=beam)
    pair = capkit.ensemble([model, TrainedCaptioner.from_checkpoint(tiny_run.best)])
    assert isinstance(pair, EnsembleCaptioner) and pair.architecture.startswith("ensemble of 2: ")
    together = pair.caption(images, beam_size=beam, n_best=beam)
    assert [r.caption for r in together] == [r.caption for r in alone]
    assert [r.n_best and [c for c, _ in r.n_best] for r in together] == \
        [r.n_best and [c for c, _ in r.n_best] for r in alone]
    assert [r.score for r in together] == pytest.approx([r.score for r in alone], abs=1e-5)
    for a, b in zip(alone, together):
        assert torch.allclose(a.attention, b.attention, atol=1e-6)


def test_models_with_different_decoders_over_one_encoder_decode_together(model, images):
    transformer = with_decoder(model, TRANSFORMER, seed=1, attention={"name": "none"})
    lstm = with_decoder(model, {**capkit.config.to_container(model.config.model.decoder)}, seed=2)
    trio = capkit.ensemble([model, transformer, lstm])
    results = trio.caption(images, beam_size=3)
    assert len(results) == len(images) and all(r.attention.shape[0] == len(r.words) + 1 for r in results)
    maps = torch.stack([r.attention.sum(dim=(1, 2)) for r in results[:3]])
    assert torch.allclose(maps, torch.ones_like(maps), atol=1e-4)  # the members' average: still sums to 1
    # the score is the search's: the log-probability of the caption under the averaged, renormalised model
    for result in results[:3]:
        assert result.score <= 0 and result.score == pytest.approx(result.hypothesis.score)


def test_models_that_cannot_be_ensembled_are_one_clear_error(model):
    other_words = dataclasses.replace(model, vocab=Vocabulary(list(reversed(model.vocab.itos[4:]))))
    with pytest.raises(ConfigError, match=r"^models 1 \(.+\) and 2 \(.+\) have different vocabularies \(word 4 is "
                                          r"'.+' in one and '.+' in the other\): an ensemble averages word "
                                          r"probabilities by word id"):
        capkit.ensemble([model, other_words])
    other_encoder = copy.deepcopy(model)
    with torch.no_grad():
        next(other_encoder.model.encoder.parameters()).add_(1.0)
    with pytest.raises(ConfigError, match=r"have different encoders \(architecture, weights or preprocessing\): an "
                                          r"ensemble encodes each image once"):
        capkit.ensemble([model, other_encoder])
    with pytest.raises(ConfigError, match="an ensemble needs at least two models, got 1"):
        capkit.ensemble([model])
    with pytest.raises(capkit.CapkitError, match="an ensemble is saved as its members"):
        capkit.ensemble([model, model]).save_pretrained("anywhere")


def test_the_command_line_ensembles_repeated_models(tiny_run, tmp_path, capsys, monkeypatch):
    picture = tmp_path / "shape.png"
    load_split(SHAPES_TEST, "test").records[0].open().save(picture)
    assert caption_cli.main([str(picture), "--checkpoint", str(tiny_run.best)]) == 0
    alone = capsys.readouterr().out
    assert caption_cli.main([str(picture), "--checkpoint", str(tiny_run.best), "--checkpoint",
                             str(tiny_run.best)]) == 0
    assert capsys.readouterr().out == alone
    built, init = [], CaptionerEnsemble.__init__

    def counted(self, members):
        built.append(len(members))
        init(self, members)

    monkeypatch.setattr(CaptionerEnsemble, "__init__", counted)
    assert caption_cli.main([str(picture), "--checkpoint", str(tiny_run.best), "--checkpoint",
                             str(tiny_run.best)]) == 0
    assert built == [2] and capsys.readouterr().out == alone

