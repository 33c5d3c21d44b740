"""The plugin as a user meets it: listed by `python -m capkit list` without being imported, clashes refused
with both origins named, and a config naming `adaptive` trained, decoded with beam search and drawn."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import EntryPoint, distribution
from pathlib import Path

import pytest

pytest.importorskip("capkit_adaptive")

import torch  # noqa: E402

from capkit import registry as registry_module  # noqa: E402
from capkit.registry import ATTENTIONS, METRICS, REGISTRIES  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
DIST = "capkit-adaptive"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run(args: list[str], tmp_path: Path, **kwargs) -> subprocess.CompletedProcess:
    env = {**ENV, "CAPKIT_CACHE": str(tmp_path / "cache"), "MPLBACKEND": "Agg"}
    done = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def test_the_distribution_declares_its_entry_points():
    eps = {(ep.group, ep.name): ep.value for ep in distribution(DIST).entry_points}
    assert eps == {
        ("capkit.attentions", "adaptive"): "capkit_adaptive.attention:AdaptiveAttention",
        ("capkit.metrics", "distinct_captions"): "capkit_adaptive.metrics:DistinctCaptions",
        ("capkit.metrics", "vocab_usage"): "capkit_adaptive.metrics:VocabUsage",
    }
    assert any(r.startswith("capkit-captioning") for r in distribution(DIST).requires)


def test_cli_list_shows_the_distribution_as_origin(tmp_path):
    rows = {tuple(line.split("\t")) for line in run(["-m", "capkit", "list"], tmp_path).stdout.splitlines()}
    assert ("attention", "adaptive", DIST) in rows
    assert ("metric", "distinct_captions", DIST) in rows
    assert ("metric", "vocab_usage", DIST) in rows
    assert ("attention", "bahdanau", "builtin") in rows


def test_listing_imports_nothing_from_the_plugin(tmp_path):
    code = (
        "import sys, capkit\n"
        "from capkit.registry import REGISTRIES\n"
        "for r in REGISTRIES.values():\n"
        "    [r.origin(n) for n in r.names()]\n"
        "assert 'adaptive' in REGISTRIES['attention'].names()\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('capkit_adaptive'))\n"
        "assert not loaded, loaded\n"
        "REGISTRIES['attention'].get('adaptive')\n"
        "assert 'capkit_adaptive.attention' in sys.modules and 'capkit_adaptive.metrics' not in sys.modules\n"
        "print('ok')\n"
    )
    assert run(["-c", code], tmp_path).stdout.strip() == "ok"


@pytest.fixture
def rescan():
    """Registries rescan the real entry points after a test patched them."""
    yield
    for shared in REGISTRIES.values():
        shared._scanned = False


def patched_entry_points(*extra: EntryPoint):
    """The installed entry points plus ``extra``: a second distribution, as far as capkit can tell."""
    real = registry_module.entry_points
    return lambda group: [*real(group=group), *(ep for ep in extra if ep.group == group)]


def test_a_plugin_name_that_a_builtin_has_is_an_error_naming_both(monkeypatch, rescan):
    # as if capkit-adaptive had declared `bahdanau = capkit_adaptive.attention:AdaptiveAttention`
    # (never declare it in setup.cfg: it would break capkit for everyone who installs the plugin)
    clash = EntryPoint(name="bahdanau", value="capkit_adaptive.attention:AdaptiveAttention", group="capkit.attentions")
    monkeypatch.setattr(registry_module, "entry_points", patched_entry_points(clash))
    ATTENTIONS._scanned = False
    with pytest.raises(KeyError) as info:
        ATTENTIONS.names()
    message = str(info.value)
    assert "'bahdanau' is registered twice" in message
    assert "capkit.models.attention.bahdanau:BahdanauAttention" in message
    assert "capkit_adaptive.attention:AdaptiveAttention" in message


def test_a_second_distribution_with_the_same_name_is_an_error_naming_both(monkeypatch, rescan):
    other = EntryPoint(name="vocab_usage", value="other_plugin.metrics:VocabUsage", group="capkit.metrics")
    monkeypatch.setattr(registry_module, "entry_points", patched_entry_points(other))
    METRICS._scanned = False
    with pytest.raises(KeyError) as info:
        METRICS.names()
    message = str(info.value)
    assert "'vocab_usage' is registered twice" in message
    assert f"{DIST} (entry point vocab_usage = capkit_adaptive.metrics:VocabUsage)" in message
    assert "other_plugin.metrics:VocabUsage" in message


def test_rescanning_after_loading_is_not_a_clash(rescan):
    ATTENTIONS.get("adaptive")  # now registered from its entry point
    ATTENTIONS._scanned = False  # as the core tests' registry fixtures do
    assert "adaptive" in ATTENTIONS.names()


def test_origin_is_the_distribution_before_and_after_loading(rescan):
    ATTENTIONS._scanned = False
    assert ATTENTIONS.origin("adaptive") == DIST
    ATTENTIONS.get("adaptive")
    assert ATTENTIONS.origin("adaptive") == DIST


@pytest.mark.slow
def test_a_config_naming_the_plugin_trains_generates_and_draws(tmp_path):
    out = tmp_path / "runs"
    run(
        [
            "tools/train.py", "configs/demo.yaml",
            "model.attention.name=adaptive", "model.attention.attn_dim=32",
            "model.decoder.embed_dim=32", "model.decoder.hidden_dim=32",
            "data.dataset.num_train=40", "data.dataset.num_val=8", "data.dataset.num_test=8",
            # 40 images x 5 captions in batches of 40: one epoch is 5 steps, validated at its end. (A max_steps
            # reached on an epoch's last step ends training before the end-of-epoch validation, so the cap
            # is set above the epoch: it only guards against a loader that grew.)
            "train.batch_size=40", "train.epochs=1", "train.max_steps=10", "train.device=cpu",
            "train.early_stop_metric=distinct_captions", "eval.metrics=[bleu,distinct_captions,vocab_usage]",
            f"train.output_dir={out}", "train.run_name=adaptive", "--samples=0",
        ],
        tmp_path,
        timeout=600,
    )
    run_dir = out / "adaptive"
    best = run_dir / "checkpoints" / "best"
    assert (best / "model.safetensors").is_file()
    summary = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("distinct_captions" in json.dumps(row) for row in summary)  # validation used the plugin metric
    test_metrics = json.loads((run_dir / "test_metrics.json").read_text())
    assert 0 < test_metrics["distinct_captions"] <= 1 and test_metrics["vocab_usage"] >= 1
    assert "bleu4" in test_metrics

    from capkit.data.datasets.shapes import ShapesDataset

    picture = ShapesDataset("test", seed=0, num_train=40, num_val=8, num_test=8).records[0].open()
    image = tmp_path / "shape.png"
    picture.save(image)
    figures = tmp_path / "figures"
    captioned = run(
        ["tools/caption.py", "--checkpoint", str(best), "--beam", "3", "--device", "cpu",
         "--attention-out", str(figures), str(image)],
        tmp_path,
        timeout=300,
    )
    assert captioned.stdout.startswith(f"{image}\t")
    assert (figures / "shape_attention.png").stat().st_size > 0

    # the sentinel share of every generated word, on the same beam-search hypothesis
    from capkit.data.transforms import build_transform
    from capkit.recipes.inference import load_trained
    from capkit.types import EOS
    from capkit_adaptive import hypothesis_sentinel_shares, save_sentinel_figure

    trained = load_trained(best)
    assert type(trained.model.decoder.attention).__name__ == "AdaptiveAttention"
    x = build_transform(trained.model.encoder.data_config)(picture).unsqueeze(0)
    generation = trained.model.generate(x, beam_size=3, max_len=16)
    hyp = generation.best[0]
    betas = hypothesis_sentinel_shares(trained.model, hyp, images=x)
    assert betas.shape == (len(hyp.tokens) + 1,) and ((betas >= 0) & (betas <= 1)).all()
    assert torch.allclose(hyp.alphas.sum(-1), torch.ones(len(hyp.tokens) + 1), atol=1e-5)
    words = [trained.vocab.itos[t] for t in hyp.tokens] + [EOS]
    path = save_sentinel_figure(tmp_path / "sentinel.png", picture, words, hyp.alphas, betas, generation.grid)
    assert Path(path).stat().st_size > 0
