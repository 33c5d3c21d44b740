"""capkit-onnx: the numpy beam search is torch's, hypothesis for hypothesis; the runtime imports and captions
without torch; an incomplete export folder is one clear error."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

capkit_onnx = pytest.importorskip("capkit_onnx")

from capkit_onnx import OnnxCaptioner, OnnxModelError, beam_search  # noqa: E402


# ------------------------------------------------------------------------------------------ the search twin
def torch_step_pair(vocab: int, seed: int, unk_bias: float = 0.0):
    """A recurrent step written once in torch, and its numpy face calling that very function, so that the two
    searches see identical logits: tokens (R,), state {"h": (R, D)}, memory {"values": (R, N, C)}. ``unk_bias``
    makes ``<unk>`` likelier."""
    torch = pytest.importorskip("torch")
    from capkit.models.attention.base import AttentionMemory

    g = torch.Generator().manual_seed(seed)
    dim, positions = 6, 4
    embed, recur = torch.randn(vocab, dim, generator=g), torch.randn(dim, dim, generator=g) * 0.8
    read, out = torch.randn(3, dim, generator=g), torch.randn(dim, vocab, generator=g) * 2
    out[:, 2] += 0.6  # <end> likely enough that captions end at different steps
    out[:, 3] += unk_bias

    def step(tokens, state, memory: AttentionMemory):
        h = torch.tanh(state["h"] @ recur + embed[tokens] + memory.values.mean(dim=1) @ read)
        alpha = torch.softmax(h[:, :positions], dim=1)
        return h @ out, alpha, {"h": h}

    def numpy_step(tokens, state, memory):
        logits, alpha, new = step(torch.from_numpy(tokens), {"h": torch.from_numpy(state["h"])},
                                  AttentionMemory(torch.from_numpy(memory["values"]), None, (2, 2)))
        return logits.numpy(), alpha.numpy(), {"h": new["h"].numpy()}

    values = torch.randn(5, positions, 3, generator=g)
    state = {"h": torch.randn(5, dim, generator=g)}
    return step, numpy_step, state, AttentionMemory(values, None, (2, 2))


@pytest.mark.parametrize("vocab, beam, max_len, length_penalty, ngram, suppress_unk", [
    (40, 1, 6, 0.0, 0, False), (40, 3, 6, 0.0, 0, False), (40, 3, 6, 0.7, 0, False), (40, 5, 0, 0.0, 0, False),
    (40, 2, 1, 1.0, 0, False),
    (5, 5, 4, 0.0, 0, False),  # three words that can be generated, five beams: dead beams
    (8, 3, 12, 0.5, 2, False), (8, 3, 12, 0.0, 3, False), (8, 1, 12, 0.0, 1, False),  # few words: the ban binds
    (40, 3, 6, 0.5, 0, True), (8, 3, 12, 0.5, 3, True), (6, 5, 4, 0.0, 0, True),  # <unk> likely, forbidden
])
def test_the_numpy_beam_search_finds_torchs_hypotheses(vocab, beam, max_len, length_penalty, ngram, suppress_unk):
    from capkit.models.beam_search import beam_search as torch_beam_search
    from capkit.types import UNK_ID
    from toys import repeats_an_ngram

    for seed in range(3):
        step, numpy_step, state, memory = torch_step_pair(vocab, seed, unk_bias=3.0 if suppress_unk else 0.0)
        settings = dict(beam_size=beam, max_len=max_len, length_penalty=length_penalty, n_best=beam,
                        no_repeat_ngram_size=ngram, suppress_unk=suppress_unk)
        if ngram:  # without the ban these captions repeat n-grams: the two searches must ban the same ones
            free = torch_beam_search(step, state, memory, **{**settings, "no_repeat_ngram_size": 0}).hypotheses
            assert any(repeats_an_ngram(h.tokens, ngram) for hyps in free for h in hyps)
        if suppress_unk:  # without it these captions hold <unk>
            free = torch_beam_search(step, state, memory, **{**settings, "suppress_unk": False}).hypotheses
            assert any(UNK_ID in h.tokens for hyps in free for h in hyps)
        want = torch_beam_search(step, state, memory, **settings).hypotheses
        got = beam_search(numpy_step, {"h": state["h"].numpy()}, {"values": memory.values.numpy()}, **settings)
        assert len({tuple(hyps[0].tokens) for hyps in want}) > 1 or beam == 1 or max_len == 0
        assert not any(ngram and repeats_an_ngram(h.tokens, ngram) for hyps in got for h in hyps)
        assert not any(suppress_unk and UNK_ID in h.tokens for hyps in got for h in hyps)
        for w_hyps, g_hyps in zip(want, got):
            assert [h.tokens for h in g_hyps] == [h.tokens for h in w_hyps]
            assert np.allclose([h.score for h in g_hyps], [h.score for h in w_hyps], atol=1e-5)
            assert np.allclose([h.norm_score for h in g_hyps], [h.norm_score for h in w_hyps], atol=1e-5)
            for g, w in zip(g_hyps, w_hyps):
                assert np.allclose(g.alphas, w.alphas.numpy(), atol=1e-6)


def test_the_search_refuses_what_torchs_refuses():
    with pytest.raises(ValueError, match="need beam_size >= 1"):
        beam_search(lambda *a: None, {}, {"values": np.zeros((1, 1, 1), np.float32)}, beam_size=0)
    with pytest.raises(ValueError, match="no_repeat_ngram_size >= 0"):
        beam_search(lambda *a: None, {}, {"values": np.zeros((1, 1, 1), np.float32)}, no_repeat_ngram_size=-1)
    with pytest.raises(TypeError, match="suppress_unk must be True or False"):
        beam_search(lambda *a: None, {}, {"values": np.zeros((1, 1, 1), np.float32)}, suppress_unk=1)


# ------------------------------------------------------------------------------------------ an exported model
@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    pytest.importorskip("onnxscript")
    from capkit.export import export_onnx
    from toys import tiny_trained

    out = tmp_path_factory.mktemp("onnx_export")
    export_onnx(tiny_trained(), out)
    return out


def test_the_runtime_imports_and_captions_without_torch(export_dir, tmp_path):
    from toys import tiny_trained, varied_pictures

    picture = tmp_path / "picture.png"
    varied_pictures(1, seed=7)[0].save(picture)
    code = textwrap.dedent(f"""
        import importlib.abc, json, sys

        class NoTorch(importlib.abc.MetaPathFinder):  # as if torch (and capkit, which needs it) were not installed
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "torchvision", "capkit", "timm"):
                    raise ImportError(f"No module named {{name!r}}")

        sys.meta_path.insert(0, NoTorch())
        for name in [m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "capkit", "timm")]:
            del sys.modules[name]
        from capkit_onnx import OnnxCaptioner

        result = OnnxCaptioner.from_pretrained({str(export_dir)!r}).caption({str(picture)!r}, beam_size=3)
        assert not [m for m in sys.modules if m.split(".")[0] == "torch"]
        print(json.dumps({{"caption": result.caption, "score": result.score, "shape": list(result.attention.shape)}}))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    want = tiny_trained().caption(str(picture), beam_size=3)
    assert got["caption"] == want.caption and abs(got["score"] - want.score) < 1e-4
    assert got["shape"] == list(want.attention.shape)


def test_an_incomplete_export_is_one_clear_error(export_dir, tmp_path):
    for name in ("config.json", "encoder.onnx", "memory.onnx"):
        (tmp_path / name).write_bytes((export_dir / name).read_bytes())
    with pytest.raises(OnnxModelError, match=r"decoder_step.onnx: missing \(step graph\); export the model again"):
        OnnxCaptioner.from_pretrained(tmp_path)
    model = OnnxCaptioner.from_pretrained(export_dir)
    with pytest.raises(ValueError, match="beam_size must be a whole number of at least 1, got 0"):
        model.caption(np.zeros((20, 20, 3), np.uint8), beam_size=0)
    with pytest.raises(ValueError, match=r"an image array is uint8 \(H, W, 3\)"):
        model.caption(np.zeros((20, 20), np.uint8))
