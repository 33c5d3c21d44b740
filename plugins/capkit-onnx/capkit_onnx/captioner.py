"""``OnnxCaptioner``: an exported capkit model (``capkit export --format onnx``) in onnxruntime sessions, with
the API of ``capkit.TrainedCaptioner`` (``from_pretrained``, ``caption``) and no PyTorch."""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import onnxruntime as ort
from PIL import Image

from capkit_onnx.beam_search import EOS_ID, Arrays, Hypothesis, beam_search
from capkit_onnx.images import DEFAULT_MAX_PIXELS, open_image, preprocess

__all__ = ["FORMAT_VERSION", "CONFIG_FILE", "ImageInput", "OnnxCaptionResult", "OnnxCaptioner", "OnnxModelError"]

FORMAT_VERSION = 3  # capkit.export.onnx.FORMAT_VERSION; 1 lacks no_repeat_ngram_size, 1 and 2 suppress_unk
READABLE_FORMATS = (1, 2, 3)
CONFIG_FILE = "config.json"
DECODING_KEYS = ("beam_size", "max_len", "length_penalty", "no_repeat_ngram_size", "suppress_unk")
DECODING_DEFAULTS = {"no_repeat_ngram_size": 0, "suppress_unk": False}  # settings that older exports lack
ENCODER_CHUNK = 16  # images per encoder run: its activations, not the beam search, set the peak memory
BATCH_SIZE = 64  # images per beam search by default
SPECIAL_TOKENS = 4  # <pad> <start> <end> <unk> start every vocabulary

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]


class OnnxModelError(ValueError):
    """An exported model folder that cannot be used: a file missing, another format, a key missing."""


@dataclass
class OnnxCaptionResult:
    """One image's caption and where the model looked for each of its words."""

    caption: str
    score: float  # the caption's total log-probability, <end> included
    words: list[str]
    attention: np.ndarray  # (T + 1, H, W): a map per word, then <end>'s; each sums to 1
    hypothesis: Hypothesis
    source: str | None = None  # the file it came from, if any
    n_best: list[tuple[str, float]] = field(default_factory=list)  # (caption, score), best first, when asked


class OnnxCaptioner:
    """The three graphs of an exported model in onnxruntime sessions, its vocabulary, preprocessing and decoding
    settings. Build it with ``from_pretrained(directory)``."""

    def __init__(self, directory: Path, config: dict[str, Any], sessions: Mapping[str, ort.InferenceSession]):
        self.directory, self.config = directory, config
        self.encoder, self.memory, self.step_session = sessions["encoder"], sessions["memory"], sessions["step"]
        self.vocabulary: list[str] = list(config["vocabulary"])
        self.preprocessing: dict[str, Any] = dict(config["preprocessing"])
        self.grid: tuple[int, int] = (int(config["grid"][0]), int(config["grid"][1]))
        self.memory_names: list[str] = list(config["memory"])
        self.state_specs: list[dict[str, Any]] = list(config["state"])
        self._step_inputs = {i.name for i in self.step_session.get_inputs()}  # unused inputs may be pruned
        self._memory_outputs = [o.name for o in self.memory.get_outputs()]
        self._step_outputs = ["logits", "alpha", *(spec["output"] for spec in self.state_specs)]

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, *, providers: Sequence[str] | None = None, threads: int | None = None
    ) -> OnnxCaptioner:
        """Load the folder ``capkit export --format onnx`` wrote. ``providers``: onnxruntime execution providers
        (default: the CPU); ``threads``: intra-op threads (default: onnxruntime's, one per core).

        Raises:
            OnnxModelError: no ``config.json`` of this format there, or a graph file missing.
        """
        directory = Path(directory)
        path = directory / CONFIG_FILE
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise OnnxModelError(f"{path}: cannot read the exported model's config ({type(err).__name__}: {err}); "
                                 f"export the model with `capkit export --format onnx {directory}`") from err
        if not isinstance(config, dict) or config.get("capkit_onnx_format") not in READABLE_FORMATS:
            found = config.get("capkit_onnx_format") if isinstance(config, dict) else None
            raise OnnxModelError(f"{path}: not a capkit ONNX export of format {FORMAT_VERSION} or earlier "
                                 f"(capkit_onnx_format: {found!r}); export the model again with `capkit export "
                                 f"--format onnx`, or upgrade capkit-onnx")
        missing = [k for k in ("vocabulary", "preprocessing", "decoding", "grid", "graphs", "memory", "state")
                   if k not in config]
        if missing:
            raise OnnxModelError(f"{path}: lacks {', '.join(missing)}; export the model again")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        sessions = {}
        for role in ("encoder", "memory", "step"):
            graph = directory / config["graphs"][role]
            if not graph.is_file():
                raise OnnxModelError(f"{graph}: missing ({role} graph); export the model again")
            sessions[role] = ort.InferenceSession(str(graph), options, providers=list(providers or
                                                                                       ["CPUExecutionProvider"]))
        return cls(directory, config, sessions)

    # ---- settings ------------------------------------------------------------------------------------------

    @property
    def decoding(self) -> dict[str, Any]:
        """The decoding settings the model was evaluated with: ``beam_size``, ``max_len``, ``length_penalty``,
        ``no_repeat_ngram_size``, ``suppress_unk``."""
        return {k: self.config["decoding"].get(k, DECODING_DEFAULTS.get(k)) for k in DECODING_KEYS}

    def decoding_with(self, **overrides: Any) -> dict[str, Any]:
        """``decoding`` with the overrides that are not None, checked."""
        unknown = set(overrides) - set(DECODING_KEYS)
        if unknown:
            raise TypeError(f"unknown decoding settings {sorted(unknown)}; the settings are {', '.join(DECODING_KEYS)}")
        settings = {**self.decoding, **{k: v for k, v in overrides.items() if v is not None}}
        for key, least in (("beam_size", 1), ("max_len", 1), ("no_repeat_ngram_size", 0)):
            if not isinstance(settings[key], int) or isinstance(settings[key], bool) or settings[key] < least:
                raise ValueError(f"{key} must be a whole number of at least {least}, got {settings[key]!r}")
        if not isinstance(settings["suppress_unk"], bool):
            raise ValueError(f"suppress_unk must be true or false, got {settings['suppress_unk']!r}")
        if not math.isfinite(settings["length_penalty"]):
            raise ValueError(f"length_penalty must be a finite number, got {settings['length_penalty']!r}")
        limit = self.config.get("max_steps")
        if limit is not None and settings["max_len"] + 1 > limit:
            raise ValueError(f"max_len {settings['max_len']} needs {settings['max_len'] + 1} decoder positions; this "
                             f"model has {limit} (its decoder's max_len)")
        return settings

    def preprocess(self, picture: Image.Image) -> np.ndarray:
        """An RGB picture -> the encoder's uint8 pixels (H, W, 3)."""
        return preprocess(picture, self.preprocessing)

    def decode(self, tokens: Iterable[int]) -> str:
        """Words up to the first ``<end>``, special tokens skipped (``capkit.data.Vocabulary.decode``)."""
        words = []
        for t in tokens:
            if t == EOS_ID:
                break
            if t >= SPECIAL_TOKENS:
                words.append(self.vocabulary[t])
        return " ".join(words)

    # ---- the graphs ----------------------------------------------------------------------------------------

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """pixels (B, H, W, 3) uint8 -> features (B, N, C), ``ENCODER_CHUNK`` images per run."""
        parts = [self.encoder.run(["features"], {"pixels": np.ascontiguousarray(chunk)})[0]
                 for chunk in np.array_split(pixels, max(1, math.ceil(len(pixels) / ENCODER_CHUNK)))]
        return np.concatenate(parts)

    def prepare(self, features: np.ndarray) -> tuple[Arrays, Arrays]:
        """features (B, N, C) -> (attention memory, initial decoder state), each array batch-first."""
        outputs = dict(zip(self._memory_outputs, self.memory.run(self._memory_outputs, {"features": features})))
        memory = {name: outputs[name] for name in self.memory_names}
        state = {}
        for spec in self.state_specs:
            if spec["initial"] == "empty":  # e.g. a key/value cache of no step yet
                state[spec["name"]] = np.zeros((len(features), *spec["shape"]), dtype=spec["dtype"])
            else:
                state[spec["name"]] = outputs[spec["input"]]
        return memory, state

    def step(self, tokens: np.ndarray, state: Arrays, memory: Arrays) -> tuple[np.ndarray, np.ndarray, Arrays]:
        """One decoder step: tokens (R,) -> logits (R, V), alpha (R, N), next state."""
        feed = {"tokens": tokens, **memory, **{spec["input"]: state[spec["name"]] for spec in self.state_specs}}
        out = self.step_session.run(self._step_outputs, {k: v for k, v in feed.items() if k in self._step_inputs})
        return out[0], out[1], {spec["name"]: value for spec, value in zip(self.state_specs, out[2:])}

    def generate(self, pixels: np.ndarray, **decoding: Any) -> list[list[Hypothesis]]:
        """Beam search over pixels (B, H, W, 3) uint8: each image's best hypotheses, best first."""
        memory, state = self.prepare(self.encode(pixels))
        return beam_search(self.step, state, memory, **decoding)

    # ---- captioning ----------------------------------------------------------------------------------------

    def caption(
        self, images: ImageInput | Iterable[ImageInput], *, beam_size: int | None = None, max_len: int | None = None,
        length_penalty: float | None = None, batch_size: int | None = None, n_best: int = 1,
        max_pixels: int | None = DEFAULT_MAX_PIXELS, no_repeat_ngram_size: int | None = None,
        suppress_unk: bool | None = None,
    ) -> OnnxCaptionResult | list[OnnxCaptionResult]:
        """Caption one image or several: file paths, PIL images or uint8 arrays (H, W, 3) of a whole picture.
        One image gives one result, several a list. Decodes with the model's settings unless told otherwise,
        ``batch_size`` images per beam search; ``n_best`` > 1 fills each result's ``n_best``."""
        single = isinstance(images, (str, os.PathLike, Image.Image)) or (
            isinstance(images, np.ndarray) and images.ndim == 3
        )
        results = list(self.iter_captions([images] if single else images, beam_size=beam_size, max_len=max_len,
                                          length_penalty=length_penalty, batch_size=batch_size, n_best=n_best,
                                          max_pixels=max_pixels, no_repeat_ngram_size=no_repeat_ngram_size,
                                          suppress_unk=suppress_unk))
        return results[0] if single else results

    def iter_captions(
        self, images: Iterable[ImageInput], *, beam_size: int | None = None, max_len: int | None = None,
        length_penalty: float | None = None, batch_size: int | None = None, n_best: int = 1,
        max_pixels: int | None = DEFAULT_MAX_PIXELS, no_repeat_ngram_size: int | None = None,
        suppress_unk: bool | None = None,
    ) -> Iterator[OnnxCaptionResult]:
        """``caption`` as a stream, ``batch_size`` images at a time."""
        decoding = self.decoding_with(beam_size=beam_size, max_len=max_len, length_penalty=length_penalty,
                                      no_repeat_ngram_size=no_repeat_ngram_size, suppress_unk=suppress_unk)
        batch: list[tuple[np.ndarray, str | None]] = []
        for item in images:
            batch.append(self._open(item, max_pixels))
            if len(batch) == (batch_size or BATCH_SIZE):
                yield from self.caption_pixels([p for p, _ in batch], [s for _, s in batch], n_best=n_best, **decoding)
                batch = []
        if batch:
            yield from self.caption_pixels([p for p, _ in batch], [s for _, s in batch], n_best=n_best, **decoding)

    def caption_pixels(
        self, pixels: Sequence[np.ndarray] | np.ndarray, sources: Sequence[str | None] | None = None, *,
        beam_size: int, max_len: int, length_penalty: float, n_best: int = 1, no_repeat_ngram_size: int = 0,
        suppress_unk: bool = False,
    ) -> list[OnnxCaptionResult]:
        """One beam search over preprocessed pixels ((B, H, W, 3) uint8, or B arrays (H, W, 3))."""
        if not isinstance(n_best, int) or not 1 <= n_best <= beam_size:
            raise ValueError(f"n_best must be a whole number from 1 to the beam size ({beam_size}), got {n_best!r}")
        pixels = np.stack(list(pixels)) if not isinstance(pixels, np.ndarray) else pixels
        generation = self.generate(pixels, beam_size=beam_size, max_len=max_len, length_penalty=length_penalty,
                                   n_best=n_best, no_repeat_ngram_size=no_repeat_ngram_size, suppress_unk=suppress_unk)
        results = []
        for i, hyps in enumerate(generation):
            best = hyps[0]
            results.append(OnnxCaptionResult(
                caption=self.decode(best.tokens), score=best.score,
                words=[self.vocabulary[t] for t in best.tokens],
                attention=best.alphas.reshape(-1, *self.grid), hypothesis=best,
                source=sources[i] if sources is not None else None,
                n_best=[(self.decode(h.tokens), h.score) for h in hyps] if n_best > 1 else [],
            ))
        return results

    def _open(self, item: ImageInput, max_pixels: int | None) -> tuple[np.ndarray, str | None]:
        if isinstance(item, Image.Image):
            return self.preprocess(item.convert("RGB")), getattr(item, "filename", None) or None
        if isinstance(item, np.ndarray):
            if item.ndim != 3 or item.shape[2] != 3 or item.dtype != np.uint8:
                raise ValueError(f"an image array is uint8 (H, W, 3), got {item.dtype} {item.shape}")
            return self.preprocess(Image.fromarray(item)), None
        if isinstance(item, (str, os.PathLike)):
            return self.preprocess(open_image(item, max_pixels=max_pixels)), os.fspath(item)
        raise TypeError(f"cannot caption a {type(item).__name__}: give file paths, PIL images or uint8 arrays")

