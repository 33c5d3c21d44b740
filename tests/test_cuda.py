"""The CUDA paths: mixed-precision training (bf16, fp16 with a GradScaler), channels-last images, beam search
and feature extraction agreeing with the CPU, and checkpoints written on the GPU read back on the CPU.

Skipped where CUDA is absent (CI); run them on a GPU machine with ``pytest tests/test_cuda.py``.
"""
from __future__ import annotations

import math

import pytest
import torch
from toys import AUX, ToyData, make_trainer, tiny_model

from capkit.data import build_transform, cached_features
from capkit.data.records import ImageRecord
from capkit.engine import PeriodicCheckpointHook, caption_loss, load_checkpoint
from capkit.types import EncoderOutput

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def exact_float32():
    """TF32 would round fp32 products and convolutions differently from the CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("amp, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_mixed_precision_training_with_the_encoder_in_the_loop(amp, dtype):
    trainer = make_trainer(n=16, epochs=2, images=True, finetune="all", device="cuda", amp=amp)
    assert trainer.device.type == "cuda" and trainer.amp_dtype is dtype
    assert trainer.scaler.is_enabled() == (amp == "fp16")
    conv = next(m for m in trainer.module.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    before = {k: v.clone() for k, v in trainer.module.state_dict().items() if v.is_floating_point()}
    trainer.fit()
    assert math.isfinite(trainer.loss_parts["ce"]) and trainer.global_step == 8
    for key, value in trainer.module.state_dict().items():
        if key in before:
            assert value.dtype == torch.float32 and torch.isfinite(value).all(), key  # master weights stay fp32
    changed = [k for k, v in trainer.module.state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert any(k.startswith("encoder.") for k in changed) and any(k.startswith("decoder.") for k in changed)


def test_cuda_and_cpu_give_the_same_loss_and_gradients_in_fp32():
    data = ToyData(8, images=True)
    batch = data.collate([data[i] for i in range(8)])
    torch.manual_seed(0)
    model = tiny_model(finetune="all").eval()  # no dropout: both devices compute the same function
    results = {}
    for device in ("cpu", "cuda"):
        model.to(device).zero_grad()
        on = batch.to(device)
        loss, _ = caption_loss(model(on.captions, images=on.images), on.captions, aux_loss_weights=AUX)
        loss.backward()
        results[device] = loss.item(), {k: p.grad.to("cpu", copy=True) for k, p in model.named_parameters() if p.grad is not None}
    (cpu_loss, cpu_grads), (gpu_loss, gpu_grads) = results["cpu"], results["cuda"]
    assert gpu_loss == pytest.approx(cpu_loss, rel=1e-5)
    assert cpu_grads.keys() == gpu_grads.keys() and any(k.startswith("encoder.") for k in cpu_grads)
    for key, grad in cpu_grads.items():  # fp32 on both: summation order differs (cuDNN, cuBLAS)
        error = float((gpu_grads[key] - grad).norm() / grad.norm().clamp_min(1e-12))
        assert error < 1e-3, f"{key}: the CUDA gradient differs from the CPU's by {error:.1e} (relative norm)"


def test_beam_search_on_cuda_gives_the_cpu_captions():
    torch.manual_seed(0)
    model = tiny_model().eval()
    with torch.no_grad():
        model.decoder.out.weight.mul_(5.0)  # peaked distributions, like a trained model's
    feats = EncoderOutput(torch.randn(12, 4, 256), (2, 2))
    for beam in (1, 3, 5):
        cpu = model.generate(features=feats, beam_size=beam, max_len=8).best
        gpu = model.cuda().generate(features=EncoderOutput(feats.feats.cuda(), (2, 2)), beam_size=beam, max_len=8).best
        model.cpu()
        assert [h.tokens for h in gpu] == [h.tokens for h in cpu]
        assert max(abs(a.score - b.score) for a, b in zip(gpu, cpu)) < 1e-4
        assert all(torch.allclose(a.alphas.cpu(), b.alphas, atol=1e-5) for a, b in zip(gpu, cpu))


def test_feature_extraction_on_cuda_matches_the_cpu(tmp_path, make_jpeg, tiny_encoder):
    records = [ImageRecord(f"im{i}", ["a caption"], make_jpeg(tmp_path / f"im{i}.jpg", seed=i)) for i in range(5)]
    transform = build_transform(tiny_encoder.data_config)
    stores = {
        device: cached_features(records, tiny_encoder, transform, identity={"dataset": "toy", "device": device},
                                cache_dir=tmp_path / device, batch_size=2, device=device)
        for device in ("cpu", "cuda")
    }
    assert stores["cuda"].grid == stores["cpu"].grid
    for i in range(len(records)):
        torch.testing.assert_close(stores["cuda"][i], stores["cpu"][i], rtol=2e-3, atol=1e-3)  # float16 store


def test_checkpoint_written_on_cuda_loads_on_the_cpu(tmp_path):
    trainer = make_trainer([PeriodicCheckpointHook(tmp_path)], n=8, epochs=1, device="cuda", amp="bf16")
    trainer.fit()
    state = load_checkpoint(tmp_path / "checkpoints" / "last")
    assert all(t.device.type == "cpu" for t in state["model"].values())
    model = tiny_model()
    model.load_state_dict(state["model"])
    for key, value in trainer.module.state_dict().items():
        assert torch.equal(model.state_dict()[key], value.cpu()), key
    resumed = make_trainer(n=8, epochs=1, device="cuda", amp="bf16")
    resumed.resume(tmp_path / "checkpoints" / "last")
    assert (resumed.epoch, resumed.global_step) == (1, 2)
    assert next(resumed.module.parameters()).device.type == "cuda"
