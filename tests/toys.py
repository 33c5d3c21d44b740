"""Toy models, data and trainers shared by the engine tests (on the test path: ``pythonpath = tests``)."""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset

import capkit
from capkit.config import ExperimentConfig, to_container
from capkit.engine import CrossEntropyCriterion, Trainer, build_optimizer, build_train_sampler, save_checkpoint, seed_everything
from capkit.types import BOS_ID, EOS_ID, PAD_ID, CaptionBatch, EncoderOutput

AUX = {"doubly_stochastic": 1.0}

# a complete experiment on a few generated `shapes` images with a random tiny encoder: seconds to train
TINY_SHAPES_CONFIG = """
model:
  encoder: {name: timm, model_name: test_efficientnet}
  attention: {name: bahdanau, attn_dim: 8}
  decoder: {name: show_attend_tell, embed_dim: 8, hidden_dim: 16, feature_dim: 16}
data:
  dataset: {name: shapes, num_train: 12, num_val: 4, num_test: 4, image_size: 64}
  vocab_min_count: 1
  num_workers: 0
train: {epochs: 1, batch_size: 16, scheduler: none, early_stop_metric: sacrebleu}
eval: {metrics: [sacrebleu], beam_size: 2, max_len: 8}
"""


def tiny_model(finetune: str = "none") -> capkit.Captioner:
    return capkit.build_captioner(
        {
            "encoder": {"name": "timm", "model_name": "test_efficientnet", "finetune": finetune},
            "attention": {"name": "bahdanau", "attn_dim": 16},
            "decoder": {"name": "show_attend_tell", "embed_dim": 16, "hidden_dim": 32},
        },
        vocab_size=20,
    )


def random_captions(n: int, g: torch.Generator, max_words: int = 5) -> torch.Tensor:
    captions = torch.full((n, max_words + 2), PAD_ID)
    for i in range(n):
        k = int(torch.randint(1, max_words + 1, (1,), generator=g))
        captions[i, 0], captions[i, k + 1] = BOS_ID, EOS_ID
        captions[i, 1 : k + 1] = torch.randint(4, 20, (k,), generator=g)
    return captions


class ToyData(Dataset):
    """n items of cached features (grid 2 x 2, 256 channels: test_efficientnet's) or 32 x 32 images."""

    def __init__(self, n: int = 16, images: bool = False):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 32, 32, generator=g) if images else torch.randn(n, 4, 256, generator=g)
        self.images = images
        self.captions = random_captions(n, g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return str(i), self.x[i], self.captions[i]

    def collate(self, items) -> CaptionBatch:
        ids, xs, caps = zip(*items)
        x = torch.stack(xs)
        if self.images:
            return CaptionBatch(list(ids), captions=torch.stack(caps), images=x)
        return CaptionBatch(list(ids), captions=torch.stack(caps), features=EncoderOutput(x, (2, 2)))


def make_trainer(hooks=(), *, n=16, epochs=2, finetune="none", images=False, seed=0, **kwargs) -> Trainer:
    seed_everything(seed)
    model = tiny_model(finetune)
    data = ToyData(n, images)
    loader = DataLoader(data, batch_size=4, sampler=build_train_sampler(data, seed=seed), collate_fn=data.collate)
    optimizer = build_optimizer(model, lr=1e-2, encoder_lr=1e-3)
    kwargs = {"device": "cpu", "criterion": CrossEntropyCriterion(AUX), **kwargs}
    return Trainer(model, optimizer, loader, epochs=epochs, hooks=hooks, **kwargs)


# a tiny captioner on the random test_efficientnet, for checkpoints that the tools load
MODEL = {
    "encoder": {"name": "timm", "model_name": "test_efficientnet"},
    "attention": {"name": "bahdanau", "attn_dim": 8},
    "decoder": {"name": "show_attend_tell", "embed_dim": 8, "hidden_dim": 16},
}
WORDS = ["<pad>", "<start>", "<end>", "<unk>", "a", "red", "square"]


def write_checkpoint(path: Path, model_cfg: dict, stored_model_cfg: dict | None = None, plugins=()) -> Path:
    """A checkpoint of a freshly built model whose stored config says ``stored_model_cfg`` (default: its own)."""
    model = capkit.build_captioner(model_cfg, len(WORDS))
    config = to_container(OmegaConf.merge(OmegaConf.structured(ExperimentConfig), {"model": stored_model_cfg or model_cfg}))
    config["plugins"] = list(plugins)
    return save_checkpoint(path, {"model": model.state_dict(), "config": config, "vocab": WORDS})


# tiny models for the export tests: a random test_efficientnet encoder's features are ~1e-2, so that every image
# would get the same caption; the last batch norm's scale x100 and larger decoder weights make captions differ
TINY_DECODERS = {
    "show_attend_tell": ({"name": "bahdanau", "attn_dim": 16},
                         {"name": "show_attend_tell", "embed_dim": 16, "hidden_dim": 32, "feature_dim": 32}),
    "show_attend_tell_tied": ({"name": "bahdanau", "attn_dim": 16},
                              {"name": "show_attend_tell", "embed_dim": 16, "hidden_dim": 32, "feature_dim": 32,
                               "tie_embeddings": True}),
    "updown": ({"name": "bahdanau", "attn_dim": 16},
               {"name": "updown", "embed_dim": 16, "hidden_dim": 32, "feature_dim": 32}),
    "transformer": ({"name": "none"},
                    {"name": "transformer", "d_model": 32, "num_heads": 2, "num_layers": 1, "ffn_dim": 64,
                     "max_len": 20}),
}


def tiny_trained(decoder: str = "show_attend_tell", seed: int = 0) -> capkit.TrainedCaptioner:
    """A tiny random captioner (vocabulary of 30 words) whose captions differ from picture to picture."""
    from capkit.data import Vocabulary

    attention, decoder_cfg = TINY_DECODERS[decoder]
    model_cfg = {"encoder": {"name": "timm", "model_name": "test_efficientnet"}, "attention": attention,
                 "decoder": decoder_cfg}
    torch.manual_seed(seed)
    vocab = Vocabulary([f"w{i}" for i in range(30)])
    model = capkit.build_captioner(model_cfg, len(vocab)).eval()
    with torch.no_grad():
        model.encoder.model.bn2.weight.mul_(100)
        if decoder == "transformer":
            model.decoder.out.weight.mul_(3)
        else:
            for p in model.decoder.parameters():
                p.normal_(0, 0.3)
    config = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), {"model": model_cfg,
                                                                      "eval": {"beam_size": 3, "max_len": 8}})
    return capkit.TrainedCaptioner(model, vocab, config, torch.device("cpu"), dict(model.encoder.data_config))


def varied_pictures(n: int, seed: int = 0) -> list:
    """n RGB pictures of 60 to 200 pixels a side, each a noisy patch of its own colour."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pictures = []
    for _ in range(n):
        h, w = int(rng.integers(60, 200)), int(rng.integers(60, 200))
        pixels = np.clip(rng.integers(0, 256, 3) + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
        pictures.append(Image.fromarray(pixels))
    return pictures


def repeats_an_ngram(words: list, n: int) -> bool:
    """Whether the sequence ``words`` (words or word ids) holds some n-gram twice."""
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) < len(grams)
