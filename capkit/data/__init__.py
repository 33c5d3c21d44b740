"""The data layer: datasets (registered in ``DATASETS``), vocabulary, transforms, feature cache, loaders."""
from capkit.data import datasets  # noqa: F401  (registers the builtin datasets)
from capkit.data.build import LoadedSplit, build_eval_loader, build_source, build_train_loader, load_split
from capkit.data.datasets.base import CaptionDataset, DatasetNotFoundError
from capkit.data.feature_cache import FeatureStore, cached_features, default_cache_dir
from capkit.data.loaders import (
    AugmentedViews,
    CaptionGroups,
    CaptionGroupSampler,
    EvaluationDataset,
    ImageSource,
    TrainingDataset,
    ViewSampler,
    build_loader,
    collate_batch,
)
from capkit.data.records import Box, CorruptImageError, ImageRecord, MissingImagesError, drop_missing
from capkit.data.transforms import build_transform
from capkit.data.vocab import Vocabulary, tokenize

__all__ = [
    "AugmentedViews",
    "Box",
    "CaptionDataset",
    "CaptionGroupSampler",
    "CaptionGroups",
    "CorruptImageError",
    "DatasetNotFoundError",
    "EvaluationDataset",
    "FeatureStore",
    "ImageRecord",
    "ImageSource",
    "LoadedSplit",
    "MissingImagesError",
    "TrainingDataset",
    "ViewSampler",
    "Vocabulary",
    "build_eval_loader",
    "build_loader",
    "build_source",
    "build_train_loader",
    "build_transform",
    "cached_features",
    "collate_batch",
    "default_cache_dir",
    "drop_missing",
    "load_split",
    "tokenize",
]
