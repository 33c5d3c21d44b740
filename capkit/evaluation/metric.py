"""The caption-metric interface that builtins and plugins implement, and the Java check the COCO tools need.

A metric is registered in ``capkit.registry.METRICS`` under a snake_case name, either with
``@METRICS.register("name")`` or, for a plugin, through an entry point in the ``capkit.metrics`` group.
The registered object is a class (instantiated with no arguments) or a plain function. The instance, or the
function, is called as ``metric(hyps, refs)`` with

- ``hyps``: ``{image_id: hypothesis}``, one caption per image;
- ``refs``: ``{image_id: [reference, ...]}``, the same image ids, at least one reference each;

and returns a ``MetricResult``, a flat ``{key: float}`` dict (one metric may report several keys, e.g.
``bleu`` gives ``bleu1`` .. ``bleu4``), or a single float, reported under the registered name. Keys must
not clash with another selected metric's keys.

An optional attribute ``reports`` (the keys it returns) lets a run check its settings before training, and
``needs_java = True`` says that it runs a Java program. An optional attribute ``ptb_tokenized = True`` asks the
evaluator for captions that went through the COCO pipeline's PTB tokenizer (lower-cased, punctuation removed);
without it a metric receives the raw captions. A metric that compares with the training captions (``diversity``)
has a method ``use_training_captions(captions)``, which the evaluator calls when it has them.
"""
from __future__ import annotations

import numbers
import shutil
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from capkit.errors import JavaNotFoundError
from capkit.registry import METRICS

__all__ = [
    "ImageId",
    "Metric",
    "MetricResult",
    "JavaNotFoundError",
    "build_metric",
    "as_result",
    "check_aligned",
    "require_java",
    "metric_keys",
]

ImageId = Hashable  # str in capkit's datasets; COCO files may use int


@dataclass
class MetricResult:
    """What a metric computes.

    Attributes:
        scores: corpus-level scores, flat keys (``bleu1``, ``cider``, ...).
        per_image: ``{image_id: {key: score}}`` where the metric has per-image scores, else empty.
    """

    scores: dict[str, float]
    per_image: dict[ImageId, dict[str, float]] = field(default_factory=dict)


class Metric(Protocol):
    """``metric(hyps, refs) -> MetricResult | dict[str, float] | float``; see the module docstring."""

    def __call__(self, hyps: Mapping[ImageId, str], refs: Mapping[ImageId, Sequence[str]]) -> Any: ...


def require_java(tool: str) -> None:
    """Raise ``JavaNotFoundError`` with install instructions unless ``java`` is on PATH."""
    if shutil.which("java") is None:
        raise JavaNotFoundError(
            f"{tool} runs a Java program from pycocoevalcap, but no `java` is on PATH. Install any Java 8+ "
            f"runtime, e.g. `sudo apt-get install default-jre-headless` (Debian/Ubuntu), "
            f"`conda install -c conda-forge openjdk` or `brew install openjdk` (macOS), then check `java -version`. "
            f"Without Java, evaluate with Java-free metrics only (bleu, rouge_l, cider, sacrebleu) and "
            f"PTB tokenization off."
        )


def metric_keys(name: str, metric: Metric) -> set[str]:
    """The keys metric ``name`` reports: its ``reports`` attribute, else what it returns on a two-image corpus."""
    declared = getattr(metric, "reports", None)
    if declared is not None:
        return set(declared)
    probe = as_result(name, metric({"a": "a dog runs", "b": "a cat"}, {"a": ["a dog runs fast"], "b": ["a cat sits"]}))
    return set(probe.scores)


def build_metric(name: str) -> Metric:
    """The metric registered as ``name``: a class is instantiated, a function is used as is."""
    obj = METRICS.get(name)
    return obj() if isinstance(obj, type) else obj


def as_result(name: str, value: Any) -> MetricResult:
    """Normalise what metric ``name`` returned (``MetricResult``, ``{key: float}`` or a float)."""
    if isinstance(value, MetricResult):
        return value
    if isinstance(value, Mapping):
        return MetricResult({str(k): float(v) for k, v in value.items()})
    if isinstance(value, numbers.Real):
        return MetricResult({name: float(value)})
    raise TypeError(
        f"metric {name!r} returned {type(value).__name__}; expected a MetricResult, a dict[str, float] or a float"
    )


def check_aligned(hyps: Mapping[ImageId, str], refs: Mapping[ImageId, Sequence[str]]) -> list[ImageId]:
    """The image ids, in ``hyps`` order, after checking that ``refs`` has the same ids and no empty lists."""
    if hyps.keys() != refs.keys():
        missing = [i for i in hyps if i not in refs]
        extra = [i for i in refs if i not in hyps]
        raise ValueError(
            f"hypotheses and references must have the same image ids: {len(missing)} hypotheses lack references "
            f"(e.g. {missing[:3]}), {len(extra)} reference sets lack a hypothesis (e.g. {extra[:3]})"
        )
    if not hyps:
        raise ValueError("no captions to score")
    empty = [i for i, r in refs.items() if len(r) == 0]
    if empty:
        raise ValueError(f"{len(empty)} images have no reference captions (e.g. {empty[:3]})")
    return list(hyps)
