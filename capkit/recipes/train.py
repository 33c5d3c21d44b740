"""Train an experiment config end to end: prepare, build the hooks, train, test.

``train_experiment`` composes the steps, as detectron2's ``do_train`` does; each step is a function of its
own, so a plugin or a notebook can run them one by one. The trainer itself never reads the config. Works
alone or under ``torchrun --nproc_per_node N`` (DistributedDataParallel).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from capkit.builder import build_captioner
from capkit.config import ExperimentConfig, decoding_settings, save_config, to_container
from capkit.data import ImageRecord, LoadedSplit, Vocabulary, load_split, tokenize
from capkit.data.transforms import build_transform
from capkit.engine import (
    BestCheckpointHook,
    Criterion,
    CrossEntropyCriterion,
    DistInfo,
    DistributedDataParallelHook,
    EarlyStoppingHook,
    EncoderFinetuneHook,
    EvalHook,
    Hook,
    LoggingHook,
    LRSchedulerHook,
    PeriodicCheckpointHook,
    ProgressBarHook,
    RunDir,
    SelfCriticalCriterion,
    Trainer,
    build_optimizer,
    build_scheduler,
    destroy_distributed,
    init_distributed,
    load_checkpoint,
    load_optimizer_moments,
    seed_everything,
)
from capkit.engine.device import resolve_amp_dtype, resolve_device
from capkit.engine.optim import PER_STEP_SCHEDULERS
from capkit.engine.distributed import broadcast_object, rank_zero_first
from capkit.engine.monitor import CaptionSample, CaptionSamplesHook, HParamsHook, TensorBoard, flatten_hparams
from capkit.engine.run_dir import BEST, LAST
from capkit.errors import CheckpointError, ConfigError, CorruptImageError, DataError, MissingImagesError, RunDirError
from capkit.evaluation import CaptionEvaluator, build_reward, run_evaluation
from capkit.models.captioner import Captioner
from capkit.recipes.experiment import build_eval_loader_for, build_train_loader_for
from capkit.types import EOS_ID, SPECIAL_TOKENS

__all__ = [
    "OBJECTIVES",
    "Experiment",
    "prepare",
    "build_criterion",
    "build_hooks",
    "build_hparams_hook",
    "caption_samples",
    "train",
    "test",
    "train_experiment",
]

log = logging.getLogger("capkit.train")

CHECKPOINT_EVERY_STEPS = 200  # step checkpoints let a killed run resume inside an epoch
OBJECTIVES = ("xent", "scst")


@dataclass
class Experiment:
    """A run prepared from its config, before anything trains.

    Attributes:
        cfg: the resolved experiment config.
        run: the run directory (created by ``train`` on rank 0).
        dist: this process's place in the job.
        train_split, val_split: the loaded splits.
        test_split: the split the best checkpoint is scored on, or None where its images are missing.
        evaluator: scores the validation split with ``eval.metrics``.
        vocab: the vocabulary (built from the training captions, or the resumed or initial run's).
        model: the captioner, with ``train.init_from``'s weights when set.
        resumed: the checkpoint ``--resume`` continues from, or None.
        initial: ``train.init_from``'s checkpoint (its optimizer moments are still to load), or None.
    """

    cfg: DictConfig
    run: RunDir
    dist: DistInfo
    train_split: LoadedSplit
    val_split: LoadedSplit
    test_split: LoadedSplit | None
    evaluator: CaptionEvaluator
    vocab: Vocabulary
    model: Captioner
    resumed: dict[str, Any] | None = None
    initial: dict[str, Any] | None = None


def check_settings(cfg: DictConfig) -> CaptionEvaluator:
    """What a config can get wrong without data: the objective, the metrics and what they need at run time (Java,
    their libraries), and a selection metric they report. Returns the validation evaluator."""
    t, e = cfg.train, cfg.eval
    if t.objective not in OBJECTIVES:
        raise ConfigError(f"train.objective is {t.objective!r}; choose one of {', '.join(OBJECTIVES)}")
    device = resolve_device(t.device)
    resolve_amp_dtype(t.amp, device, key="train.amp")  # bf16 where the device cannot: refused now
    resolve_amp_dtype(e.amp, device, key="eval.amp")
    check_augment_views(cfg)
    check_captions_per_image(cfg)
    evaluator = CaptionEvaluator(list(e.metrics), tokenizer=e.tokenizer)
    evaluator.check_runtime()
    if not evaluator.reports(t.early_stop_metric):
        raise ConfigError(
            f"train.early_stop_metric is {t.early_stop_metric!r}, but eval.metrics {list(e.metrics)} report only "
            f"{', '.join(sorted(evaluator.keys()))}; choose one of those, or add the metric that reports it"
        )
    return evaluator


def check_augment_views(cfg: DictConfig) -> None:
    """``data.augment_views`` caches augmented features of the encoder's frozen part: it needs augmentation and a
    cache."""
    d, views = cfg.data, cfg.data.augment_views
    if views and not d.augment:
        raise ConfigError(f"data.augment_views is {views}, but data.augment is false: the views are augmented copies "
                          f"of the images; set data.augment=true, or data.augment_views=0")
    if views and not d.cache_features:
        raise ConfigError(
            f"data.augment_views is {views}, but data.cache_features is false: the views are cached features; set "
            f"data.augment_views=0 to augment the images at every step"
        )


def check_captions_per_image(cfg: DictConfig) -> None:
    """Cross-entropy batches of ``data.captions_per_image`` K captions per image hold whole images: a batch size
    that K divides, and one cached view per image (self-critical batches are one image per row already)."""
    k, t, views = cfg.data.captions_per_image, cfg.train, cfg.data.augment_views
    if k == 1 or t.objective != "xent":
        return
    if t.batch_size % k:
        raise ConfigError(
            f"train.batch_size is {t.batch_size}, but data.captions_per_image is {k}: a batch holds {k} captions of "
            f"each of its images; set train.batch_size to a multiple of {k} (e.g. {t.batch_size // k * k or k})"
        )
    if views:
        raise ConfigError(f"data.captions_per_image is {k} and data.augment_views is {views}: the two cannot be "
                          f"combined yet; set data.captions_per_image=1 or data.augment_views=0")


def prepare(cfg: DictConfig, dist: DistInfo, *, run_dir: Path, resume: bool = False) -> Experiment:
    """Seed, load the data, the vocabulary and the model, and check the config against the metrics, the
    machine and a resumed run: what can fail on the user's input fails here, before anything is written or
    trained."""
    t, d = cfg.train, cfg.data
    evaluator = check_settings(cfg)
    seed_everything(t.seed)
    run = RunDir(run_dir)
    dataset = to_container(d.dataset)
    train_split = load_split(dataset, "train", skip_missing_images=d.skip_missing_images)
    if not train_split.records:
        raise DataError(f"{train_split.data.name} train split: no images to train on")
    val_split = check_eval_split(load_split(dataset, "val", skip_missing_images=d.skip_missing_images), "val")
    try:
        test_split = check_eval_split(load_split(dataset, "test", skip_missing_images=d.skip_missing_images), "test")
    except MissingImagesError as err:
        log.warning("the test split will not be scored: %s. Score it later with capkit evaluate --checkpoint "
                    "RUN_DIR/checkpoints/best", err)
        test_split = None
    check_disjoint_splits({"train": train_split, "val": val_split, "test": test_split}, d.allow_split_overlap)
    if evaluator.wants_training_captions:
        evaluator.use_training_captions(c for r in train_split.records for c in r.captions)
    resumed = load_checkpoint(run.find_checkpoint(LAST)) if resume else None
    initial = load_checkpoint(t.init_from) if t.init_from and resumed is None else None
    if resumed is not None:
        _check_same_config(resumed["config"], cfg, run)
        vocab = Vocabulary(resumed["vocab"])
    elif initial is not None:
        vocab = Vocabulary(initial["vocab"])
        check_coverage(vocab, train_split, f"train.init_from={t.init_from}'s vocabulary",
                       "it was trained on other captions; start without train.init_from")
    else:
        captions = (c for r in train_split.records for c in r.captions)
        vocab = Vocabulary.build(captions, d.vocab_min_count, d.vocab_max_size)
        check_coverage(vocab, train_split, f"the vocabulary (data.vocab_min_count={d.vocab_min_count}, "
                       f"data.vocab_max_size={d.vocab_max_size})", "lower vocab_min_count or raise vocab_max_size")
    model = build_captioner(to_container(cfg.model), len(vocab))
    if d.augment_views and not model.encoder.cacheable:
        raise ConfigError(f"data.augment_views is {d.augment_views}, but model.encoder has no frozen part capkit can "
                          f"cache (only a frozen encoder, or a timm EfficientNet with finetune: last, has one); set "
                          f"data.augment_views=0 to augment the images at every step")
    if t.finetune_encoder_from_epoch is not None and model.encoder.frozen:
        raise ConfigError(f"train.finetune_encoder_from_epoch is {t.finetune_encoder_from_epoch}, but "
                          f"model.encoder.finetune is none: nothing in the encoder can train; set "
                          f"model.encoder.finetune=last (or all), or unset train.finetune_encoder_from_epoch")
    if initial is not None:
        _load_initial_weights(model, initial["model"], t.init_from)
    if resumed is not None:
        _check_resumed(model, resumed, run)
    return Experiment(cfg, run, dist, train_split, val_split, test_split, evaluator, vocab, model, resumed, initial)


def check_disjoint_splits(splits: dict[str, LoadedSplit | None], allowed: bool = False) -> None:
    """No image in two splits: otherwise validation and test scores are measured on training images. An image is
    its file (whatever its name: symbolic and hard links are the file), the same bytes under another file, or its
    id where it has no file. ``allowed`` (``data.allow_split_overlap``) turns the error into a warning."""
    first_split: dict[object, tuple[str, str]] = {}  # image -> (its first split, how it was named there)
    shared: list[tuple[str, str, str, str]] = []  # (name in the first split, that split, name here, this split)
    by_size: dict[int, list[tuple[Path, str]]] = {}
    for name, split in splits.items():
        for record in split.records if split is not None else ():
            stat = _stat(record)
            # a file is its device and inode (every link to it is one file); an image without one, its id
            key = (stat.st_dev, stat.st_ino) if stat else record.path.resolve() if record.path else record.image_id
            shown = str(record.path or record.image_id)
            seen = first_split.setdefault(key, (name, shown))
            if seen[0] != name:
                shared.append((seen[1], seen[0], shown, name))
            elif stat is not None and seen[1] == shown:
                by_size.setdefault(stat.st_size, []).append((record.path, name))
    # the same bytes under two files: hashed only where files of one size are in different splits
    for files in by_size.values():
        if len({split for _, split in files}) < 2:
            continue
        first_copy: dict[str, tuple[str, str]] = {}
        for path, name in files:
            seen = first_copy.setdefault(hashlib.sha256(path.read_bytes()).hexdigest(), (name, str(path)))
            if seen[0] != name:
                shared.append((seen[1], seen[0], f"{path} (the same bytes)", name))
    if not shared:
        return
    first, one, second, other = shared[0]
    same = "" if first == second else f" (there as {second})"
    message = (f"{len(shared)} images are in two splits, e.g. {first} in the {one} and the {other} split{same}: its "
               f"{other} scores would be measured on an image the model {'trained on' if one == 'train' else 'saw'}")
    if allowed:
        log.warning("%s (allowed: data.allow_split_overlap=true)", message)
        return
    raise DataError(f"{message}; remove it from one split, or set data.allow_split_overlap=true")


def _stat(record: ImageRecord) -> os.stat_result | None:
    """The image file's status, or None for an image without a file or whose file is missing."""
    if record.path is None:
        return None
    try:
        return record.path.stat()
    except OSError:
        return None


UNKNOWN_SHARE_ERROR, UNKNOWN_SHARE_WARNING = 0.5, 0.1  # of the training words that would become <unk>


def check_coverage(vocab: Vocabulary, split: LoadedSplit, what: str, remedy: str) -> None:
    """The share of the training captions' words that ``vocab`` does not know (they train as ``<unk>``): over
    half is an error, over a tenth a warning, each saying what to change."""
    words = [w for r in split.records for c in r.captions for w in tokenize(c)]
    unknown = sum(w not in vocab.stoi for w in words) / max(1, len(words))
    message = (f"{what} has {len(vocab) - len(SPECIAL_TOKENS):,} words: {unknown:.0%} of the training captions' "
               f"words would be <unk>")
    if unknown > UNKNOWN_SHARE_ERROR:
        raise ConfigError(f"{message}; {remedy}")
    if unknown > UNKNOWN_SHARE_WARNING:
        log.warning("%s; %s if that is not meant", message, remedy)


def check_eval_split(split: LoadedSplit, name: str) -> LoadedSplit:
    """The split, if it can be scored: not empty, every image once, every image with a reference caption."""
    records, where = split.records, f"{split.data.name} {name} split"
    if not records:
        raise DataError(f"{where}: no images to evaluate on")
    ids = [r.image_id for r in records]
    twice = sorted({i for i, n in Counter(ids).items() if n > 1})
    if twice:
        raise DataError(f"{where}: {len(twice)} images are listed more than once (e.g. {twice[:3]}); list each once")
    bare = [r.image_id for r in records if not r.captions]
    if bare:
        raise DataError(f"{where}: {len(bare)} images have no reference caption (e.g. {bare[:3]})")
    return split


def build_criterion(cfg: DictConfig, records: list[ImageRecord], vocab: Vocabulary) -> Criterion:
    """Cross-entropy, or self-critical training rewarded against the training references (``scst_reward``)."""
    t = cfg.train
    if t.objective == "xent":
        return CrossEntropyCriterion(dict(t.aux_loss_weights), label_smoothing=t.label_smoothing)
    end = [vocab.itos[EOS_ID]] if t.scst_end_token else []
    references = {r.image_id: [" ".join(tokenize(c) + end) for c in r.captions] for r in records}
    try:
        score = build_reward(dict(t.scst_reward), references)
    except ValueError as err:
        raise ConfigError(f"train.scst_reward: {err}") from err

    def reward(image_ids: list[str], words: list[list[int]]) -> list[float]:  # <unk> stays, and matches nothing
        return score(image_ids, [" ".join([vocab.itos[w] for w in ws] + end) for ws in words])

    if t.scst_baseline == "mean" and t.scst_samples < 2:
        raise ConfigError(
            f"train.scst_samples: the mean baseline averages the other samples of an image, so it needs at least "
            f"2 (got {t.scst_samples}); raise it, or set train.scst_baseline=greedy"
        )
    if t.scst_candidates == "beam" and t.scst_baseline == "greedy" and t.scst_samples < 2:
        raise ConfigError(
            "train.scst_samples: a beam of 1 is the greedy caption, so with train.scst_baseline=greedy every "
            "advantage would be 0 and nothing would train; raise train.scst_samples, or set "
            "train.scst_candidates=sample"
        )
    if t.scst_candidates == "beam" and t.scst_temperature != 1.0:
        raise ConfigError(
            f"train.scst_temperature={t.scst_temperature} applies to sampled captions, and train.scst_candidates is "
            f"beam; set train.scst_candidates=sample, or leave the temperature at 1.0"
        )
    return SelfCriticalCriterion(
        reward,
        num_samples=t.scst_samples,
        max_len=cfg.data.max_caption_len,
        baseline=t.scst_baseline,
        temperature=t.scst_temperature,
        candidates=t.scst_candidates,
    )


def build_hooks(exp: Experiment, evaluate_fn, scheduler) -> list[Hook]:
    """The run's hooks, in the order they must run: what changes the model or the schedule, evaluation and
    what reacts to it, what shows the run, and the checkpoints last."""
    t, e = exp.cfg.train, exp.cfg.eval
    hooks: list[Hook] = [ProgressBarHook()]  # first: its bar closes as the epoch ends, before the evaluation
    if t.finetune_encoder_from_epoch is not None:
        hooks.append(EncoderFinetuneHook(t.finetune_encoder_from_epoch))
    hooks += [DistributedDataParallelHook(), EvalHook(evaluate_fn, every_epochs=e.every_epochs)]
    if scheduler is not None:
        hooks.append(LRSchedulerHook(scheduler, metric=t.early_stop_metric,
                                     per_step=t.scheduler in PER_STEP_SCHEDULERS))
    hooks.append(EarlyStoppingHook(t.early_stop_metric, t.patience))
    tensorboard = TensorBoard(exp.run)  # one writer for the hooks that show the run
    hooks += [LoggingHook(exp.run, tensorboard=tensorboard), build_hparams_hook(exp, tensorboard)]
    if e.tensorboard_samples:
        hooks.append(CaptionSamplesHook(
            tensorboard, caption_samples(exp, e.tensorboard_samples) if exp.dist.is_main else [],
            decode=exp.vocab.decode, words=exp.vocab.itos, data_config=exp.model.encoder.data_config,
            decoding=decoding_settings(e),
        ))
    contents = dict(config=to_container(exp.cfg), vocab=exp.vocab.itos)
    return hooks + [
        PeriodicCheckpointHook(exp.run, every_steps=CHECKPOINT_EVERY_STEPS, **contents),
        BestCheckpointHook(exp.run, metric=t.early_stop_metric, **contents),
    ]


def build_hparams_hook(exp: Experiment, tensorboard: TensorBoard) -> HParamsHook:
    """The run's settings for TensorBoard's HParams dashboard: the ``model``, ``data``, ``train`` and ``eval``
    sections flattened (``train.lr``, ``eval.metrics`` as JSON text), with the validation metrics and the best
    value of the selection metric; and the whole config as the ``config`` text entry."""
    config = to_container(exp.cfg)
    hparams = flatten_hparams({section: config[section] for section in ("model", "data", "train", "eval")})
    # the keys a metric declares, else its name: probing a metric (``evaluator.keys()``) would run its code once more
    declared = {key for name, metric in exp.evaluator.metrics.items() for key in getattr(metric, "reports", None) or [name]}
    metrics = [f"val/{key}" for key in sorted(declared)]
    text = "```yaml\n" + OmegaConf.to_yaml(exp.cfg) + "```"
    return HParamsHook(tensorboard, hparams, metrics=metrics, best=exp.cfg.train.early_stop_metric, text=text)


def caption_samples(exp: Experiment, count: int) -> list[CaptionSample]:
    """The first ``count`` images of the validation split (the first that open, with ``data.skip_corrupt_images``),
    as the encoder's evaluation transform gives them: what ``CaptionSamplesHook`` captions at every evaluation."""
    d = exp.cfg.data
    transform = build_transform(exp.model.encoder.data_config)
    samples = []
    for record in exp.val_split.records:
        if len(samples) == count:
            break
        try:
            image = record.open(max_pixels=d.max_image_pixels)
        except CorruptImageError:
            if not d.skip_corrupt_images:
                raise
            continue
        samples.append(CaptionSample(record.image_id, image, transform(image), list(record.captions)))
    return samples


def train(exp: Experiment, command: str | None = None) -> Trainer:
    """Build the loaders (extracting the feature cache on first use), optimizer and hooks, and train;
    ``command`` (the command line that started this session) is recorded in the run's summary."""
    cfg, model, dist = exp.cfg, exp.model, exp.dist
    t, e = cfg.train, cfg.eval
    criterion = build_criterion(cfg, exp.train_split.records, exp.vocab)  # before the feature cache: errors first
    if dist.is_main:
        log.info("run %s: %s, vocabulary %d words, %d trainable parameters", exp.run.root, _describe(cfg),
                 len(exp.vocab), sum(p.numel() for p in model.parameters() if p.requires_grad))
    with rank_zero_first():  # rank 0 extracts the feature cache
        train_loader = build_train_loader_for(cfg, exp.train_split, model.encoder, exp.vocab, dist)
        val_loader = build_eval_loader_for(cfg, exp.val_split, model.encoder, dist.device, e.max_images)

    precision = resolve_amp_dtype(e.amp, dist.device, key="eval.amp")

    def evaluate(m: Captioner) -> dict[str, float]:
        return run_evaluation(m, val_loader, exp.evaluator, decode=exp.vocab.decode, precision=precision,
                              **decoding_settings(e))

    optimizer = build_optimizer(model, lr=t.lr, encoder_lr=t.encoder_lr, weight_decay=t.weight_decay)
    if exp.initial is not None and t.init_moments and not load_optimizer_moments(optimizer, exp.initial["optimizer"]):
        log.info("train.init_from: the optimizer state does not fit this run's trainable parameters; fresh state")
    scheduler = build_scheduler(
        optimizer, t.scheduler, epochs=t.epochs, factor=t.lr_decay, patience=t.lr_patience, mode="max",
        steps_per_epoch=len(train_loader), warmup_steps=t.warmup_steps,
    )
    trainer = Trainer(
        model, optimizer, train_loader, epochs=t.epochs, hooks=build_hooks(exp, evaluate, scheduler),
        device=dist.device, grad_clip=t.grad_clip, amp=t.amp, channels_last=t.channels_last,
        criterion=criterion, max_steps=t.max_steps, ema_decay=t.ema_decay,
    )
    if exp.resumed is not None:
        trainer.load_state_dict(exp.resumed)
        log.info("resumed at epoch %d, step %d", trainer.epoch, trainer.global_step)
    if dist.is_main:  # only now: a run that fails while its data and feature cache are prepared writes nothing
        exp.run.root.mkdir(parents=True, exist_ok=True)
        save_config(cfg, exp.run.config)
        exp.vocab.save(exp.run.vocab)
    started = time.perf_counter()
    trainer.fit()
    if dist.is_main:
        seconds = time.perf_counter() - started
        log.info("training took %.1f s%s", seconds, f" ({trainer.stop_reason})" if trainer.stop_reason else "")
        _write_summary(exp.run, seconds, trainer, command)
    return trainer


def test(exp: Experiment, model: Captioner, samples: int = 5) -> dict[str, float] | None:
    """Score the best checkpoint (the last weights when no evaluation ran) on the test split, where its images
    are there; write its metrics, captions and per-image scores into the run directory and print them with a few
    sample captions."""
    cfg, run, loaded, split = exp.cfg, exp.run, exp.test_split, "test"
    if loaded is None:
        return None
    if run.has_checkpoint(BEST):
        model.load_state_dict(load_checkpoint(run.find_checkpoint(BEST))["model"])
    else:
        log.warning("no best checkpoint (no evaluation ran): testing the last weights")
    loader = build_eval_loader_for(cfg, loaded, model.encoder, exp.dist.device)
    evaluator = exp.evaluator
    decoding = decoding_settings(cfg.eval)
    metrics = run_evaluation(model, loader, evaluator, decode=exp.vocab.decode,
                             precision=resolve_amp_dtype(cfg.eval.amp, exp.dist.device, key="eval.amp"), **decoding)
    run.record(run.split_metrics(split), run.split_captions(split), run.split_per_image(split))  # before: a kill
    run.split_metrics(split).write_text(json.dumps(metrics, indent=2) + "\n")                 # leaves none unlisted
    evaluator.save(run.split_captions(split), run.split_per_image(split))
    print(f"\n{split} split ({len(loaded.records)} images), beam {decoding['beam_size']}:")
    for key, value in metrics.items():
        print(f"  {key:<10} {value:.4f}")
    shown = list(evaluator.hypotheses)[:samples]
    if shown:
        print("\nsample captions (generated | first reference):")
        for image_id in shown:
            print(f"  {image_id}: {evaluator.hypotheses[image_id]} | {evaluator.references[image_id][0]}")
    return metrics


def train_experiment(
    cfg: DictConfig,
    *,
    config_path: str | os.PathLike,
    resume: str | os.PathLike | None = None,
    overwrite: bool = False,
    samples: int = 5,
    command: str | None = None,
) -> Path:
    """Train ``cfg`` (read from ``config_path``, which names a run without ``train.run_name``), or continue the
    run in ``resume``; test the best checkpoint; return the run directory.

    A new run refuses a directory that holds another run unless ``overwrite`` replaces it, and that only once
    everything has been checked (``prepare``: a bad setting leaves the old run as it was); the run directory is
    held for the whole run (``RunDir.claim``). Rank 0 alone checks, replaces and holds it.
    """
    dist = init_distributed(cfg.train.device)
    try:
        run = RunDir(resume if resume else _new_run_dir(cfg, Path(config_path)))
        _refuse_a_taken_run(run, dist, resume is None, overwrite)  # before the checks: the quickest refusal
        exp = prepare(cfg, dist, run_dir=run.root, resume=resume is not None)
        with run.claim() if dist.is_main else nullcontext():
            _refuse_a_taken_run(run, dist, resume is None, overwrite, replace=True)  # again, now that it is ours
            trainer = train(exp, command)
            if dist.is_main:
                test(exp, trainer.eval_module, samples=samples)
        return run.root
    finally:
        destroy_distributed()


def _refuse_a_taken_run(run: RunDir, dist: DistInfo, new: bool, overwrite: bool, replace: bool = False) -> None:
    """A new run's directory must hold no run, or be replaced (``overwrite``; only when ``replace``, that is
    while the run directory is held). Rank 0 decides and the other ranks follow."""
    refusal = None
    foreign = run.foreign_files() if dist.is_main and new else []
    if foreign:
        refusal = (f"{run.root} holds no run but has {', '.join(p.name for p in foreign)}, which a run would write "
                   f"over; name another run (train.run_name=...) or move those files")
    elif dist.is_main and new and run.holds_run():
        if not overwrite and not run.has_checkpoint(LAST):  # stopped in its first epoch: nothing to resume
            refusal = (f"{run.root} already holds a run that saved no checkpoint (it stopped before its first one); "
                       f"replace it with --overwrite, or name another run (train.run_name=...)")
        elif not overwrite:
            refusal = (f"{run.root} already holds a run; continue it with --resume {run.root}, replace it with "
                       f"--overwrite, or name another run (train.run_name=...)")
        elif replace:
            log.warning("replacing the run in %s (--overwrite)", run.root)
            run.clear()
    refusal = broadcast_object(refusal)
    if refusal is not None:
        raise RunDirError(refusal)


def _new_run_dir(cfg: DictConfig, config_path: Path) -> Path:
    t = cfg.train
    return Path(t.output_dir) / (t.run_name or f"{config_path.stem}-{time.strftime('%Y%m%d-%H%M%S')}")


def _check_resumed(model: Captioner, resumed: dict, run: RunDir) -> None:
    """The last checkpoint fits the run: its vocabulary is the run's ``vocab.json`` and its weights fit the model
    of the run's config. Checked before anything is written or loaded."""
    where = f"--resume {run.root}: {run.find_checkpoint(LAST)}"
    if run.vocab.is_file():
        try:
            words = Vocabulary.load(run.vocab).itos
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"--resume {run.root}: {run.vocab} cannot be read ({err!r})") from err
        if words != Vocabulary(resumed["vocab"]).itos:
            raise CheckpointError(f"{where}: its vocabulary differs from the run's {run.vocab.name}; the checkpoint "
                                  f"belongs to another run, or one of the two was edited")
    try:
        model.load_state_dict(resumed["model"])
    except RuntimeError as err:
        detail = " ".join(str(err).split())
        raise CheckpointError(f"{where}: its weights do not fit the model of the run's config ({detail[:300]})") \
            from err


def _load_initial_weights(model: Captioner, weights: dict, path: str) -> None:
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        detail = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise ConfigError(
            f"train.init_from={path}: its weights do not fit this config's model ({detail}); use the model "
            f"section of the config that trained it"
        ) from err


def _write_summary(run: RunDir, seconds: float, trainer: Trainer, command: str | None) -> None:
    """The run's summary: training wall time (summed over resumed sessions), position, stop reason, and the
    command of each session (a model card quotes them)."""
    before = json.loads(run.summary.read_text()) if run.summary.is_file() else {}
    summary = {
        "train_seconds": before.get("train_seconds", 0.0) + seconds, "epochs_done": trainer.epoch,
        "global_step": trainer.global_step, "stop_reason": trainer.stop_reason,
        "commands": before.get("commands", []) + ([command] if command else []),
    }
    run.summary.write_text(json.dumps(summary, indent=2) + "\n")


def _check_same_config(saved: dict, cfg: DictConfig, run: RunDir) -> None:
    """A resumed run trains as it was configured; it may be extended (epochs, max_steps) and evaluated otherwise
    (the whole ``eval`` section), and says so."""
    changeable = {"train": {"epochs", "max_steps"}, "eval": set(saved["eval"]) | set(cfg.eval)}
    current, defaults = to_container(cfg), to_container(OmegaConf.structured(ExperimentConfig))
    for section in ("model", "data", "train", "eval"):
        for key in sorted(set(saved[section]) | set(current[section])):
            was, now = saved[section].get(key), current[section].get(key)
            if was == now or (key not in saved[section] and now == defaults[section].get(key)):
                continue  # the same, or a setting added since the run started, at its default
            if key not in changeable.get(section, ()):
                raise ConfigError(
                    f"--resume {run.root}: {section}.{key} is {now!r} but the run was trained with {was!r}; resume "
                    f"with the run's own config ({run.config}), changing only train.epochs, train.max_steps or eval.*"
                )
            log.info("resume: %s.%s is %r (the run had %r)%s", section, key, now, was,
                     "; scores from here on are compared with the earlier ones by early stopping, the LR plateau "
                     "and the best checkpoint" if section == "eval" else "")


def _describe(cfg: DictConfig) -> str:
    m = cfg.model
    return f"{m.encoder.get('model_name', m.encoder.name)} + {m.attention.name} + {m.decoder.name}"
