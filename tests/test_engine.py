"""Engine unit tests: loss, device/AMP choice, optimizer and schedules, checkpoints, the loop and its hooks."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.data import DataLoader

from capkit.errors import DeviceUnavailableError, TrainingDivergedError
from capkit.engine import (
    BestCheckpointHook,
    EarlyStoppingHook,
    EncoderFinetuneHook,
    EvalHook,
    Hook,
    LoggingHook,
    LRSchedulerHook,
    PeriodicCheckpointHook,
    ProgressBarHook,
    build_optimizer,
    build_scheduler,
    caption_loss,
    init_distributed,
    load_checkpoint,
    resolve_amp_dtype,
    resolve_device,
    save_checkpoint,
)
from capkit.engine import checkpoint as checkpoint_module
from capkit.types import BOS_ID, EOS_ID, PAD_ID, DecoderOutput
from toys import ToyData, make_trainer, tiny_model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and the test machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Recorder(Hook):
    def __init__(self):
        self.events: list[tuple] = []

    def before_train(self, trainer):
        self.events.append(("before_train",))

    def before_epoch(self, trainer):
        self.events.append(("before_epoch", trainer.epoch))

    def after_step(self, trainer, loss):
        self.events.append(("after_step", trainer.global_step))

    def after_epoch(self, trainer):
        self.events.append(("after_epoch", trainer.epoch))

    def after_eval(self, trainer, metrics):
        self.events.append(("after_eval", trainer.epoch, metrics))

    def after_train(self, trainer):
        self.events.append(("after_train", type(trainer.error).__name__ if trainer.error else None))


# --- loss ---------------------------------------------------------------------------------------------------


def test_caption_loss_is_mean_cross_entropy_over_non_pad_targets_plus_weighted_aux():
    g = torch.Generator().manual_seed(0)
    captions = torch.tensor([[BOS_ID, 5, 6, EOS_ID], [BOS_ID, 7, EOS_ID, PAD_ID]])
    logits = torch.randn(2, 3, 20, generator=g)
    out = DecoderOutput(logits, torch.ones(2, 3, 4) / 4, {"doubly_stochastic": torch.tensor(2.0)})
    logp = logits.log_softmax(-1)
    targets = [(0, 0, 5), (0, 1, 6), (0, 2, EOS_ID), (1, 0, 7), (1, 1, EOS_ID)]  # the pad target is left out
    ce = -sum(logp[b, t, w] for b, t, w in targets) / len(targets)
    total, parts = caption_loss(out, captions, aux_loss_weights={"doubly_stochastic": 0.5})
    assert parts["ce"].item() == pytest.approx(ce.item(), abs=1e-6)
    assert total.item() == pytest.approx(ce.item() + 0.5 * 2.0, abs=1e-6)
    smoothed, _ = caption_loss(out, captions, aux_loss_weights={"doubly_stochastic": 0.0}, label_smoothing=0.1)
    uniform = -sum(logp[b, t].mean() for b, t, _ in targets) / len(targets)
    assert smoothed.item() == pytest.approx(0.9 * ce.item() + 0.1 * uniform.item(), abs=1e-6)


def test_caption_loss_needs_a_weight_for_every_returned_aux_loss():
    out = DecoderOutput(torch.zeros(1, 2, 20), torch.ones(1, 2, 4) / 4, {"doubly_stochastic": torch.tensor(1.0)})
    captions = torch.tensor([[BOS_ID, 5, EOS_ID]])
    with pytest.raises(ValueError, match=r"no weight for \['doubly_stochastic'\].*doubly_stochastic: 1.0"):
        caption_loss(out, captions, aux_loss_weights={})
    with pytest.raises(ValueError, match=r"no weight for \['doubly_stochastic'\]"):
        caption_loss(out, captions, aux_loss_weights={"doubly_stochastc": 1.0})  # a typo


def test_weights_of_losses_a_decoder_does_not_return_are_unused():
    out = DecoderOutput(torch.zeros(1, 2, 20), torch.ones(1, 2, 4) / 4, {})  # e.g. the luong decoder
    captions = torch.tensor([[BOS_ID, 5, EOS_ID]])
    total, parts = caption_loss(out, captions, aux_loss_weights={"doubly_stochastic": 1.0})
    assert set(parts) == {"ce"} and total.item() == pytest.approx(parts["ce"].item())


# --- device and AMP -----------------------------------------------------------------------------------------


def test_device_and_amp_choice(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_amp_dtype("auto", cpu) is None and resolve_amp_dtype("none", cpu) is None
    from capkit.engine import device as device_module

    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: True)
    assert resolve_amp_dtype("bf16", cpu) is torch.bfloat16
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: False)  # AVX2 only: bf16 is emulated
    with pytest.raises(DeviceUnavailableError, match=r"^eval.amp=bf16: this CPU \(.+\) has no native bf16 arithmetic "
                       r"\(AVX-512 BF16 or AMX\), where torch emulates it more slowly than fp32; use eval.amp=none$"):
        resolve_amp_dtype("bf16", cpu, key="eval.amp")
    with pytest.raises(ValueError, match="amp=fp16 needs a CUDA device"):
        resolve_amp_dtype("fp16", cpu)
    with pytest.raises(ValueError, match="amp must be one of auto, bf16, fp16, none, got 'half'"):
        resolve_amp_dtype("half", cpu)
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_amp_dtype("auto", cuda) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_amp_dtype("auto", cuda) is torch.float16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == cpu
    with pytest.raises(RuntimeError, match="'cuda:1' was asked for but CUDA is not available"):
        resolve_device("cuda:1")


# --- optimizer and schedules --------------------------------------------------------------------------------


def test_build_optimizer_puts_the_trainable_encoder_in_its_own_group():
    frozen = build_optimizer(tiny_model("none"), lr=1e-3)
    assert [g["name"] for g in frozen.param_groups] == ["decoder"]
    model = tiny_model("last")
    opt = build_optimizer(model, lr=1e-3, encoder_lr=1e-4, weight_decay=0.1)
    decoder, encoder = opt.param_groups
    assert (decoder["name"], decoder["lr"], encoder["name"], encoder["lr"]) == ("decoder", 1e-3, "encoder", 1e-4)
    assert {id(p) for p in encoder["params"]} == {id(p) for p in model.encoder.parameters() if p.requires_grad}
    assert {id(p) for p in decoder["params"]} == {id(p) for p in model.decoder.parameters()}
    assert encoder["weight_decay"] == 0.1


def test_build_scheduler():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert build_scheduler(opt, "none", epochs=4) is None
    cosine = build_scheduler(opt, "cosine", epochs=4)
    for _ in range(4):
        opt.step()
        cosine.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    plateau = build_scheduler(opt, "plateau", epochs=4, factor=0.5, patience=0, mode="max")
    opt.param_groups[0]["lr"] = 1.0
    plateau.step(1.0)
    plateau.step(0.5)  # worse, patience 0: halve
    assert opt.param_groups[0]["lr"] == 0.5
    with pytest.raises(ValueError, match="unknown scheduler 'step'; choose one of plateau, cosine, warmup_cosine, none"):
        build_scheduler(opt, "step", epochs=4)
    with pytest.raises(ValueError, match="needs the validation metric"):
        LRSchedulerHook(plateau)


def test_warmup_cosine_rises_linearly_then_decays_to_zero_step_by_step():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    schedule = build_scheduler(opt, "warmup_cosine", epochs=2, steps_per_epoch=5, warmup_steps=4)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(10):
        opt.step()
        schedule.step()
        lrs.append(opt.param_groups[0]["lr"])
    # warm-up: 2 * (s + 1) / 4 for steps 0..3; then 2 * (1 + cos(pi * (s - 4) / 6)) / 2 down to 0 at step 10
    expected = [0.5, 1.0, 1.5, 2.0] + [1.0 + math.cos(math.pi * k / 6) for k in range(7)]
    assert lrs == pytest.approx(expected)
    with pytest.raises(ValueError, match="warmup_cosine schedule needs the number of steps per epoch"):
        build_scheduler(opt, "warmup_cosine", epochs=2)


def test_a_per_step_schedule_moves_the_learning_rate_at_every_step():
    trainer = make_trainer(epochs=1)  # 16 captions, batches of 4: 4 steps
    schedule = build_scheduler(trainer.optimizer, "warmup_cosine", epochs=1, steps_per_epoch=4, warmup_steps=2)
    trainer.hooks.append(LRSchedulerHook(schedule, per_step=True))
    trainer.fit()
    assert trainer.global_step == 4 and schedule.last_epoch == 4
    assert all(g["lr"] == pytest.approx(0.0, abs=1e-12) for g in trainer.optimizer.param_groups)


# --- checkpoints --------------------------------------------------------------------------------------------


def _state(version: int) -> dict:
    return {
        "model": {"w": torch.full((2, 3), float(version)), "n": torch.tensor(version)},
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "m": torch.ones(2, dtype=torch.float64)}},
                      "param_groups": [{"params": [0], "betas": (0.9, 0.999), "lr": 1e-3}]},
        "rng": [torch.ByteTensor([1, 2, 3]), [4, 5]],
        "best": math.inf, "none": None, "flag": True, "version": version,
    }


def test_checkpoint_round_trip(tmp_path):
    save_checkpoint(tmp_path / "last", _state(1))
    loaded = load_checkpoint(tmp_path / "last")
    assert sorted(p.name for p in (tmp_path / "last").iterdir()) == ["model.safetensors", "state.json", "state.safetensors"]
    assert torch.equal(loaded["model"]["w"], torch.ones(2, 3)) and loaded["model"]["n"].item() == 1
    opt = loaded["optimizer"]
    assert list(opt["state"]) == [0]  # int keys survive JSON
    assert opt["state"][0]["m"].dtype == torch.float64 and torch.equal(opt["state"][0]["step"], torch.tensor(3.0))
    assert opt["param_groups"] == [{"params": [0], "betas": [0.9, 0.999], "lr": 1e-3}]  # tuples come back as lists
    assert torch.equal(loaded["rng"][0], torch.ByteTensor([1, 2, 3])) and loaded["rng"][1] == [4, 5]
    assert (loaded["best"], loaded["none"], loaded["flag"], loaded["version"]) == (math.inf, None, True, 1)
    with pytest.raises(TypeError, match=r"cannot store object at 'extra.0' .*nothing that would need pickle"):
        save_checkpoint(tmp_path / "bad", {**_state(1), "extra": [object()]})
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad.tmp-*"))
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*missing"):
        load_checkpoint(tmp_path / "missing")


def test_checkpoint_survives_failed_and_interrupted_saves(tmp_path, monkeypatch):
    path = tmp_path / "last"
    save_checkpoint(path, _state(1))
    real_save_file = checkpoint_module.save_file

    def crash_after_model(tensors, filename, metadata=None):
        if filename.endswith("state.safetensors"):
            raise OSError("disk full")
        real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint_module, "save_file", crash_after_model)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, _state(2))
    monkeypatch.undo()
    assert load_checkpoint(path)["version"] == 1 and sorted(os.listdir(tmp_path)) == ["last"]
    # a kill between the two renames leaves only last.old, which load_checkpoint falls back to
    os.replace(path, tmp_path / "last.old")
    (tmp_path / ".last.tmp-killed").mkdir()  # and a kill mid-write leaves a temporary directory
    assert load_checkpoint(path)["version"] == 1
    save_checkpoint(path, _state(3))
    assert load_checkpoint(path)["version"] == 3 and sorted(os.listdir(tmp_path)) == ["last"]


def test_checkpoint_survives_sigkill_during_saves(tmp_path):
    """A process saving in a loop is SIGKILLed at arbitrary moments; the checkpoint always loads."""
    script = (
        "import sys, torch\nfrom capkit.engine.checkpoint import save_checkpoint\n"
        "for v in range(10**6):\n"
        "    save_checkpoint(sys.argv[1], {'model': {'w': torch.full((256, 1024), float(v))}, 'v': v})\n"
        "    print(v, flush=True)\n"
    )
    path = tmp_path / "last"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, text=True, env=env)
    for _ in range(3):
        proc.stdout.readline()  # saves are under way
    time.sleep(0.017)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    state = load_checkpoint(path)
    assert state["v"] >= 2 and torch.equal(state["model"]["w"], torch.full((256, 1024), float(state["v"])))


# --- the loop -----------------------------------------------------------------------------------------------


def test_hook_events_in_order_and_eval_period():
    rec = Recorder()
    metrics = iter([{"score": 1.0}, {"score": 2.0}])
    trainer = make_trainer([EvalHook(lambda m: next(metrics), every_epochs=2), rec], n=8, epochs=3)
    trainer.fit()
    assert rec.events == [
        ("before_train",),
        ("before_epoch", 0), ("after_step", 1), ("after_step", 2), ("after_epoch", 0),
        ("before_epoch", 1), ("after_step", 3), ("after_step", 4), ("after_eval", 1, {"score": 1.0}), ("after_epoch", 1),
        ("before_epoch", 2), ("after_step", 5), ("after_step", 6), ("after_eval", 2, {"score": 2.0}), ("after_epoch", 2),
        ("after_train", None),
    ]
    assert (trainer.epoch, trainer.global_step) == (3, 6)


def test_eval_runs_in_eval_mode_without_grad_and_leaves_the_rng_alone():
    seen = []

    def evaluate(model):
        seen.append((model.training, torch.is_grad_enabled()))
        torch.rand(100)  # must not shift the training's random numbers
        return {"score": 1.0}

    plain = make_trainer(epochs=2)
    plain.fit()
    evaluated = make_trainer([EvalHook(evaluate)], epochs=2)
    evaluated.fit()
    assert seen == [(False, False), (False, False)]
    for key, value in plain.module.state_dict().items():
        assert torch.equal(value, evaluated.module.state_dict()[key]), key


class WeightsAfterEachStep(Hook):
    def __init__(self):
        self.weights: list[dict[str, torch.Tensor]] = []

    def after_step(self, trainer, loss):
        self.weights.append({k: v.clone() for k, v in trainer.module.state_dict().items()})


def test_ema_averages_the_trained_weights_with_a_warming_decay_and_is_what_is_evaluated_and_saved(tmp_path):
    trained, evaluated = WeightsAfterEachStep(), []
    trainer = make_trainer(
        [trained, EvalHook(lambda m: evaluated.append(m) or {"score": 1.0}), PeriodicCheckpointHook(tmp_path)],
        n=12, epochs=1, ema_decay=0.5,
    )
    trainer.fit()
    # the update after step k uses decay 0 (a copy) at k = 1, then min(cap, 1 - k ** -0.75): 0.4054, then 0.5
    decays = [0.0, 1 - 2**-0.75, 0.5]
    expected = {k: v.clone() for k, v in trained.weights[0].items()}
    for decay, weights in zip(decays, trained.weights):
        for key, value in weights.items():
            if value.is_floating_point():
                expected[key] = decay * expected[key] + (1 - decay) * value
    averaged, final = trainer.eval_module.state_dict(), trainer.module.state_dict()
    moved = 0
    for key, value in expected.items():
        torch.testing.assert_close(averaged[key], value, rtol=0, atol=1e-6, msg=key)
        moved += not torch.equal(averaged[key], final[key])
    assert moved > 0  # the average is not the last weights
    assert evaluated == [trainer.eval_module] and trainer.eval_module is not trainer.module
    saved = load_checkpoint(tmp_path / "checkpoints" / "last")
    for key, value in averaged.items():
        assert torch.equal(saved["model"][key], value) and torch.equal(saved["training_model"][key], final[key]), key


def test_a_checkpoint_without_an_average_starts_one_from_its_weights():
    plain = make_trainer(epochs=1)
    plain.fit()
    averaged = make_trainer(epochs=1, ema_decay=0.9)
    averaged.load_state_dict(plain.state_dict())
    for key, value in plain.module.state_dict().items():
        assert torch.equal(averaged.module.state_dict()[key], value) and torch.equal(
            averaged.eval_module.state_dict()[key], value), key
    with pytest.raises(ValueError, match=r"ema_decay must be in \(0, 1\), got 1"):
        make_trainer(ema_decay=1)


def test_same_seed_same_weights_and_different_seed_differs():
    w = []
    for seed in (3, 3, 4):
        trainer = make_trainer(seed=seed)  # seeds, then builds
        trainer.fit()
        w.append(trainer.module.decoder.out.weight)
    assert torch.equal(w[0], w[1]) and not torch.equal(w[0], w[2])


def test_non_finite_loss_names_epoch_and_step_and_after_train_still_runs():
    rec = Recorder()
    trainer = make_trainer([rec], n=16, epochs=2)

    class PoisonAtStep(Hook):
        def after_step(self, trainer, loss):
            if trainer.global_step == 5:
                with torch.no_grad():
                    trainer.module.decoder.out.bias.fill_(math.nan)

    trainer.hooks.insert(0, PoisonAtStep())
    with pytest.raises(TrainingDivergedError, match=r"training diverged: non-finite loss nan at epoch 1, global step 6 "
                       r"\(parts: .*\); lower train\.lr, set train\.grad_clip"):
        trainer.fit()
    assert rec.events[-1] == ("after_train", "TrainingDivergedError")


def test_max_steps_stops_mid_epoch_and_saves_last(tmp_path):
    trainer = make_trainer([PeriodicCheckpointHook(tmp_path)], n=16, epochs=3, max_steps=6)
    trainer.fit()
    assert (trainer.epoch, trainer.batch_in_epoch, trainer.global_step) == (1, 2, 6)
    last = load_checkpoint(tmp_path / "checkpoints" / "last")
    assert (last["epoch"], last["batch_in_epoch"], last["global_step"]) == (1, 2, 6)
    assert not (tmp_path / "checkpoints" / "best").exists()


def test_a_run_stopped_by_max_steps_inside_an_epoch_is_evaluated_and_keeps_its_best(tmp_path):
    evaluations = []  # the score improves at every evaluation
    hooks = [EvalHook(lambda m: evaluations.append(1) or {"score": len(evaluations)}),
             PeriodicCheckpointHook(tmp_path), BestCheckpointHook(tmp_path, metric="score")]
    trainer = make_trainer(hooks, n=16, epochs=3, max_steps=6)  # one epoch is 4 steps: stops at step 2 of epoch 1
    trainer.fit()
    assert len(evaluations) == 2  # after epoch 0, and at the stop
    best = load_checkpoint(tmp_path / "checkpoints" / "best")
    assert (best["epoch"], best["batch_in_epoch"], best["global_step"]) == (1, 2, 6)


def test_max_steps_on_an_epochs_last_batch_still_ends_the_epoch(tmp_path):
    evaluations = []
    hooks = [EvalHook(lambda m: evaluations.append(1) or {"score": 1.0}), BestCheckpointHook(tmp_path, metric="score")]
    trainer = make_trainer(hooks, n=16, epochs=3, max_steps=4)  # 16 samples / batch 4: one epoch is 4 steps
    trainer.fit()
    assert (trainer.epoch, trainer.batch_in_epoch, trainer.global_step) == (1, 0, 4)
    assert evaluations == [1] and (tmp_path / "checkpoints" / "best").is_dir()


def test_checkpoint_hooks_must_be_last_and_hook_names_unique(tmp_path):
    for hooks in ([PeriodicCheckpointHook(tmp_path), Recorder()],
                  [BestCheckpointHook(tmp_path, metric="x"), Recorder(), PeriodicCheckpointHook(tmp_path)]):
        with pytest.raises(ValueError, match="the checkpoint hooks must come after every other hook"):
            make_trainer(hooks).fit()
    with pytest.raises(ValueError, match="hook names must be unique"):
        make_trainer([Recorder(), Recorder()])


def test_early_stopping_and_best_checkpoint(tmp_path):
    scores = iter([0.5, 0.7, 0.6, 0.6, 0.9])
    trainer = make_trainer(
        [EvalHook(lambda m: {"cider": next(scores)}), EarlyStoppingHook("cider", patience=2),
         PeriodicCheckpointHook(tmp_path), BestCheckpointHook(tmp_path, metric="cider")],
        n=4, epochs=5,
    )
    trainer.fit()
    assert trainer.epoch == 4  # stopped after the 4th evaluation: 0.6, 0.6 did not beat 0.7
    assert trainer.stop_reason == "early stopping: cider has not improved on 0.7 for 2 evaluations"
    best = load_checkpoint(tmp_path / "checkpoints" / "best")
    assert (best["epoch"], best["hooks"]["BestCheckpointHook"]["best"]) == (2, 0.7)
    assert load_checkpoint(tmp_path / "checkpoints" / "last")["epoch"] == 4
    with pytest.raises(KeyError, match=r"EarlyStoppingHook watches metric 'bleu4', but the evaluation returned only \['cider'\]"):
        make_trainer([EvalHook(lambda m: {"cider": 1.0}), EarlyStoppingHook("bleu4", 1)], n=4, epochs=1).fit()


def test_encoder_finetune_hook_unfreezes_the_encoder_group_at_its_epoch():
    state = []

    class Watch(Hook):
        def after_step(self, trainer, loss):
            enc = trainer.module.encoder
            state.append((trainer.epoch, enc.frozen, enc.training))

    trainer = make_trainer([EncoderFinetuneHook(from_epoch=1), Watch()], n=4, epochs=2, finetune="last", images=True)
    before = {k: v.clone() for k, v in trainer.module.encoder.state_dict().items()}
    trainer.fit()
    assert state == [(0, True, False), (1, False, True)]
    changed = [k for k, v in trainer.module.encoder.state_dict().items() if not torch.equal(v, before[k])]
    assert changed  # trained (and its batch-norm statistics moved) in epoch 1 only
    with pytest.raises(ValueError, match="encoder fine-tuning from epoch 1 .* no 'encoder' group"):
        make_trainer([EncoderFinetuneHook(from_epoch=1)], n=4, epochs=1).fit()


def test_logging_hook_writes_metrics_jsonl_and_tensorboard(tmp_path):
    trainer = make_trainer(
        [EvalHook(lambda m: {"cider": 0.25}), LoggingHook(tmp_path, every_steps=2)], n=8, epochs=2, grad_clip=1.0
    )
    trainer.fit()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(x["step"], x["epoch"]) for x in lines] == [(2, 0), (2, 0), (4, 1), (4, 1)]
    step, val = lines[0], lines[1]
    assert set(step) == {"step", "epoch", "loss", "loss/ce", "loss/doubly_stochastic", "lr", "captions_s"}
    assert all(x["captions_s"] > 0 for x in lines[::2])  # 2 steps of 4 captions per line
    assert step["loss"] == pytest.approx(step["loss/ce"] + step["loss/doubly_stochastic"]) and step["lr"] == 1e-2
    assert val == {"step": 2, "epoch": 0, "val/cider": 0.25}
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_bf16_autocast_trains_on_cpu():
    trainer = make_trainer(n=8, epochs=1, amp="bf16")
    assert trainer.amp_dtype is torch.bfloat16 and not trainer.scaler.is_enabled()
    before = trainer.module.decoder.out.weight.clone()
    trainer.fit()
    assert math.isfinite(trainer.loss_parts["ce"]) and not torch.equal(before, trainer.module.decoder.out.weight)


def test_grad_scaler_path_matches_unscaled_training_and_is_checkpointed(tmp_path):
    """The fp16 path (scale, unscale for clipping, step, update) on a CPU GradScaler: scaling by a power of
    two is exact, so the weights equal an unscaled run's."""
    plain = make_trainer(n=8, epochs=1, grad_clip=0.5)
    plain.fit()
    scaled = make_trainer([PeriodicCheckpointHook(tmp_path)], n=8, epochs=1, grad_clip=0.5)
    scaled.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1)
    scaled.fit()
    for key, value in plain.module.state_dict().items():
        assert torch.equal(value, scaled.module.state_dict()[key]), key
    assert scaled.scaler.get_scale() == 2.0**14  # grew after each of the 2 steps
    resumed = make_trainer(n=8, epochs=1)
    resumed.scaler = torch.amp.GradScaler("cpu")
    resumed.resume(tmp_path / "checkpoints" / "last")
    assert resumed.scaler.get_scale() == 2.0**14 and (resumed.epoch, resumed.global_step) == (1, 2)


def test_progress_bar_shows_loss_and_throughput(capsys):
    make_trainer([ProgressBarHook()], n=8, epochs=1).fit()
    err = capsys.readouterr().err
    assert "epoch 0" in err and "loss=" in err and "captions_s=" in err and "2/2" in err


def test_resume_inside_an_epoch_warns_when_the_order_cannot_repeat(tmp_path):
    make_trainer([PeriodicCheckpointHook(tmp_path)], n=16, epochs=1, max_steps=2).fit()
    trainer = make_trainer(n=16, epochs=1)
    trainer.train_loader = DataLoader(ToyData(16), batch_size=4, shuffle=True, collate_fn=ToyData(16).collate)
    with pytest.warns(UserWarning, match="sampler \\(RandomSampler\\) has no set_epoch.*use build_train_sampler"):
        trainer.resume(tmp_path / "checkpoints" / "last")


def test_init_distributed_without_torchrun_and_with_a_broken_environment(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = init_distributed("cpu")
    assert (info.rank, info.local_rank, info.world_size, info.device, info.is_main) == (0, 0, 1, torch.device("cpu"), True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(RuntimeError, match="WORLD_SIZE=2 but .*MASTER_PORT unset; launch with torchrun"):
        init_distributed("cpu")
