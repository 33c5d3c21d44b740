"""Builtin datasets; importing this package registers them in ``capkit.registry.DATASETS``."""
from capkit.data.datasets import coco, flickr8k, folder, karpathy, shapes  # noqa: F401
