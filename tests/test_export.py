"""ONNX export (#31): torch.export of the encoder and of one decoding step, the exported graphs decoded by the
torch-free runtime with the captions and scores of PyTorch, the preprocessing reproduced with Pillow, and the
user errors (a component that cannot be exported, a folder in use)."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")
capkit_onnx = pytest.importorskip("capkit_onnx")

import capkit  # noqa: E402
from capkit.cli.main import main as cli  # noqa: E402
from capkit.config import ExperimentConfig  # noqa: E402
from capkit.data.transforms import build_transform  # noqa: E402
from capkit.errors import ConfigError, ExportError, OutputPathError  # noqa: E402
from capkit.export import export_onnx  # noqa: E402
from capkit.export.onnx import FP16_MIN_ELEMENTS, EncoderGraph  # noqa: E402
from capkit.models.attention.base import Attention, AttentionMemory, weighted_context  # noqa: E402
from capkit.registry import ATTENTIONS  # noqa: E402
from capkit.types import BOS_ID, UNK_ID, EncoderOutput  # noqa: E402
from toys import tiny_trained, varied_pictures  # noqa: E402

DECODERS = ("show_attend_tell", "updown", "transformer")


@pytest.fixture(scope="module", params=DECODERS)
def exported(request, tmp_path_factory):
    """(the torch model, its export loaded by capkit_onnx, the export folder), once per decoder."""
    trained = tiny_trained(request.param)
    out = tmp_path_factory.mktemp(f"onnx_{request.param}")
    export_onnx(trained, out)
    return trained, capkit_onnx.OnnxCaptioner.from_pretrained(out), out


# ------------------------------------------------------------------------------------------ torch.export
@pytest.mark.parametrize("decoder", DECODERS)
def test_the_encoder_and_one_decoding_step_export_with_dynamic_batch(decoder):
    model = tiny_trained(decoder).model
    batch = torch.export.Dim("batch")
    encoder = torch.export.export(model.encoder, (torch.randn(2, 3, 64, 64),), dynamic_shapes=({0: batch},))
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        want, got = model.encoder(images), encoder.module()(images)
    assert isinstance(got, EncoderOutput) and got.grid == want.grid  # a pytree: the grid travels as metadata
    assert torch.allclose(got.feats, want.feats, atol=1e-5)

    class Step(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, tokens, state, memory):
            return self.inner.step(tokens, state, memory)

    with torch.no_grad():
        memory = model.decoder.prepare(model.encoder(torch.randn(2, 3, 64, 64)))
        state = model.decoder.init_state(memory)
        tokens = torch.full((2,), BOS_ID)
        for _ in range(2):  # a key/value cache of 2 steps: neither 0 nor 1, which torch.export specialises
            _, _, state = model.decoder.step(tokens, state, memory)
    steps = torch.export.Dim("steps", max=model.decoder.max_len - 1) if decoder == "transformer" else None
    state_dims = {name: {0: batch, **({1: steps} if steps else {})} for name in state}
    program = torch.export.export(Step(model.decoder).eval(), (tokens, state, memory),
                                  dynamic_shapes=({0: batch}, state_dims, [{0: batch}, {0: batch}]))
    rows = torch.tensor([0, 1, 1])  # another batch size
    args = (torch.tensor([5, 6, 7]), {k: v[rows] for k, v in state.items()}, memory.index_select(rows))
    with torch.no_grad():
        want, got = model.decoder.step(*args), program.module()(*args)
    assert torch.allclose(got[0], want[0], atol=1e-5) and torch.allclose(got[1], want[1], atol=1e-6)


# ------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("beam, ngram", [(1, 0), (3, 0), (3, 2)])
def test_onnxruntime_gives_the_captions_and_scores_of_pytorch(exported, beam, ngram):
    trained, runtime, _ = exported
    pictures = varied_pictures(12)
    want = trained.caption(pictures, beam_size=beam, n_best=beam, no_repeat_ngram_size=ngram)
    got = runtime.caption(pictures, beam_size=beam, n_best=beam, no_repeat_ngram_size=ngram)
    if ngram:  # the ban changes captions here
        assert [r.caption for r in want] != [r.caption for r in trained.caption(pictures, beam_size=beam)]
    assert len({r.caption for r in want}) > 3  # the pictures get different captions
    assert [r.caption for r in got] == [r.caption for r in want]
    assert [r.hypothesis.tokens for r in got] == [r.hypothesis.tokens for r in want]
    assert max(abs(g.score - w.score) for g, w in zip(got, want)) < 1e-4
    for g, w in zip(got, want):
        assert [c for c, _ in g.n_best] == [c for c, _ in w.n_best]
        assert np.allclose([s for _, s in g.n_best], [s for _, s in w.n_best], atol=1e-4)
        assert g.attention.shape == tuple(w.attention.shape)  # (words + 1, H, W)
        assert np.allclose(g.attention, w.attention.numpy(), atol=1e-5)


@pytest.mark.parametrize("attention, decoder", [
    ({"name": "luong_local", "window": 1.5, "attn_dim": 8},
     {"name": "luong", "embed_dim": 16, "hidden_dim": 32, "feature_dim": 32}),
    ({"name": "none"}, {"name": "show_attend_tell", "embed_dim": 16, "hidden_dim": 32, "feature_dim": 32}),
    ({"name": "none"}, {"name": "transformer", "d_model": 32, "num_heads": 2, "num_layers": 1, "ffn_dim": 64,
                        "max_len": 20, "use_cache": False, "positional": "learned"}),  # the token history as state
], ids=["luong_local", "no_attention", "transformer_without_cache"])
def test_the_other_components_export_with_parity(attention, decoder, tmp_path):
    model_cfg = {"encoder": {"name": "timm", "model_name": "test_efficientnet"}, "attention": attention,
                 "decoder": decoder}
    torch.manual_seed(0)
    vocab = capkit.data.Vocabulary([f"w{i}" for i in range(30)])
    model = capkit.build_captioner(model_cfg, len(vocab)).eval()
    with torch.no_grad():  # captions that differ between pictures (see toys.tiny_trained)
        model.encoder.model.bn2.weight.mul_(100)
        for p in model.decoder.parameters():
            p.normal_(0, 0.3)
    config = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), {"model": model_cfg, "eval": {"max_len": 8}})
    trained = capkit.TrainedCaptioner(model, vocab, config, torch.device("cpu"), dict(model.encoder.data_config))
    export_onnx(trained, tmp_path)
    runtime = capkit_onnx.OnnxCaptioner.from_pretrained(tmp_path)
    pictures = varied_pictures(6)
    want, got = trained.caption(pictures, beam_size=2), runtime.caption(pictures, beam_size=2)
    assert [r.caption for r in got] == [r.caption for r in want]
    assert max(abs(g.score - w.score) for g, w in zip(got, want)) < 1e-4


def test_the_export_folder_holds_three_graphs_and_the_config(exported):
    trained, runtime, out = exported
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "decoder_step.onnx", "encoder.onnx",
                                                     "memory.onnx"]
    config = json.loads((out / "config.json").read_text())
    assert config["vocabulary"] == trained.vocab.itos and runtime.decoding == trained.decoding
    # no n-gram ban: written as format 1, without the setting, so that capkit-onnx 0.1 still reads it
    assert config["capkit_onnx_format"] == 1 and "no_repeat_ngram_size" not in config["decoding"]
    assert config["preprocessing"]["input_size"] == list(trained.preprocessing["input_size"])
    assert [i.name for i in runtime.encoder.get_inputs()] == ["pixels"]
    assert runtime.encoder.get_inputs()[0].type == "tensor(uint8)"
    for session in (runtime.encoder, runtime.memory, runtime.step_session):  # a dynamic batch dimension
        assert all(isinstance(i.shape[0], str) for i in session.get_inputs())
    if "transformer" in config["architecture"]:  # the key/value cache starts empty and grows
        assert {s["initial"] for s in config["state"]} == {"empty"} and config["max_steps"] == 20
        with pytest.raises(ValueError, match="max_len 20 needs 21 decoder positions; this model has 20"):
            runtime.caption(varied_pictures(1)[0], max_len=20)
    else:  # the LSTMs' state, each tensor an input of the step graph
        names = ["h", "c"] if "show_attend_tell" in config["architecture"] else ["h", "c", "h_att", "c_att", "mean"]
        assert [s["name"] for s in config["state"]] == names
        assert {"tokens", "values", "keys", *(f"state_{n}" for n in names)} == {
            i.name for i in runtime.step_session.get_inputs()}


@pytest.mark.parametrize("mode, size", [("center", (160, 160)), ("squash", (96, 96))])
def test_the_runtime_preprocessing_is_the_torch_transform(mode, size):
    data_config = {"input_size": (3, *size), "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
                   "std": (0.229, 0.224, 0.225), "crop_pct": 0.9, "crop_mode": mode}
    transform = build_transform(data_config)
    graph = EncoderGraph(nn.Identity(), data_config["mean"], data_config["std"])
    for picture in varied_pictures(6, seed=3) + [varied_pictures(1)[0].resize((40, 300))]:
        pixels = torch.from_numpy(capkit_onnx.preprocess(picture, data_config)).unsqueeze(0)
        assert torch.equal(graph.normalise(pixels)[0], transform(picture))


def test_float16_weights_are_stored_as_float16(tmp_path):
    import onnx

    export_onnx(tiny_trained(), tmp_path / "fp16", fp16=True)
    weights = onnx.load(tmp_path / "fp16" / "encoder.onnx").graph.initializer
    large = [w for w in weights if np.prod(w.dims) >= FP16_MIN_ELEMENTS]
    assert large and all(w.data_type == onnx.TensorProto.FLOAT16 for w in large)
    runtime = capkit_onnx.OnnxCaptioner.from_pretrained(tmp_path / "fp16")
    result = runtime.caption(varied_pictures(1)[0])
    assert np.isfinite(result.score) and result.attention.shape[1:] == runtime.grid


# ------------------------------------------------------------------------------------------ command line
def test_export_and_caption_from_the_command_line(tmp_path, capsys):
    trained = tiny_trained()
    trained.save_pretrained(tmp_path / "model")
    pictures = []
    for i, picture in enumerate(varied_pictures(4, seed=5)):
        pictures.append(tmp_path / f"p{i}.png")
        picture.save(pictures[-1])
    assert cli(["export", "--model", str(tmp_path / "model"), "--format", "onnx", str(tmp_path / "onnx")]) == 0
    assert "caption with: capkit caption IMAGE --runtime onnx" in capsys.readouterr().out
    outputs = {}
    for runtime, model in (("torch", "model"), ("onnx", "onnx")):
        args = ["caption", *map(str, pictures), "--model", str(tmp_path / model), "--runtime", runtime,
                "--workers", "0", "--beam", "2", "--n-best", "2"]
        assert cli([*args, "--output", str(tmp_path / f"{runtime}.jsonl")]) == 0
        outputs[runtime] = [json.loads(line) for line in (tmp_path / f"{runtime}.jsonl").read_text().splitlines()]
    for row in outputs["onnx"] + outputs["torch"]:
        row.pop("score")  # rounded to 4 places: equal up to 1e-4, so not always in the 4th
        for entry in row["n_best"]:
            entry.pop("score")
    assert outputs["onnx"] == outputs["torch"]
    assert cli(["export", "--model", str(tmp_path / "model"), str(tmp_path / "onnx")]) == 2  # not empty
    assert "not empty; give a new folder, or --overwrite" in capsys.readouterr().err
    assert cli(["caption", str(pictures[0]), "--runtime", "onnx"]) == 2
    assert "--runtime onnx needs one --model EXPORT_DIR" in capsys.readouterr().err


class CountingAttention(Attention):
    """Attends to as many positions as the first feature has positive values: a shape that depends on data."""

    def forward(self, query: torch.Tensor, memory: AttentionMemory) -> tuple[torch.Tensor, torch.Tensor]:
        count = max(1, int((memory.values[0, :, 0] > 0).sum()))
        alpha = torch.zeros(query.shape[0], memory.values.shape[1])
        alpha[:, :count] = 1.0 / count
        return weighted_context(alpha, memory.values), alpha


def test_a_component_that_cannot_be_exported_is_one_error_naming_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(ATTENTIONS._objects, "counting", CountingAttention)
    monkeypatch.setitem(ATTENTIONS._origins, "counting", "tests")
    trained = tiny_trained("show_attend_tell")
    trained.model.decoder.attention = CountingAttention(32, 32)
    trained.config.model.attention = {"name": "counting"}
    with pytest.raises(ExportError) as info:
        export_onnx(trained, tmp_path / "out")
    message = str(info.value)
    assert re.match(r"the attention 'counting' \(from [\w.]*test_export\.CountingAttention\) cannot be exported "
                    r"to ONNX: ", message), message
    assert "\n" not in message and "data-dependent" in message
    assert not (tmp_path / "out" / "config.json").exists()  # nothing half-written
    trained.save_pretrained(tmp_path / "model")
    assert cli(["export", "--model", str(tmp_path / "model"), str(tmp_path / "cli")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("INFO: ")]
    assert len(lines) == 1 and "CountingAttention" in lines[0]
    assert lines[0].startswith("capkit export: error: the attention 'counting' (from ")


def test_a_folder_with_files_is_refused_unless_overwritten(exported, tmp_path):
    trained, _, _ = exported
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputPathError, match="not empty"):
        export_onnx(trained, tmp_path)
    with pytest.raises(capkit_onnx.OnnxModelError, match="cannot read the exported model's config"):
        capkit_onnx.OnnxCaptioner.from_pretrained(tmp_path)
    trained.save_pretrained(tmp_path / "model")  # a torch model's folder is no export
    with pytest.raises(capkit_onnx.OnnxModelError, match="not a capkit ONNX export of format 3 or earlier"):
        capkit_onnx.OnnxCaptioner.from_pretrained(tmp_path / "model")


def test_an_export_that_bans_repeated_ngrams_is_format_2_and_decodes_with_the_ban(exported, tmp_path):
    trained, _, _ = exported
    blocked = capkit.from_pretrained(trained.save_pretrained(tmp_path / "model", decoding={"no_repeat_ngram_size": 1}))
    export_onnx(blocked, tmp_path / "onnx")
    config = json.loads((tmp_path / "onnx" / "config.json").read_text())
    assert config["capkit_onnx_format"] == 2 and config["decoding"]["no_repeat_ngram_size"] == 1
    runtime = capkit_onnx.OnnxCaptioner.from_pretrained(tmp_path / "onnx")
    pictures = varied_pictures(8)
    free, want, got = trained.caption(pictures), blocked.caption(pictures), runtime.caption(pictures)
    assert [r.caption for r in got] == [r.caption for r in want] != [r.caption for r in free]
    assert all(len(set(r.words)) == len(r.words) for r in got)  # 1: no word twice


def test_an_export_that_suppresses_unk_is_format_3_and_decodes_without_it(tmp_path):
    trained = tiny_trained()
    with torch.no_grad():
        trained.model.decoder.out.bias[UNK_ID] += 3.0  # <unk> among the model's words
    kept = capkit.from_pretrained(trained.save_pretrained(tmp_path / "model", decoding={"suppress_unk": True}))
    export_onnx(kept, tmp_path / "onnx")
    config = json.loads((tmp_path / "onnx" / "config.json").read_text())
    assert config["capkit_onnx_format"] == 3 and config["decoding"]["suppress_unk"] is True
    assert "no_repeat_ngram_size" not in config["decoding"]
    runtime = capkit_onnx.OnnxCaptioner.from_pretrained(tmp_path / "onnx")
    pictures = varied_pictures(8)
    free, want, got = trained.caption(pictures), kept.caption(pictures), runtime.caption(pictures)
    assert any("<unk>" in r.words for r in free)
    assert [r.words for r in got] == [r.words for r in want] and not any("<unk>" in r.words for r in got)


def test_the_adapter_hands_an_older_runtime_only_the_settings_it_knows():
    """capkit-onnx 0.1 knows neither no_repeat_ngram_size nor suppress_unk: left neutral, they are not passed."""
    from capkit.export.runtime import OnnxRuntimeCaptioner

    class OldRuntime:
        decoding = dict(beam_size=3, max_len=16, length_penalty=0.0)

        def decoding_with(self, **overrides):
            return {**self.decoding, **overrides}

        def caption_pixels(self, pixels, sources, *, beam_size, max_len, length_penalty, n_best=1):
            self.given = dict(beam_size=beam_size, max_len=max_len, length_penalty=length_penalty, n_best=n_best)
            return []

    runtime = OldRuntime()
    adapter, pictures = OnnxRuntimeCaptioner(runtime), [(varied_pictures(1)[0], None)]
    adapter.caption_pictures(pictures, beam_size=2, max_len=5, length_penalty=0.5, no_repeat_ngram_size=0,
                             suppress_unk=False, inputs=torch.zeros(1, 8, 8, 3, dtype=torch.uint8))
    assert runtime.given == dict(beam_size=2, max_len=5, length_penalty=0.5, n_best=1)
    assert adapter.decoding_with(beam_size=2, suppress_unk=None) == dict(beam_size=2, max_len=16, length_penalty=0.0)
    # asked for, a setting the runtime does not know is refused in one line rather than dropped
    with pytest.raises(ConfigError, match=r"^the installed capkit-onnx has no decoding setting suppress_unk: "
                                          r"upgrade it \(pip install capkit-onnx"):
        adapter.decoding_with(suppress_unk=True)
