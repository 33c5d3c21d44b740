"""Export a trained captioner to ONNX: three graphs and a JSON file, what the torch-free runtime ``capkit_onnx``
(``plugins/capkit-onnx``) runs a beam search over.

The folder holds (the role names of optimum's ``ORTModelForVision2Seq``, one graph per role):

- ``encoder.onnx``: ``pixels`` (B, H, W, 3) uint8, the picture already resized and cropped as ``preprocessing``
  says -> ``features`` (B, N, C); the scaling to [0, 1] and the mean / std normalisation are in the graph;
- ``memory.onnx``: ``features`` -> the attention memory (``values``, and ``keys`` when the attention precomputes
  any) and the decoder's initial state (``state_<name>``: the tensors of it that do not start empty, e.g. an
  LSTM's ``h`` and ``c``);
- ``decoder_step.onnx``: ``tokens`` (B,) int64, the memory and the state (``state_<name>``) -> ``logits``
  (B, V), ``alpha`` (B, N) and ``next_<name>`` for each state tensor;
- ``config.json``: the vocabulary, preprocessing and decoding defaults, the grid, and how the graphs fit
  together (the memory and state names; the state tensors that start empty and grow by one step per call, such
  as a Transformer's key/value cache, with their shapes).

Every batch dimension is dynamic, and so is a growing state's step dimension. The graphs come from
``torch.export`` (``torch.onnx.export(..., dynamo=True)`` given the exported program) and are checked at export
time: ``onnx.checker``, then onnxruntime runs them on the same inputs as the model and their outputs must agree
(as optimum's ``validate_model_outputs`` does); with ``fp16`` the weights are stored as float16 and cast back to
float32 in the graph (files half the size; the arithmetic stays float32).
"""
from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import capkit
from capkit.errors import ExportError, MissingDependencyError, OutputPathError
from capkit.models.attention.base import AttentionMemory
from capkit.pretrained.format import stored_decoding
from capkit.pretrained.model import TrainedCaptioner
from capkit.types import BOS_ID, EncoderOutput

__all__ = ["FORMAT_VERSION", "CONFIG_FILE", "GRAPH_FILES", "SUPPORTED_CROP_MODES", "ExportSummary", "export_onnx",
           "EncoderGraph", "MemoryGraph", "StepGraph"]

# 2: decoding.no_repeat_ngram_size (capkit-onnx 0.2); 3: decoding.suppress_unk (capkit-onnx 0.3). A setting left at
# its neutral value is not written, and an export is written as the oldest format that holds the settings it writes:
# a runtime reads it if it can, and refuses it (rather than decoding without a setting) if it cannot.
FORMAT_OF_SETTING = {"no_repeat_ngram_size": 2, "suppress_unk": 3}
FORMAT_VERSION = max(FORMAT_OF_SETTING.values())
CONFIG_FILE = "config.json"
GRAPH_FILES = {"encoder": "encoder.onnx", "memory": "memory.onnx", "step": "decoder_step.onnx"}
SUPPORTED_CROP_MODES = ("center", "squash")  # the timm eval transforms the runtime reproduces with Pillow
# onnxruntime against the model on the same inputs, at export time (optimum's default atol is 1e-5 on small
# outputs; a deep encoder's float32 features differ more between two kernels' summation orders)
RTOL, ATOL = 1e-3, 1e-4
# float16 weights change the outputs by the weights' rounding (a few per cent of an encoder's features): only
# gross errors are refused
FP16_RTOL, FP16_ATOL = 1e-1, 1e-1
FP16_MIN_ELEMENTS = 1024  # smaller weights (biases, normalisation scales) stay float32: precision at no cost in size
# the ONNX translation logs every optimisation pass at INFO; torch.export warns of a failure that the ExportError
# names in one line
QUIET_LOGGERS = {"onnxscript": logging.WARNING, "onnx_ir": logging.WARNING,
                 "torch.fx.experimental.symbolic_shapes": logging.CRITICAL, "torch.export": logging.CRITICAL}
EXAMPLE_BATCH = 2  # 0 and 1 would be specialised by torch.export, so examples have 2 rows and 2 past steps
EXAMPLE_STEPS = 2


class EncoderGraph(nn.Module):
    """pixels (B, H, W, 3) uint8 -> features (B, N, C): ``ToTensor`` and ``Normalize`` as timm's transform
    computes them (float32 division by 255, then (x - mean) / std), then the encoder."""

    def __init__(self, encoder: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.encoder = encoder
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def normalise(self, pixels: Tensor) -> Tensor:
        """pixels (B, H, W, 3) uint8 -> (B, 3, H, W), what the encoder takes."""
        return (pixels.permute(0, 3, 1, 2).float().div(255) - self.mean) / self.std

    def forward(self, pixels: Tensor) -> Tensor:
        return self.encoder(self.normalise(pixels)).feats


class MemoryGraph(nn.Module):
    """features (B, N, C) -> the memory tensors, then the initial state tensors named ``state_names``."""

    def __init__(self, decoder: nn.Module, grid: tuple[int, int], has_keys: bool, state_names: Sequence[str]):
        super().__init__()
        self.decoder, self.grid, self.has_keys, self.state_names = decoder, grid, has_keys, list(state_names)

    def forward(self, features: Tensor) -> tuple[Tensor, ...]:
        memory = self.decoder.prepare(EncoderOutput(features, self.grid))
        state = self.decoder.init_state(memory)
        keys = (memory.keys,) if self.has_keys else ()
        return (memory.values, *keys, *(state[name] for name in self.state_names))


class StepGraph(nn.Module):
    """tokens (B,), memory tensors, state tensors (``state_names``, in order) -> logits (B, V), alpha (B, N), next
    state tensors: one ``Decoder.step``, the memory with as many rows as the tokens (never shared)."""

    def __init__(self, decoder: nn.Module, grid: tuple[int, int], has_keys: bool, state_names: Sequence[str]):
        super().__init__()
        self.decoder, self.grid, self.has_keys, self.state_names = decoder, grid, has_keys, list(state_names)

    def forward(self, tokens: Tensor, memory: tuple[Tensor, ...], state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        keys = memory[1] if self.has_keys else None
        logits, alpha, new = self.decoder.step(
            tokens, dict(zip(self.state_names, state)), AttentionMemory(memory[0], keys, self.grid)
        )
        return (logits, alpha, *(new[name] for name in self.state_names))


@dataclass
class ExportSummary:
    """What ``export_onnx`` wrote and how closely the graphs matched the model."""

    directory: Path
    sizes: dict[str, int]  # file name -> bytes
    max_abs_diff: dict[str, float] = field(default_factory=dict)  # graph role -> largest |onnxruntime - torch|


def export_onnx(
    model: TrainedCaptioner, directory: str | os.PathLike, *, fp16: bool = False, opset: int | None = None,
    overwrite: bool = False,
) -> ExportSummary:
    """Write ``model`` as ONNX graphs and ``config.json`` into ``directory`` (see the module docstring); the
    graphs are checked against the model before the call returns, and written there only then. ``overwrite``
    replaces the files of an earlier export; otherwise ``directory`` must be new or empty.

    Raises:
        MissingDependencyError: onnx, onnxscript or onnxruntime is not installed.
        ExportError: a component cannot be exported (the message names it and why), the preprocessing is one the
            runtime cannot reproduce, or the graphs' outputs differ from the model's.
        OutputPathError: ``directory`` cannot be written, or holds files and ``overwrite`` is not set.
    """
    onnx, ort = _onnx_modules()
    _check_preprocessing(model.preprocessing)
    device = model.device
    model.to("cpu")  # traced on the CPU; moved back below
    try:
        return _export(onnx, ort, model, Path(directory), fp16, opset, overwrite)
    finally:
        model.to(device)


def _export(
    onnx: Any, ort: Any, model: TrainedCaptioner, target: Path, fp16: bool, opset: int | None, overwrite: bool
) -> ExportSummary:
    captioner = model.model.eval()
    decoder = captioner.decoder
    _prepare_directory(target, overwrite)

    _, height, width = model.preprocessing["input_size"]
    pixels = torch.randint(0, 256, (EXAMPLE_BATCH, height, width, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    encoder_graph = EncoderGraph(captioner.encoder, model.preprocessing["mean"], model.preprocessing["std"]).eval()
    with torch.no_grad():
        enc = captioner.encoder(encoder_graph.normalise(pixels))
        memory = decoder.prepare(enc)
        initial = decoder.init_state(memory)
    grid = tuple(int(v) for v in enc.grid)
    has_keys = memory.keys is not None
    memory_names = ["values", "keys"] if has_keys else ["values"]
    # the state tensors that start empty and grow by a row of their dimension 1 per step (a key/value cache)
    empty = [name for name, value in initial.items() if value.dim() > 1 and value.shape[1] == 0]
    from_graph = [name for name in initial if name not in empty]
    step_inputs = _example_step_inputs(decoder, memory, initial, empty, model)
    names = list(initial)

    memory_graph = MemoryGraph(decoder, grid, has_keys, from_graph).eval()
    step_graph = StepGraph(decoder, grid, has_keys, names).eval()
    batch = torch.export.Dim("batch")
    steps = _steps_dim(decoder)
    roles = {
        "encoder": (encoder_graph, (pixels,), ({0: batch},), ["pixels"], ["features"]),
        "memory": (memory_graph, (enc.feats,), ({0: batch},), ["features"],
                   memory_names + [f"state_{name}" for name in from_graph]),
        "step": (
            step_graph, step_inputs,
            ({0: batch}, tuple({0: batch} for _ in memory_names),
             tuple({0: batch, **({1: steps} if name in empty else {})} for name in names)),
            ["tokens", *memory_names, *(f"state_{name}" for name in names)],
            ["logits", "alpha", *(f"next_{name}" for name in names)],
        ),
    }
    summary = ExportSummary(target, {})
    with tempfile.TemporaryDirectory(prefix="capkit-export-") as tmp, _quiet(QUIET_LOGGERS):
        for role, (graph, args, dynamic, inputs, outputs) in roles.items():
            path = Path(tmp) / GRAPH_FILES[role]
            _export_graph(role, graph, args, dynamic, inputs, outputs, path, model, opset)
            onnx.checker.check_model(str(path))
            summary.max_abs_diff[role] = _validate(ort, role, graph, args, path, inputs, outputs, RTOL, ATOL)
            if fp16:
                _store_float16(onnx, path)
                onnx.checker.check_model(str(path))
                summary.max_abs_diff[role] = _validate(ort, role, graph, args, path, inputs, outputs, FP16_RTOL,
                                                       FP16_ATOL)
        for file in GRAPH_FILES.values():
            shutil.move(str(Path(tmp) / file), target / file)
    decoding = stored_decoding(model.decoding)
    config = {
        "capkit_onnx_format": max([1, *(FORMAT_OF_SETTING[k] for k in decoding if k in FORMAT_OF_SETTING)]),
        "capkit_version": capkit.__version__,
        "architecture": model.architecture,
        "vocabulary": list(model.vocab.itos),
        "preprocessing": _jsonable(model.preprocessing),
        "decoding": decoding,
        "grid": list(grid),
        "weights_dtype": "float16" if fp16 else "float32",
        "graphs": dict(GRAPH_FILES),
        "memory": memory_names,
        # in the step graph's order; "empty": made by the runtime as zeros of (B, *shape), the 0 growing per step
        "state": [
            {"name": name, "input": f"state_{name}", "output": f"next_{name}",
             **({"initial": "empty", "shape": list(initial[name].shape[1:]),
                 "dtype": str(initial[name].dtype).removeprefix("torch.")} if name in empty else {"initial": "memory"})}
            for name in names
        ],
        "max_steps": getattr(decoder, "max_len", None) if empty else None,
    }
    (target / CONFIG_FILE).write_text(json.dumps(config, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    summary.sizes = {p.name: p.stat().st_size for p in sorted(target.iterdir()) if p.name in
                     {*GRAPH_FILES.values(), CONFIG_FILE}}
    return summary


@contextlib.contextmanager
def _quiet(levels_by_name: Mapping[str, int]) -> Iterator[None]:
    """These loggers at these levels within."""
    loggers = [logging.getLogger(name) for name in levels_by_name]
    levels = [logger.level for logger in loggers]
    for logger, level in zip(loggers, levels_by_name.values()):
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _onnx_modules():
    try:
        import onnx
        import onnxruntime as ort
        import onnxscript  # noqa: F401  (torch.onnx.export(dynamo=True) translates with it)
    except ImportError as err:
        raise MissingDependencyError(f"ONNX export needs {err.name}: pip install 'capkit-captioning[onnx]'") from err
    return onnx, ort


def _check_preprocessing(preprocessing: Mapping[str, Any]) -> None:
    mode = preprocessing.get("crop_mode") or "center"
    _, height, width = preprocessing["input_size"]
    if mode not in SUPPORTED_CROP_MODES or (mode == "center" and height != width):
        raise ExportError(
            f"the model's preprocessing (crop_mode {mode!r}, input_size {height} x {width}) cannot be reproduced by "
            f"the ONNX runtime, which supports crop_mode {' and '.join(SUPPORTED_CROP_MODES)} (center: square inputs)"
        )


def _prepare_directory(target: Path, overwrite: bool) -> None:
    if target.exists() and not target.is_dir():
        raise OutputPathError(f"{target}: is a file; give a folder for the exported model")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise OutputPathError(f"{target}: not empty; give a new folder, or --overwrite (overwrite=True) to replace "
                              f"the export there")
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputPathError(f"{target}: cannot hold the exported model ({err.strerror or err}); give a folder") \
            from err


def _example_step_inputs(
    decoder: nn.Module, memory: AttentionMemory, state: dict[str, Tensor], empty: list[str], model: TrainedCaptioner
) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
    """The step graph's example inputs: the next tokens, the memory, and the state after ``EXAMPLE_STEPS`` steps
    (so that a growing dimension is neither 0 nor 1). Refuses a state that grows by other than one row of its
    first non-batch dimension per step."""
    vocab = len(model.vocab)
    tokens = torch.full((EXAMPLE_BATCH,), BOS_ID, dtype=torch.long)
    with torch.no_grad():
        for _ in range(EXAMPLE_STEPS):
            _, _, state = decoder.step(tokens, state, memory)
            tokens = torch.arange(EXAMPLE_BATCH) % max(1, vocab - 4) + 4
    for name, value in state.items():
        if name in empty and value.shape[1] != EXAMPLE_STEPS:
            raise ExportError(f"{_describe(model, 'decoder')} cannot be exported to ONNX: its state {name!r} grows "
                              f"by {value.shape[1] / EXAMPLE_STEPS:g} rows per step; the runtime needs one")
    keys = (memory.keys,) if memory.keys is not None else ()
    return tokens, (memory.values, *keys), tuple(state.values())


def _steps_dim(decoder: nn.Module) -> torch.export.Dim:
    """The past steps of a growing state: at most ``max_len - 1`` for a decoder with positions up to ``max_len``
    (its step checks that bound, which an unbounded dimension would fail)."""
    limit = getattr(decoder, "max_len", None)
    return torch.export.Dim("steps", max=limit - 1) if isinstance(limit, int) and limit > 2 else torch.export.Dim("steps")


def _export_graph(
    role: str, graph: nn.Module, args: tuple, dynamic: tuple, inputs: list[str], outputs: list[str], path: Path,
    model: TrainedCaptioner, opset: int | None,
) -> None:
    """torch.export, then the ONNX translation; a failure of either is one ExportError naming the component."""
    try:  # a failing torch.export prints the partial graph to stderr: the ExportError says it in one line
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            program = torch.export.export(graph, args, dynamic_shapes=dynamic, strict=False)
    except Exception as err:  # noqa: BLE001  (any failure of the tracer is the component's)
        raise ExportError(f"{_describe(model, _culprit(err, model, role))} cannot be exported to ONNX: "
                          f"{_reason(err)}") from err
    try:
        torch.onnx.export(program, (), str(path), dynamo=True, input_names=inputs, output_names=outputs,
                          opset_version=opset, external_data=False, verbose=False, report=False)
    except Exception as err:  # noqa: BLE001
        raise ExportError(f"{_describe(model, _culprit(err, model, role))} cannot be translated to ONNX: "
                          f"{_reason(err)}") from err


def _components(model: TrainedCaptioner) -> dict[str, nn.Module]:
    decoder = model.model.decoder
    found = {"encoder": model.model.encoder, "decoder": decoder}
    attention = getattr(decoder, "attention", None)
    if isinstance(attention, nn.Module):
        found["attention"] = attention
    return found


def _culprit(err: BaseException, model: TrainedCaptioner, role: str) -> str:
    """Which component (``encoder``, ``attention``, ``decoder``) the innermost traceback frame in one of their
    source files belongs to; the graph's own component when no frame is."""
    files = {}
    for kind, module in _components(model).items():
        for cls in type(module).__mro__:
            if cls.__module__.startswith(("torch", "builtins", "abc")):
                continue
            try:
                files.setdefault(os.path.realpath(inspect.getfile(cls)), kind)
            except TypeError:
                continue
    frames = []
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        tb = err.__traceback__
        while tb is not None:
            frames.append(os.path.realpath(tb.tb_frame.f_code.co_filename))
            tb = tb.tb_next
        err = err.__cause__ or err.__context__
    for filename in reversed(frames):
        if filename in files:
            return files[filename]
    return "encoder" if role == "encoder" else "decoder"


def _describe(model: TrainedCaptioner, kind: str) -> str:
    """``the attention 'adaptive' (from capkit_adaptive.attention.AdaptiveAttention)``."""
    module = _components(model).get(kind, model.model.decoder)
    section = model.config.model.get(kind) or {}
    name = section.get("name", type(module).__name__)
    return f"the {kind} {name!r} (from {type(module).__module__}.{type(module).__qualname__})"


def _reason(err: BaseException) -> str:
    """The root cause's first line, shortened."""
    while err.__cause__ is not None:
        err = err.__cause__
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = f"{type(err).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= 240 else text[:237] + "..."


def _flatten(args: Sequence[Any]) -> list[Tensor]:
    flat: list[Tensor] = []
    for arg in args:
        flat.extend(_flatten(arg) if isinstance(arg, (tuple, list)) else [arg])
    return flat


def _validate(
    ort: Any, role: str, graph: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
    rtol: float, atol: float,
) -> float:
    """Run the ONNX graph in onnxruntime on ``args`` and compare each output with the module's; returns the
    largest absolute difference.

    Raises:
        ExportError: an output of another shape, or values beyond ``rtol`` / ``atol``.
    """
    with torch.no_grad():
        out = graph(*args)
    expected = [t.numpy() for t in ((out,) if isinstance(out, Tensor) else out)]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    given = {name: value.numpy() for name, value in zip(inputs, _flatten(args))}
    got = session.run(outputs, {i.name: given[i.name] for i in session.get_inputs()})
    worst = 0.0
    for name, want, have in zip(outputs, expected, got):
        if want.shape != have.shape:
            raise ExportError(f"{path.name}: output {name!r} has shape {have.shape} in onnxruntime, {want.shape} in "
                              f"torch; the {role} graph was not exported faithfully")
        if want.size == 0:
            continue
        diff = float(np.abs(have.astype(np.float64) - want.astype(np.float64)).max())
        worst = max(worst, diff)
        if not np.allclose(have, want, rtol=rtol, atol=atol):
            raise ExportError(f"{path.name}: output {name!r} differs from the model's by up to {diff:.3g} (tolerance "
                              f"rtol {rtol:g}, atol {atol:g}); the {role} graph was not exported faithfully")
    return worst


def _store_float16(onnx: Any, path: Path) -> None:
    """Rewrite the graph with its float32 weights of at least ``FP16_MIN_ELEMENTS`` stored as float16, each cast
    back to float32 where it is read."""
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    kept, casts = [], []
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT or int(np.prod(init.dims)) < FP16_MIN_ELEMENTS:
            kept.append(init)
            continue
        half = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), f"{init.name}__fp16")
        kept.append(half)
        casts.append(helper.make_node("Cast", [half.name], [init.name], to=TensorProto.FLOAT))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(path))


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value
