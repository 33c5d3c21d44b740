"""``tools/train.py CONFIG [key=value ...] [--resume RUN_DIR]``: train, keep the best checkpoint, test it.

``train.objective=scst train.init_from=RUN/checkpoints/best`` continues a cross-entropy run with self-critical
training on CIDEr-D (the usual second stage).

Composes config -> data -> builder -> Trainer + hooks, as detectron2's ``do_train`` does; the trainer itself
never reads the config. Works alone or under ``torchrun --nproc_per_node N`` (DistributedDataParallel).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist
from omegaconf import DictConfig

from capkit.builder import build_captioner
from capkit.config import ConfigError, load_config, save_config, to_container
from capkit.data import (
    DatasetNotFoundError,
    ImageRecord,
    MissingImagesError,
    Vocabulary,
    build_eval_loader,
    build_train_loader,
    load_split,
    tokenize,
)
from capkit.engine import (
    CheckpointHook,
    Criterion,
    CrossEntropyCriterion,
    EarlyStoppingHook,
    EncoderFinetuneHook,
    EvalHook,
    LoggingHook,
    LRSchedulerHook,
    SelfCriticalCriterion,
    Trainer,
    build_optimizer,
    build_scheduler,
    destroy_distributed,
    load_optimizer_moments,
    init_distributed,
    load_checkpoint,
    seed_everything,
)
from capkit.evaluation import CaptionEvaluator, build_reward, run_evaluation
from capkit.models.captioner import Captioner
from capkit.models.encoders.timm_encoder import WeightsUnavailableError

log = logging.getLogger("capkit.train")

CHECKPOINT_EVERY_STEPS = 200  # step checkpoints let a killed run resume inside an epoch
OBJECTIVES = ("xent", "scst")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="capkit train",
        description="Train a captioner from a YAML config, evaluate the best checkpoint on the test split.",
    )
    parser.add_argument("config", help="experiment YAML, e.g. configs/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="dot-list overrides, e.g. train.lr=1e-4 model.attention.name=none")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    parser.add_argument("--samples", type=int, default=5, help="test images whose captions are printed at the end")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        run(cfg, config_path=Path(args.config), resume=Path(args.resume) if args.resume else None, samples=args.samples)
    except (ConfigError, DatasetNotFoundError, MissingImagesError, FileNotFoundError, WeightsUnavailableError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def run(cfg: DictConfig, *, config_path: Path, resume: Path | None = None, samples: int = 5) -> Path:
    """Train ``cfg``; returns the run directory."""
    t, d, e = cfg.train, cfg.data, cfg.eval
    if t.objective not in OBJECTIVES:
        raise ConfigError(f"train.objective is {t.objective!r}; choose one of {', '.join(OBJECTIVES)}")
    dist_info = init_distributed(t.device)
    try:
        seed_everything(t.seed)
        run_dir = resume or Path(t.output_dir) / (t.run_name or f"{config_path.stem}-{time.strftime('%Y%m%d-%H%M%S')}")
        dataset = to_container(d.dataset)
        train_split = load_split(dataset, "train", skip_missing_images=d.skip_missing_images)  # fail fast on data
        val_split = load_split(dataset, "val", skip_missing_images=d.skip_missing_images)
        checkpoint = load_checkpoint(run_dir / "checkpoints" / "last") if resume else None
        initial = load_checkpoint(t.init_from) if t.init_from and checkpoint is None else None
        if checkpoint is not None:
            _check_same_config(checkpoint["config"], cfg, resume)
            vocab = Vocabulary(checkpoint["vocab"])
        elif initial is not None:
            vocab = Vocabulary(initial["vocab"])
        else:
            vocab = Vocabulary.build((c for r in train_split.records for c in r.captions), d.vocab_min_count, d.vocab_max_size)
        model = build_captioner(to_container(cfg.model), len(vocab))
        if initial is not None:
            _load_initial_weights(model, initial["model"], t.init_from)
        criterion = _criterion(cfg, train_split.records, vocab)  # before the feature cache: config errors first
        if dist_info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir / "config.yaml")
            vocab.save(run_dir / "vocab.json")
            log.info("run %s: %s, vocabulary %d words, %d trainable parameters", run_dir, _describe(cfg), len(vocab),
                     sum(p.numel() for p in model.parameters() if p.requires_grad))

        loader_kwargs = dict(
            cache_dir=d.cache_dir, skip_corrupt_images=d.skip_corrupt_images, num_workers=d.num_workers,
            device=dist_info.device,
        )
        # encoder fine-tuning needs images; otherwise a frozen encoder's features come from the cache
        cache = d.cache_features and t.finetune_encoder_from_epoch is None
        with _rank_zero_first(dist_info.world_size, dist_info.is_main):  # rank 0 extracts the feature cache
            train_loader = build_train_loader(
                train_split, model.encoder, vocab, batch_size=t.batch_size, max_caption_len=d.max_caption_len,
                augment=d.augment, cache_features=cache, seed=t.seed, rank=dist_info.rank,
                world_size=dist_info.world_size, per_image=t.objective == "scst", **loader_kwargs,
            )
            val_loader = build_eval_loader(
                val_split, model.encoder, batch_size=e.batch_size, max_images=e.max_images, cache_features=cache,
                **loader_kwargs,
            )

        evaluator = CaptionEvaluator(list(e.metrics))
        decoding = dict(beam_size=e.beam_size, max_len=e.max_len, length_penalty=e.length_penalty)

        def evaluate(m: Captioner) -> dict[str, float]:
            return run_evaluation(m, val_loader, evaluator, decode=vocab.decode, **decoding)

        optimizer = build_optimizer(model, lr=t.lr, encoder_lr=t.encoder_lr, weight_decay=t.weight_decay)
        if initial is not None and not load_optimizer_moments(optimizer, initial["optimizer"]):
            log.info("train.init_from: the optimizer state does not fit this run's trainable parameters; fresh state")
        scheduler = build_scheduler(
            optimizer, t.scheduler, epochs=t.epochs, factor=t.lr_decay, patience=t.lr_patience, mode="max"
        )
        hooks = []
        if t.finetune_encoder_from_epoch is not None:
            hooks.append(EncoderFinetuneHook(t.finetune_encoder_from_epoch))
        hooks.append(EvalHook(evaluate, every_epochs=e.every_epochs))
        if scheduler is not None:
            hooks.append(LRSchedulerHook(scheduler, metric=t.early_stop_metric))
        hooks += [
            EarlyStoppingHook(t.early_stop_metric, t.patience),
            LoggingHook(run_dir),
            CheckpointHook(
                run_dir, metric=t.early_stop_metric, every_steps=CHECKPOINT_EVERY_STEPS,
                config=to_container(cfg), vocab=vocab.itos,
            ),
        ]
        trainer = Trainer(
            model, optimizer, train_loader, epochs=t.epochs, hooks=hooks, device=dist_info.device,
            grad_clip=t.grad_clip, amp=t.amp, channels_last=t.channels_last,
            criterion=criterion, max_steps=t.max_steps,
        )
        if checkpoint is not None:
            trainer.load_state_dict(checkpoint)
            log.info("resumed at epoch %d, step %d", trainer.epoch, trainer.global_step)
        started = time.perf_counter()
        trainer.fit()
        if dist_info.is_main:
            seconds = time.perf_counter() - started
            log.info("training took %.1f s%s", seconds, f" ({trainer.stop_reason})" if trainer.stop_reason else "")
            _write_summary(run_dir, seconds, trainer)
            _test_best(cfg, run_dir, trainer.module, vocab, evaluator, decoding, loader_kwargs, samples)
        return run_dir
    finally:
        destroy_distributed()


def _test_best(cfg, run_dir: Path, model: Captioner, vocab: Vocabulary, evaluator: CaptionEvaluator,
               decoding: dict, loader_kwargs: dict, samples: int) -> None:
    """Score the best checkpoint on the test split; write test_metrics.json, captions and a few samples."""
    best = run_dir / "checkpoints" / "best"
    if (best / "model.safetensors").is_file():
        model.load_state_dict(load_checkpoint(best)["model"])
    else:
        log.warning("no best checkpoint (no evaluation ran): testing the last weights")
    try:
        test = load_split(to_container(cfg.data.dataset), "test", skip_missing_images=cfg.data.skip_missing_images)
    except MissingImagesError as err:
        log.warning("test split skipped: %s. Score it later with tools/evaluate.py --checkpoint %s", err, best)
        return
    cache = cfg.data.cache_features and cfg.train.finetune_encoder_from_epoch is None
    loader = build_eval_loader(test, model.encoder, batch_size=cfg.eval.batch_size, cache_features=cache, **loader_kwargs)
    metrics = run_evaluation(model, loader, evaluator, decode=vocab.decode, **decoding)
    (run_dir / "test_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    evaluator.save(run_dir / "test_captions.json", run_dir / "test_per_image.json")
    print(f"\ntest split ({len(test.records)} images), beam {decoding['beam_size']}:")
    for key, value in metrics.items():
        print(f"  {key:<10} {value:.4f}")
    shown = list(evaluator.hypotheses)[:samples]
    if shown:
        print("\nsample captions (generated | first reference):")
        for image_id in shown:
            print(f"  {image_id}: {evaluator.hypotheses[image_id]} | {evaluator.references[image_id][0]}")


def _criterion(cfg: DictConfig, records: list[ImageRecord], vocab: Vocabulary) -> Criterion:
    """Cross-entropy, or self-critical training rewarded against the training references (``scst_reward``)."""
    t = cfg.train
    if t.objective == "xent":
        return CrossEntropyCriterion(dict(t.aux_loss_weights), label_smoothing=t.label_smoothing)
    references = {r.image_id: [" ".join(tokenize(c)) for c in r.captions] for r in records}
    try:
        score = build_reward(dict(t.scst_reward), references)
    except ValueError as err:
        raise ConfigError(f"train.scst_reward: {err}") from err

    def reward(image_ids: list[str], words: list[list[int]]) -> list[float]:  # <unk> stays, and matches nothing
        return score(image_ids, [" ".join(vocab.itos[w] for w in ws) for ws in words])

    return SelfCriticalCriterion(reward, num_samples=t.scst_samples, max_len=cfg.data.max_caption_len)


def _load_initial_weights(model: Captioner, weights: dict, path: str) -> None:
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        detail = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise ConfigError(
            f"train.init_from={path}: its weights do not fit this config's model ({detail}); use the model "
            f"section of the config that trained it"
        ) from err


def _write_summary(run_dir: Path, seconds: float, trainer: Trainer) -> None:
    """``train_summary.json``: training wall time (summed over resumed sessions), position, stop reason."""
    path = run_dir / "train_summary.json"
    before = json.loads(path.read_text())["train_seconds"] if path.is_file() else 0.0
    summary = {
        "train_seconds": before + seconds, "epochs_done": trainer.epoch, "global_step": trainer.global_step,
        "stop_reason": trainer.stop_reason,
    }
    path.write_text(json.dumps(summary, indent=2) + "\n")


def _check_same_config(saved: dict, cfg: DictConfig, run_dir: Path) -> None:
    ignored = {"train": {"epochs", "max_steps"}}  # a resumed run may be extended
    current = to_container(cfg)
    for section in ("model", "data", "train", "eval"):
        for key in set(saved[section]) | set(current[section]):
            if key in ignored.get(section, ()):
                continue
            if saved[section].get(key) != current[section].get(key):
                raise ConfigError(
                    f"--resume {run_dir}: {section}.{key} is {current[section].get(key)!r} but the run was trained with "
                    f"{saved[section].get(key)!r}; resume with the run's own config ({run_dir / 'config.yaml'})"
                )


def _describe(cfg: DictConfig) -> str:
    m = cfg.model
    return f"{m.encoder.get('model_name', m.encoder.name)} + {m.attention.name} + {m.decoder.name}"


@contextmanager
def _rank_zero_first(world_size: int, is_main: bool) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. extracting the feature cache), then the other ranks."""
    if world_size > 1 and not is_main:
        dist.barrier()
    yield
    if world_size > 1 and is_main:
        dist.barrier()


if __name__ == "__main__":
    sys.exit(main())
