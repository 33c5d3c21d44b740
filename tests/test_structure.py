"""The structure the rest relies on: layering, the run directory's names, the decoder and encoder contracts,
one error line per user mistake, one attention-figure helper."""
from __future__ import annotations

import ast
from functools import partial
from pathlib import Path

import pytest
import torch
from PIL import Image

import capkit
from capkit.cli import evaluate as evaluate_cli
from capkit.cli import train as train_cli
import capkit.engine.trainer as trainer_module
from capkit.engine import BestCheckpointHook, PeriodicCheckpointHook, RunDir, load_checkpoint, save_checkpoint
from capkit.engine.run_dir import backup_of
from capkit.errors import CapkitError, CheckpointNotFoundError, ComponentNotFoundError
from capkit.models.attention.bahdanau import BahdanauAttention
from capkit.models.decoders.base import Decoder
from capkit.models.decoders.show_attend_tell import ShowAttendTellDecoder
from capkit.registry import DECODERS
from capkit.types import BOS_ID, EOS_ID, PAD_ID, EncoderOutput
from capkit.visualization import save_caption_figure
from toys import make_trainer

PACKAGE = Path(capkit.__file__).parent


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, relative imports resolved."""
    package = ["capkit", *path.relative_to(PACKAGE).parent.parts]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            names.add(".".join([*base, *([node.module] if node.module else [])]))
    return names


def test_the_library_never_imports_the_command_line():
    """``capkit/__main__.py`` (``python -m capkit``) is the command line's entry, as ``tools/*.py`` are."""
    library = [p for p in PACKAGE.rglob("*.py") if "cli" not in p.relative_to(PACKAGE).parts and p.name != "__main__.py"]
    assert len(library) > 40
    offenders = {str(p.relative_to(PACKAGE)) for p in library if any(m.startswith("capkit.cli") for m in imported_modules(p))}
    assert offenders == set()


def test_the_trainer_imports_no_hook_module():
    assert not {"capkit.engine.hooks", "capkit.engine.monitor"} & imported_modules(PACKAGE / "engine" / "trainer.py")
    assert "capkit.cli.main" in imported_modules(PACKAGE / "__main__.py")  # relative imports are resolved


def test_a_run_directory_names_its_files_and_finds_a_checkpoint_left_mid_save(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.config.name == "config.yaml" and run.vocab.name == "vocab.json" and run.metrics.name == "metrics.jsonl"
    assert run.last == tmp_path / "run" / "checkpoints" / "last" and run.best.parent == run.checkpoints
    assert RunDir.of_checkpoint(run.best).root == run.root
    assert not run.has_checkpoint("last")
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint at .*checkpoints/last"):
        run.find_checkpoint("last")
    save_checkpoint(run.last, {"model": {"w": torch.zeros(1)}})
    assert run.has_checkpoint("last") and run.find_checkpoint("last") == run.last
    run.last.rename(backup_of(run.last))  # a kill between the two renames of a save
    assert run.has_checkpoint("last") and run.find_checkpoint("last") == backup_of(run.last)


class StepOnly(Decoder):
    """A decoder written from the interface alone (``step``), over an LSTM decoder's parts."""

    def __init__(self, inner: ShowAttendTellDecoder):
        super().__init__()
        self.inner = inner

    def prepare(self, enc):
        return self.inner.prepare(enc)

    def init_state(self, memory):
        return self.inner.init_state(memory)

    def step(self, tokens, state, memory):
        return self.inner.step(tokens, state, memory)


def test_teacher_forcing_of_a_step_only_decoder_runs_its_step_on_the_captions_still_running():
    torch.manual_seed(0)
    lstm = ShowAttendTellDecoder(partial(BahdanauAttention, attn_dim=8), 10, 12, embed_dim=6, hidden_dim=8).eval()
    enc = EncoderOutput(torch.randn(3, 4, 10), (2, 2))
    captions = torch.tensor([[BOS_ID, 5, EOS_ID, PAD_ID, PAD_ID], [BOS_ID, 6, 7, 8, EOS_ID], [BOS_ID, EOS_ID] + [PAD_ID] * 3])
    with torch.no_grad():
        expected, got = lstm(enc, captions), StepOnly(lstm)(enc, captions)
    valid = captions[:, 1:] != PAD_ID
    assert torch.allclose(got.logits[valid], expected.logits[valid], atol=1e-5)
    assert torch.allclose(got.alphas, expected.alphas, atol=1e-6)
    assert (got.logits[~valid] == 0).all()  # nothing is computed after a caption's <end>


def test_decoders_declare_whether_beams_may_share_the_attention_memory():
    def build(name, attention):
        return DECODERS.build({"name": name}, attention=partial(attention), encoder_dim=8, vocab_size=10)

    assert build("show_attend_tell", BahdanauAttention).supports_shared_memory
    assert not Decoder.supports_shared_memory  # the interface promises nothing by default


def test_user_errors_are_one_line_with_status_2_and_tracebacks_with_debug(tmp_path, capsys):
    missing = str(tmp_path / "nope.yaml")
    assert train_cli.main([missing]) == 2
    err = capsys.readouterr().err
    assert err.startswith("capkit train: error: ") and err.count("\n") == 1 and missing in err
    with pytest.raises(FileNotFoundError):
        train_cli.main([missing, "--debug"])
    assert evaluate_cli.main(["--checkpoint", str(tmp_path), "--split", "val"]) == 2
    assert "capkit evaluate: error: no checkpoint at" in capsys.readouterr().err
    assert issubclass(ComponentNotFoundError, CapkitError) and issubclass(ComponentNotFoundError, KeyError)


def test_one_helper_draws_a_generated_captions_attention(tmp_path):
    model = capkit.build_captioner(
        {"encoder": {"name": "timm", "model_name": "test_efficientnet"}, "attention": {"name": "bahdanau"},
         "decoder": {"name": "show_attend_tell", "embed_dim": 8, "hidden_dim": 16}},
        vocab_size=9,
    ).eval()
    generation = model.generate(images=torch.randn(1, 3, 128, 128), beam_size=2, max_len=3)
    words = [f"w{i}" for i in range(9)]
    path = save_caption_figure(tmp_path / "fig.png", Image.new("RGB", (160, 120)), generation.best[0],
                               generation.grid, words=words, data_config=model.encoder.data_config, title="t")
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size[0] > 100
    with pytest.raises(ValueError, match="len\\(words\\)"):  # one panel per word and one for <end>
        save_caption_figure(tmp_path / "bad.png", Image.new("RGB", (8, 8)), generation.best[0], (1, 1),
                            words=words, data_config=model.encoder.data_config)


def test_a_checkpoint_of_the_single_checkpoint_hook_resumes_the_best_score(tmp_path):
    """Before the periodic and best checkpoints were two hooks, one saved both under the name CheckpointHook."""
    make_trainer([PeriodicCheckpointHook(tmp_path)], n=8, epochs=1).fit()
    state = load_checkpoint(RunDir(tmp_path).last)
    state["hooks"] = {"CheckpointHook": {"best": 0.7}}
    best = BestCheckpointHook(tmp_path, metric="cider")
    trainer = make_trainer([best], n=8, epochs=1)
    trainer.load_state_dict(state)
    assert best.best == 0.7


def test_several_ranks_refuse_to_train_a_model_no_hook_wrapped(monkeypatch):
    monkeypatch.setattr(trainer_module, "world_size", lambda: 2)
    with pytest.raises(RuntimeError, match="add DistributedDataParallelHook"):
        make_trainer(n=8, epochs=1).fit()
