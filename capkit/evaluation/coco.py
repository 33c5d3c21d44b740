"""The COCO caption metrics, computed by pycocoevalcap exactly as its ``COCOEvalCap`` does.

The evaluator feeds them PTB-tokenized captions (``ptb_tokenize``), the standard COCO pipeline; called
directly they score the strings they are given. Every metric is corpus-level and also gives per-image scores.
pycocoevalcap (the ``train`` extra) is imported when a metric first runs: the metrics register without it, and
using one without it raises ``MissingDependencyError``.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from capkit.errors import MissingDependencyError
from capkit.evaluation.metric import ImageId, MetricResult, check_aligned, require_java
from capkit.registry import METRICS

__all__ = ["ptb_tokenize", "python_tokenize", "TOKENIZERS", "Bleu", "Meteor", "RougeL", "Cider", "Spice",
           "spice_missing_jars", "install_hint"]

logger = logging.getLogger(__name__)
K = TypeVar("K")

# pycocoevalcap is imported on first use (it comes with the `train` extra; captioning needs none of it). These
# module attributes are looked up through ``_coco``: name here -> (pycocoevalcap module, its attribute or None)
_PYCOCOEVALCAP = {
    "_CocoBleu": ("pycocoevalcap.bleu.bleu", "Bleu"),
    "_CocoCider": ("pycocoevalcap.cider.cider", "Cider"),
    "_CocoMeteor": ("pycocoevalcap.meteor.meteor", "Meteor"),
    "_CocoRouge": ("pycocoevalcap.rouge.rouge", "Rouge"),
    "_CocoSpice": ("pycocoevalcap.spice.spice", "Spice"),
    "_spice_models": ("pycocoevalcap.spice.get_stanford_models", None),
    "PTBTokenizer": ("pycocoevalcap.tokenizer.ptbtokenizer", "PTBTokenizer"),
}


def install_hint(what: str) -> str:
    """The message of the ``MissingDependencyError`` raised when ``what`` runs without pycocoevalcap."""
    return f"{what} needs pycocoevalcap: pip install 'capkit-captioning[train]'"


def _coco(name: str, what: str) -> Any:
    """The pycocoevalcap class or module bound to ``name`` in this module, imported (and bound) on first use.

    Raises:
        MissingDependencyError: pycocoevalcap is not installed; the message says ``what`` needs it.
    """
    if name in globals():  # imported already, or replaced (tests)
        return globals()[name]
    module, attribute = _PYCOCOEVALCAP[name]
    try:
        value = importlib.import_module(module)
    except ImportError as err:
        raise MissingDependencyError(install_hint(what)) from err
    if attribute is not None:
        value = getattr(value, attribute)
    globals()[name] = value
    return value


def __getattr__(name: str) -> Any:
    if name in _PYCOCOEVALCAP:
        return _coco(name, f"capkit.evaluation.coco.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def ptb_tokenize(captions: Mapping[K, Sequence[str]]) -> dict[K, list[str]]:
    """Tokenize with Stanford's PTBTokenizer, lower-case and drop punctuation (pycocoevalcap's tokenizer)."""
    tokenizer = _coco("PTBTokenizer", "the PTB tokenizer (eval.tokenizer ptb)")  # said before a missing Java
    require_java("The PTB tokenizer")
    out = tokenizer().tokenize({k: [{"caption": c} for c in caps] for k, caps in captions.items()})
    short = [k for k, caps in captions.items() if len(out.get(k, ())) != len(caps)]
    if short:
        raise RuntimeError(
            f"the PTB tokenizer returned too few lines ({len(short)} caption sets incomplete, e.g. {short[:3]}); "
            f"see the Java error above"
        )
    return out


# what pycocoevalcap's PTBTokenizer drops after Stanford's tokenizer has split the text (which writes a double
# quote as `` or ''); brackets become -lrb- .. -rcb-, which it keeps (its list spells them in upper case)
_PUNCTUATION = {"''", "'", "``", "`", '"', ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-"}
# Stanford's splits of English contractions and possessives ("don't" -> "do n't", "dog's" -> "dog 's", "cannot")
_CLITIC = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)\b|(?<=\bcan)(not)\b")
# an abbreviation keeps its period: initials and acronyms (n., d.c., u.s.), and the common short words
_ABBREVIATION = r"(?:[a-z](?:\.[a-z])*|st|ave|rd|blvd|mt|ft|dr|mr|mrs|ms|jr|sr|vs|etc|inc|co|ltd|no)\."
_TOKEN = re.compile(rf"n't|'(?:s|re|ve|ll|d|m)\b|(?<![\w.]){_ABBREVIATION}(?!\w)|\w+(?:[-./:]\w+)*|\.\.\.|--|\S")


def python_tokenize(captions: Mapping[K, Sequence[str]]) -> dict[K, list[str]]:
    """``ptb_tokenize`` without Java: lower-case, split off punctuation and English clitics as Stanford's
    PTBTokenizer does, and drop the punctuation tokens pycocoevalcap drops. It agrees with the Java tokenizer on
    plain caption text; docs/RESULTS.md gives how far scores differ on real captions."""
    def tokenize(text: str) -> str:
        tokens = _TOKEN.findall(_CLITIC.sub(lambda m: " " + m.group(0), text.lower().replace("\n", " ")))
        return " ".join(_BRACKETS.get(t, t) for t in tokens if t not in _PUNCTUATION)

    return {k: [tokenize(c) for c in caps] for k, caps in captions.items()}


TOKENIZERS = {"ptb": ptb_tokenize, "python": python_tokenize}  # what the evaluator may run before the metrics


def _as_lists(
    hyps: Mapping[ImageId, str], refs: Mapping[ImageId, Sequence[str]]
) -> tuple[list[ImageId], dict[ImageId, list[str]], dict[ImageId, list[str]]]:
    """pycocoevalcap's layout: ``res = {id: [hyp]}``, ``gts = {id: [refs]}``, same key order."""
    ids = check_aligned(hyps, refs)
    return ids, {i: [hyps[i]] for i in ids}, {i: list(refs[i]) for i in ids}


@METRICS.register("bleu")
class Bleu:
    """BLEU-1..n (pycocoevalcap: closest reference length, corpus level); keys ``bleu1`` .. ``bleu{n}``."""

    ptb_tokenized = True

    def __init__(self, n: int = 4):
        self.n = n
        self.reports = [f"bleu{k + 1}" for k in range(n)]

    def __call__(self, hyps: Mapping[ImageId, str], refs: Mapping[ImageId, Sequence[str]]) -> MetricResult:
        ids, res, gts = _as_lists(hyps, refs)
        corpus, per_image = _coco("_CocoBleu", "the bleu metric")(self.n).compute_score(gts, res, verbose=0)
        keys = [f"bleu{k + 1}" for k in range(self.n)]
        return MetricResult(
            {key: float(s) for key, s in zip(keys, corpus)},
            {i: {key: float(per_image[k][j]) for k, key in enumerate(keys)} for j, i in enumerate(ids)},
        )


@METRICS.register("meteor")
class Meteor:
    """METEOR 1.5 (``-l en -norm``), run by pycocoevalcap's jar in a Java subprocess; key ``meteor``.

    The subprocess starts on the first call (10 s or more: it loads a paraphrase table) and serves later
    calls of this instance; it ends when the instance is garbage-collected.
    """

    ptb_tokenized = True
    needs_java = True
    reports = ("meteor",)

    def __init__(self) -> None:
        self._scorer: Any = None  # pycocoevalcap's Meteor, started by the first call

    def __call__(self, hyps: Mapping[ImageId, str], refs: Mapping[ImageId, Sequence[str]]) -> MetricResult:
        ids, res, gts = _as_lists(hyps, refs)
        # Lines are the jar's protocol: a newline inside a caption would desynchronise it.
        res = {i: [h.replace("\n", " ") for h in hs] for i, hs in res.items()}
        gts = {i: [r.replace("\n", " ") for r in rs] for i, rs in gts.items()}
        meteor = _coco("_CocoMeteor", "the meteor metric")  # a missing pycocoevalcap is said before a missing Java
        require_java("METEOR")
        if self._scorer is None:
            self._scorer = meteor()
        scorer = self._scorer
        try:
            corpus, per_image = scorer.compute_score(gts, res)
        except (ValueError, OSError) as err:  # the JVM exited: its output ended or its input pipe broke
            self._scorer = None
            scorer.meteor_p.kill()
            with contextlib.suppress(OSError):  # unflushed input to a dead process; else Meteor.__del__ raises
                scorer.meteor_p.stdin.close()
            stderr = scorer.meteor_p.stderr.read().decode(errors="replace").strip()
            raise RuntimeError(f"METEOR's Java process failed: {stderr or err}") from err
        finally:
            if scorer.lock.locked():  # compute_score raised holding the lock that Meteor.__del__ waits on
                scorer.lock.release()
        return MetricResult({"meteor": float(corpus)}, {i: {"meteor": float(s)} for i, s in zip(ids, per_image)})


@METRICS.register("rouge_l")
class RougeL:
    """ROUGE-L F-measure (beta 1.2) against the best-matching reference, averaged over images; key ``rouge_l``."""

    ptb_tokenized = True
    reports = ("rouge_l",)

    def __call__(self, hyps: Mapping[ImageId, str], refs: Mapping[ImageId, Sequence[str]]) -> MetricResult:
        ids, res, gts = _as_lists(hyps, refs)
        corpus, per_image = _coco("_CocoRouge", "the rouge_l metric")().compute_score(gts, res)
        return MetricResult({"rouge_l": float(corpus)}, {i: {"rouge_l": float(s)} for i, s in zip(ids, per_image)})


@METRICS.register("cider")
class Cider:
    """CIDEr-D (pycocoevalcap's ``Cider``: sigma 6, clipping, x10), IDF from this corpus' references; key ``cider``.

    A single-image corpus scores 0: every n-gram then has IDF log(1/1) = 0.
    """

    ptb_tokenized = True
    reports = ("cider",)

    def __call__(self, hyps: Mapping[ImageId, str], refs: Mapping[ImageId, Sequence[str]]) -> MetricResult:
        ids, res, gts = _as_lists(hyps, refs)
        corpus, per_image = _coco("_CocoCider", "the cider metric")().compute_score(gts, res)
        return MetricResult({"cider": float(corpus)}, {i: {"cider": float(s)} for i, s in zip(ids, per_image)})


def spice_missing_jars() -> list[Path]:
    """The Stanford CoreNLP jars SPICE needs that are not installed (pycocoevalcap downloads them on first use)."""
    models = _coco("_spice_models", "the spice metric")
    lib = Path(models.SPICEDIR) / models.SPICELIB
    jars = [lib / f"{models.JAR}.jar", lib / f"{models.JAR}-models.jar"]
    return [jar for jar in jars if not jar.is_file()]


@METRICS.register("spice")
class Spice:
    """SPICE F-score (key ``spice``), only where its Stanford CoreNLP jars are installed.

    pycocoevalcap would download them (about 400 MB) on first use; capkit never does. Without them this
    metric logs one warning when built and then reports nothing.
    """

    ptb_tokenized = True
    needs_java = True

    def __init__(self) -> None:
        missing = spice_missing_jars()
        self.available = not missing
        # what it will report: nothing without its jars, so selecting a checkpoint on it fails up front
        self.reports = ("spice",) if self.available else ()
        if missing:
            logger.warning(
                "SPICE unavailable (skipped): missing %s. To enable it, run once with network access: "
                "python -c 'from pycocoevalcap.spice.get_stanford_models import get_stanford_models as g; g()'",
                ", ".join(str(p) for p in missing),
            )

    def __call__(self, hyps: Mapping[ImageId, str], refs: Mapping[ImageId, Sequence[str]]) -> MetricResult:
        if not self.available:
            return MetricResult({})
        ids, res, gts = _as_lists(hyps, refs)
        require_java("SPICE")
        scorer = _coco("_CocoSpice", "the spice metric")()
        corpus, per_image = scorer.compute_score(gts, res)  # per_image follows sorted(ids)
        return MetricResult(
            {"spice": float(corpus)},
            {i: {"spice": float(s["All"]["f"])} for i, s in zip(sorted(ids), per_image)},
        )
