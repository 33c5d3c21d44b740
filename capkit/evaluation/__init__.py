"""Caption evaluation: registered metrics (COCO caption metrics, sacrebleu) and the evaluator.

Importing this package registers the builtin metrics: bleu, meteor, rouge_l, cider, spice, sacrebleu, and
diversity (distinct captions, words used, captions not in the training set, mean length).
See ``capkit.evaluation.metric`` for the interface a plugin metric implements.
"""
from capkit.evaluation import coco, diversity, sacrebleu_metric  # noqa: F401  (registers the builtin metrics)
from capkit.evaluation.rewards import REWARDS, CiderD, SentenceBleu, build_reward
from capkit.evaluation.coco import ptb_tokenize, spice_missing_jars
from capkit.evaluation.diversity import Diversity
from capkit.evaluation.evaluator import CaptionEvaluator, decode_batches, run_evaluation
from capkit.evaluation.metric import JavaNotFoundError, Metric, MetricResult, build_metric, require_java
from capkit.evaluation.results import load_predictions, load_references, write_coco_results, write_per_image

__all__ = [
    "CaptionEvaluator",
    "CiderD",
    "Diversity",
    "REWARDS",
    "SentenceBleu",
    "build_reward",
    "decode_batches",
    "JavaNotFoundError",
    "Metric",
    "MetricResult",
    "build_metric",
    "load_predictions",
    "load_references",
    "ptb_tokenize",
    "require_java",
    "run_evaluation",
    "spice_missing_jars",
    "write_coco_results",
    "write_per_image",
]
