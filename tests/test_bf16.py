"""bf16 on the CPU: training steps and decoding under autocast where the CPU computes bf16 natively (AVX-512
BF16 or AMX), refused in one line where it does not."""
from __future__ import annotations

import math

import pytest
import torch
from timm.layers import Conv2dSame

from capkit.cli import train as train_cli
from capkit.data import load_split
from capkit.engine.device import cpu_has_native_bf16
from capkit.pretrained import TrainedCaptioner
from toys import TINY_SHAPES_CONFIG, make_trainer

native = pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16 (AVX-512 BF16 or AMX)")


@native
def test_bf16_training_steps_lower_the_loss_in_finite_numbers():
    trainer = make_trainer(amp="bf16")
    assert trainer.amp_dtype is torch.bfloat16
    batch = next(iter(trainer.train_loader))
    trainer.model.train()
    losses = [trainer.train_step(batch) for _ in range(8)]  # one batch, eight steps: the loss must fall
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.8 * losses[0], losses
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # autocast: fp32 weights


@native
def test_bf16_decoding_gives_the_fp32_captions_for_most_images(tiny_run):
    model = TrainedCaptioner.from_checkpoint(tiny_run.best)
    images = [r.open() for r in load_split({"name": "shapes", "num_train": 12, "num_val": 4, "num_test": 40,
                                            "image_size": 64}, "test").records]
    fp32 = model.caption(images)
    model.config.eval.amp = "bf16"
    assert model.precision is torch.bfloat16
    bf16 = model.caption(images)
    agree = sum(a.caption == b.caption for a, b in zip(fp32, bf16)) / len(images)
    assert agree >= 0.9, f"bf16 and fp32 captions agree on {agree:.0%} of the images"
    assert all(r.attention.dtype == torch.float32 for r in bf16)


def test_bf16_on_a_cpu_without_it_is_refused_before_training(tmp_path, monkeypatch, capsys):
    from capkit.engine import device

    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    (tmp_path / "tiny.yaml").write_text(TINY_SHAPES_CONFIG)
    assert train_cli.main([str(tmp_path / "tiny.yaml"), f"train.output_dir={tmp_path / 'runs'}", "train.amp=bf16",
                           "train.device=cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("capkit train: error: train.amp=bf16: this CPU (") and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def _depthwise_block() -> torch.nn.Sequential:
    """expand 1x1 -> depthwise 5x5 (timm's dynamic-padding Conv2dSame, as in tf_ EfficientNets) -> depthwise 5x5
    (plain) -> depthwise 3x3 -> project 1x1."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d
    return torch.nn.Sequential(conv(4, 8, 1), Conv2dSame(8, 8, 5, stride=2, groups=8), conv(8, 8, 5, padding=2, groups=8),
                               conv(8, 8, 3, padding=1, groups=8), conv(8, 4, 1))


def test_keep_depthwise_fp32_differentiates_depthwise_convolutions_in_fp32_under_cpu_autocast_only():
    import copy
    import pickle

    from capkit.engine.cpu_amp import DepthwiseFp32OnCpu, keep_depthwise_fp32

    model, reference = _depthwise_block(), _depthwise_block()
    keys = list(model.state_dict())
    assert keep_depthwise_fp32(model) == 2 and keep_depthwise_fp32(model) == 0  # twice changes nothing more
    # the 5 x 5 depthwise convolutions; the 3 x 3 one is faster in bf16 (benchmarks/bench_bf16_finetune.py)
    assert [isinstance(m, DepthwiseFp32OnCpu) for m in model] == [False, True, True, False, False]
    assert isinstance(model[1], Conv2dSame) and list(model.state_dict()) == keys
    x = torch.randn(2, 4, 9, 9)
    assert torch.equal(model(x), reference(x))  # outside autocast: exactly as before
    depthwise_in = reference[0](x)  # (2, 8, 9, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fp32 = model[1](depthwise_in)  # recorded by autograd: computed in fp32, handed on in bf16
        bf16 = reference[1](depthwise_in)
        with torch.no_grad():  # not recorded (evaluation): as autocast has it
            assert torch.equal(model[1](depthwise_in), bf16)
    with torch.autocast("cpu", enabled=False):
        exact = reference[1](depthwise_in.float()).to(torch.bfloat16)
    assert fp32.dtype == bf16.dtype == torch.bfloat16
    assert torch.equal(fp32, exact) and not torch.equal(bf16, exact)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x).float().sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):  # EMA's copy; torch.save of a model
        assert type(copied[1]) is type(model[1]) and torch.equal(copied(x), model(x))
    with torch.no_grad():
        model[1].weight.mul_(2)  # weights no fresh block has
    plain = _depthwise_block()
    plain.load_state_dict(model.state_dict())
    assert torch.equal(plain(x), model(x))
    model[1].weight.requires_grad_(False)  # frozen, fed by nothing that trains: autograd does not record it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model[1](depthwise_in.detach()), plain[1](depthwise_in.detach()))  # bf16, as autocast has it


def test_bf16_training_on_the_cpu_keeps_large_depthwise_convolutions_in_fp32(monkeypatch):
    from torch.utils.data import DataLoader

    from capkit.engine import Trainer, device
    from capkit.engine.cpu_amp import DepthwiseFp32OnCpu

    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)  # what the Trainer does, on any CPU
    for amp, expected in (("bf16", [False, True, True, False, False]), ("none", [False] * 5)):
        model = _depthwise_block()
        Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader([]), epochs=1, device="cpu", amp=amp)
        assert [isinstance(m, DepthwiseFp32OnCpu) for m in model] == expected, amp
