"""The attention ablation: train and evaluate variants on equal terms, then tabulate and plot them.

Every variant starts from one experiment config (same data, same cached encoder features, same budget) and
differs only by its overrides; each runs once per seed. A finished run leaves its result (``RunDir.result``) in
its directory, so re-running the ablation skips it (and an interrupted run resumes from its last checkpoint).
"""
from __future__ import annotations

import csv
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from capkit.builder import build_captioner
from capkit.config import PLAIN_NAME, ExperimentConfig, check_values, load_config, to_container
from capkit.engine.run_dir import BEST, LAST, RunDir
from capkit.errors import CapkitError, ConfigError
from capkit.evaluation import CaptionEvaluator, decode_batches
from capkit.evaluation.grounding import measure_grounding
from capkit.recipes.inference import give_training_captions, load_eval_split, load_trained
from capkit.recipes.train import check_settings, train_experiment
from capkit.registry import DATASETS

__all__ = ["VariantConfig", "AblationConfig", "load_ablation", "run_ablation", "summarise"]

log = logging.getLogger("capkit.ablate")

HEADLINE = ("bleu4", "cider", "grounding")  # plotted, when present


@dataclass
class VariantConfig:
    name: str = MISSING  # a directory name: letters, digits, '-', '_'
    attention: Optional[dict[str, Any]] = None  # replaces the base's model.attention section whole
    decoder: Optional[dict[str, Any]] = None  # replaces the base's model.decoder section whole
    overrides: list[str] = field(default_factory=list)  # dot-list overrides, applied last


@dataclass
class AblationConfig:
    base: str = MISSING  # the experiment YAML every variant starts from (relative to this file or the cwd)
    overrides: list[str] = field(default_factory=list)  # applied to every variant (the shared budget)
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    variants: list[VariantConfig] = field(default_factory=list)
    output_dir: str = "runs/ablation"
    split: str = "test"  # the split every run's best checkpoint is scored on
    definitions: dict[str, Any] = field(default_factory=dict)  # YAML anchors the variants share; not read


def load_ablation(path: str | Path, overrides: list[str] = ()) -> AblationConfig:
    """Read an ablation YAML over its schema; ``base`` is resolved relative to the file, then the cwd."""
    path = Path(path)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(AblationConfig), OmegaConf.load(path),
                              OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path}: {str(err).splitlines()[0]}") from err
    if OmegaConf.is_missing(cfg, "base"):
        raise ConfigError(f"{path}: no base: key; name the experiment YAML every variant starts from "
                          f"(base: configs/....yaml)")
    if not cfg.variants:
        raise ConfigError(f"{path}: no variants listed")
    if any(OmegaConf.is_missing(v, "name") for v in cfg.variants):
        raise ConfigError(f"{path}: a variant has no name: key; give each one a name (its run directory)")
    if not cfg.seeds:
        raise ConfigError(f"{path}: seeds is empty; list at least one (e.g. seeds: [0])")
    if len(set(cfg.seeds)) != len(cfg.seeds) or min(cfg.seeds) < 0:
        # a repeated seed would run once and count twice (a standard deviation of 0 over one run)
        raise ConfigError(f"{path}: seeds {list(cfg.seeds)} must be distinct and at least 0")
    _check_output_dir(Path(cfg.output_dir), path)
    names = [v.name for v in cfg.variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: variant names must be unique, got {names}")
    for name in names:  # each is a directory under output_dir: nothing that leads out of it
        if not PLAIN_NAME.fullmatch(name):
            raise ConfigError(f"{path}: variant name {name!r} is no plain directory name; use letters, digits, '-', "
                              f"'_' and '.', starting with a letter or digit")
    beside = path.parent / cfg.base
    cfg.base = str(beside if beside.is_file() else Path(cfg.base))
    return OmegaConf.to_object(cfg)


def _check_output_dir(out: Path, path: Path) -> None:
    """``out`` is, or can become, a folder: no file at it or above it."""
    for folder in (out, *out.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ConfigError(f"{path}: output_dir {out}: {folder} is a file, not a folder; give a folder")
            return


def run_ablation(ablation: AblationConfig) -> list[dict[str, Any]]:
    """Train and score every (variant, seed) not finished yet; return every run's result.

    Every variant's config is built and checked, and its model built, before the first one trains; a finished
    run is reused only when it was trained with the config its variant has now."""
    out = Path(ablation.output_dir)
    configs = check_variants(ablation)
    results = []
    for variant in ablation.variants:
        for seed in ablation.seeds:
            run = RunDir(out / variant.name / f"seed{seed}")
            cfg = configs[variant.name, seed]
            if run.result.is_file():
                log.info("skip %s seed %d: finished (%s)", variant.name, seed, run.result)
                results.append(json.loads(run.result.read_text()))
                continue
            resume = run.root if run.has_checkpoint(LAST) else None
            log.info("run %s seed %d%s", variant.name, seed, " (resuming)" if resume else "")
            # the ablation owns its runs: one without a checkpoint died before its first and starts again
            train_experiment(cfg, config_path=ablation.base, resume=resume, overwrite=resume is None, samples=0)
            result = {"variant": variant.name, "seed": seed, **_score(run, ablation.split, list(cfg.plugins))}
            run.result.write_text(json.dumps(result, indent=2) + "\n")
            results.append(result)
    return results


def check_variants(ablation: AblationConfig) -> dict[tuple[str, int], DictConfig]:
    """Every (variant, seed)'s config, each checked as training would check it (settings, metrics, the model's
    components built), and each finished run's config compared with it: one error before anything trains."""
    out = Path(ablation.output_dir)
    configs = {}
    for variant in ablation.variants:
        cfg = None
        for seed in ablation.seeds:
            cfg = configs[variant.name, seed] = _variant_config(ablation, variant, seed, out)
            _check_finished(RunDir(out / variant.name / f"seed{seed}"), cfg, variant.name)
        try:
            check_settings(cfg)
            build_captioner(to_container(cfg.model), vocab_size=8)  # the seed changes no component
            DATASETS.build(to_container(cfg.data.dataset), split=ablation.split)  # scored after training
        except CapkitError as err:
            raise type(err)(f"{ablation.base} with variant {variant.name!r}: {err}") from err
    return configs


def _check_finished(run: RunDir, cfg: DictConfig, variant: str) -> None:
    """A finished run (its ``result.json``) was trained with ``cfg``; otherwise its result would stand for
    settings it never had."""
    if not run.result.is_file():
        return
    saved = OmegaConf.load(run.config) if run.config.is_file() else {}
    # over the schema: a setting added since the run was made counts at its default
    trained = to_container(OmegaConf.merge(OmegaConf.structured(ExperimentConfig), saved))
    wanted = to_container(cfg)
    changed = [f"{section}.{key}" for section in ("model", "data", "train", "eval")
               for key in sorted(set(trained.get(section, {})) | set(wanted.get(section, {})))
               if trained.get(section, {}).get(key) != wanted[section].get(key)]
    if changed:
        raise ConfigError(
            f"variant {variant!r}: the finished run {run.root} was trained with other settings ({', '.join(changed[:4])}"
            f"{', ...' if len(changed) > 4 else ''}); its result would not be this variant's. Choose another "
            f"output_dir, or remove that run to train it again"
        )


def _variant_config(ablation: AblationConfig, variant: VariantConfig, seed: int, out: Path):
    cfg = load_config(ablation.base, ablation.overrides)
    if variant.attention is not None:
        cfg.model.attention = variant.attention
    if variant.decoder is not None:
        cfg.model.decoder = variant.decoder
    where = f"{ablation.base} with variant {variant.name!r}"
    bad = [o for o in variant.overrides if "=" not in o]
    if bad:
        raise ConfigError(f"{where}: overrides must be key=value, got {bad}")
    run = [f"train.seed={seed}", f"train.output_dir={out / variant.name}", f"train.run_name=seed{seed}"]
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([*variant.overrides, *run]))
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"{where}: override: {str(err).splitlines()[0]} (key: {key}); fix the variant's overrides") \
            from err
    check_values(cfg, where)
    return cfg


def _score(run: RunDir, split_name: str, plugins: list[str]) -> dict[str, Any]:
    """Metrics, parameter count, training time, decoding speed and (where boxes exist) grounding of a run."""
    trained = load_trained(run.find_checkpoint(BEST), plugins=plugins)
    cfg, model = trained.config, trained.model
    split, loader = load_eval_split(trained, split_name)
    evaluator = CaptionEvaluator(list(cfg.eval.metrics), tokenizer=cfg.eval.tokenizer)
    give_training_captions(evaluator, trained)
    captions, started = {}, time.perf_counter()
    # one timed decoding pass gives the speed, the scored captions and the grounding
    for batch, generation in decode_batches(model, loader, precision=trained.precision, **trained.decoding):
        captions.update(zip(batch.image_ids, generation.best))
        evaluator.process(batch, generation, trained.vocab.decode)
    images_per_s = len(split.records) / (time.perf_counter() - started)
    metrics = evaluator.evaluate()
    if any(r.boxes for r in split.records):
        records = {r.image_id: r for r in split.records}
        metrics.update(
            measure_grounding(captions, records, trained.vocab.itos, generation.grid, model.encoder.data_config)
        )
    decoder_params = sum(p.numel() for p in model.decoder.parameters())
    summary = json.loads(run.summary.read_text())
    return {**metrics, "decoder_params": decoder_params, "train_seconds": summary["train_seconds"],
            "decode_images_per_s": images_per_s}


def summarise(results: list[dict[str, Any]], output_dir: str | Path, title: str = "Attention ablation") -> Path:
    """Write ``ablation.csv`` (mean and std over seeds per variant), ``ablation.md`` and ``ablation.png``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    variants = list(dict.fromkeys(r["variant"] for r in results))
    keys = [k for k in dict.fromkeys(k for r in results for k in r) if k not in ("variant", "seed")]
    rows = []
    for name in variants:
        runs = [r for r in results if r["variant"] == name]
        row: dict[str, Any] = {"variant": name, "seeds": len(runs)}
        for key in keys:
            values = np.array([r.get(key, math.nan) for r in runs], dtype=float)
            row[f"{key}_mean"], row[f"{key}_std"] = float(values.mean()), float(values.std(ddof=1) if len(runs) > 1 else 0)
        rows.append(row)
    with (out / "ablation.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "ablation.md").write_text(_markdown(rows, keys, title))
    _plot(rows, out / "ablation.png", title)
    return out


def _markdown(rows: list[dict[str, Any]], keys: list[str], title: str) -> str:
    def cell(row: dict[str, Any], key: str) -> str:
        mean, std = row[f"{key}_mean"], row[f"{key}_std"]
        if key == "decoder_params":
            return f"{mean / 1e6:.2f} M"
        if key in ("train_seconds", "decode_images_per_s", "grounded_words"):
            return f"{mean:.0f} ± {std:.0f}"
        return "n/a" if math.isnan(mean) else f"{mean:.3f} ± {std:.3f}"

    header = ["variant", *keys]
    lines = [f"### {title}", "", "mean ± standard deviation over seeds "
             f"({', '.join(str(r['seeds']) for r in rows[:1])} per variant)", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([row["variant"], *(cell(row, k) for k in keys)]) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    def measured(metric: str) -> bool:
        return any(not math.isnan(r.get(f"{metric}_mean", math.nan)) for r in rows)

    bookkeeping = {"grounding_uniform", "grounded_words", "decoder_params", "train_seconds", "decode_images_per_s"}
    scores = [k.removesuffix("_mean") for k in rows[0] if k.endswith("_mean")]
    metrics = [m for m in HEADLINE if measured(m)] or [m for m in scores if m not in bookkeeping][:1]
    fig = Figure(figsize=(max(6.0, 0.9 * len(rows) * len(metrics) / 2 + 2), 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        means = [r[f"{metric}_mean"] for r in rows]
        stds = [r[f"{metric}_std"] for r in rows]
        ax.bar(range(len(rows)), means, yerr=stds, capsize=3, color="tab:blue")
        if metric == "grounding":
            ax.plot(range(len(rows)), [r["grounding_uniform_mean"] for r in rows], "k_", markersize=14,
                    label="uniform attention")
            ax.legend(fontsize=8)
        ax.set_xticks(range(len(rows)), [r["variant"] for r in rows], rotation=60, ha="right", fontsize=8)
        ax.set_title(metric)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
