"""ONNX export: one self-contained ``.onnx`` file that onnxruntime runs without torch (``onnx_backend.py``).

The graph:

- inputs ``images`` (B, 3, S, S) float32, normalised as the model's ``preprocess`` does, and ``modality``
  (B,) int64 ids into ``config.modalities``; with a modality classifier also ``classifier_images``
  (B, 3, s, s) float32, ``classifier_input``'s squashed image, s = ``config.classifier.input_size``;
- outputs ``masks`` (B, 1, S, S) logits, ``patch_logits`` (B, 1, S/2s', S/2s') and, with a classifier,
  ``modality_logits`` (B, M).

B is always dynamic. S is dynamic when the exporter manages it and the graph then matches the eager
model at every configured size (checked with onnxruntime before writing); otherwise the graph is fixed
at ``size`` and says so in its metadata. The model routes each image by gathering its modality's
controller and hypernetwork parameters (``controller.gathered_routing``), so any mix of modalities runs.
The metadata (``metadata_props``) holds ``format``, ``format_version``, the model ``config`` JSON and
``fixed_size`` ("" when S is dynamic): prediction pre- and post-processes from the file alone.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from espmedsam.errors import CheckpointError, InputError, MissingDependencyError
from espmedsam.files import atomic_write
from espmedsam.models.controller import gathered_routing
from espmedsam.models.espmedsam import ESPMedSAM
from espmedsam.models.graph_layout import graph_layout

FORMAT = "espmedsam-onnx"
FORMAT_VERSION = "1"
INPUTS = ("images", "modality")
CLASSIFIER_INPUT = "classifier_images"
OUTPUTS = ("masks", "patch_logits")
CLASSIFIER_OUTPUT = "modality_logits"
ENCODER_OUTPUT = "embeddings"
CLASSIFIER_FEATURES = "classifier_features"
MAX_BATCH = 1024
MAX_SIZE = 4096
_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
_CHECK_TOLERANCE = 1e-3  # max abs difference to eager fp32, relative to max(1, |reference|)
logger = logging.getLogger(__name__)


def require_onnx(packages: tuple[str, ...] = _PACKAGES, extra: str = "onnx") -> None:
    """Raise MissingDependencyError unless every one of ``packages`` is importable (``extra``: the
    package's optional-dependency group that brings them)."""
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingDependencyError(
            f"{'ONNX' if extra == 'onnx' else extra} support needs {', '.join(missing)}; "
            f'pip install "espmedsam[{extra}]"'
        )


class ExportGraph(nn.Module):
    """What the exported graph computes, as a module around the model (whose forward stays as it is)."""

    def __init__(self, model: ESPMedSAM) -> None:
        super().__init__()
        self.model = model
        self.has_classifier = getattr(model, "classifier", None) is not None

    @property
    def input_names(self) -> list[str]:
        return list(INPUTS) + ([CLASSIFIER_INPUT] if self.has_classifier else [])

    @property
    def output_names(self) -> list[str]:
        return list(OUTPUTS) + ([CLASSIFIER_OUTPUT] if self.has_classifier else [])

    def forward(
        self, images: torch.Tensor, modality: torch.Tensor, classifier_images: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Images (B, 3, S, S), ids (B,)[, classifier images (B, 3, s, s)] -> masks, patch and M logits."""
        out = self.model(images, modality)
        if not self.has_classifier:
            return out.masks, out.patch_logits
        return out.masks, out.patch_logits, self.model.classify(classifier_images)


class EncoderGraph(ExportGraph):
    """The image encoder with each image's controller, and the prompt-free decoding of its embedding:
    images (B, 3, S, S) and ids (B,) -> ``embeddings`` (B, 256, S/s, S/s), the encoder's output that the
    promptable decoder reads, then ``masks`` and ``patch_logits`` as ``ExportGraph``'s. With a modality
    classifier also its input, classifier images (B, 3, s, s), -> ``classifier_features`` (B, 2C), the
    controller-free embedding pooled as the classifier pools it (its small head and the unknown-image
    distance stay in torch, as the promptable decoder and the quality head do: ``openvino_encoder``)."""

    @property
    def output_names(self) -> list[str]:
        return [ENCODER_OUTPUT, *OUTPUTS] + ([CLASSIFIER_FEATURES] if self.has_classifier else [])

    def forward(
        self, images: torch.Tensor, modality: torch.Tensor, classifier_images: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        embeddings = self.model.encode(images, modality)
        out = self.model.decode(embeddings, modality, images.shape[-1], images)
        if not self.has_classifier:
            return embeddings, out.masks, out.patch_logits
        features = self.model.classifier.pool(self.model.encode(classifier_images, None))  # type: ignore[union-attr]
        return embeddings, out.masks, out.patch_logits, features


def export_onnx(
    model: ESPMedSAM, path: str | Path, *, size: int | None = None, opset: int | None = None
) -> Path:
    """Write ``model`` as one ONNX file (weights inside, float32), atomically.

    Args:
        model: the model; it is copied, never changed.
        path: the ``.onnx`` file to write (its folder is created); an existing file is replaced.
        size: a fixed input side S for the graph; None: S dynamic if the exporter manages it (checked
            against the eager model at every configured side), else fixed at ``config.image_size``.
        opset: the ONNX opset; None: the exporter's default.
    Returns:
        The written path.
    Raises:
        MissingDependencyError: onnx, onnxscript or onnxruntime is not installed.
        InputError: ``size`` is not a positive multiple of ``config.size_multiple``, or not an ESP-MedSAM.
        CheckpointError: the exporter fails.
    """
    require_onnx()
    if not isinstance(model, ESPMedSAM):
        raise InputError(f"ONNX export needs an ESP-MedSAM model, got {type(model).__name__}")
    config = model.config
    if size is not None and (size % config.size_multiple or size < config.size_multiple):
        raise InputError(f"export size must be a positive multiple of {config.size_multiple}, got {size}")
    graph = ExportGraph(copy.deepcopy(model).float().cpu().eval())
    proto = None if size else _dynamic_size_export(graph, config.image_size, opset)
    fixed = None if proto is not None else size or config.image_size
    if proto is None:
        proto = _to_onnx(_torch_export(graph, fixed, dynamic_size=False), graph, opset)
        mismatch = _check(proto, graph, [fixed])
        if mismatch:
            raise CheckpointError(f"the exported graph {mismatch}")
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config.to_json(),
        "fixed_size": str(fixed) if fixed else "",
    }
    import onnx

    onnx.helper.set_model_props(proto, metadata)
    return atomic_write(path, lambda file: file.write(proto.SerializeToString()))


def export_encoder_onnx(
    model: ESPMedSAM, path: str | Path, *, size: int | None = None, opset: int | None = None
) -> Path:
    """Write the image encoder of ``model`` (with its controllers) as an ONNX file (``EncoderGraph``),
    atomically: with a dynamic batch, and a dynamic input side when ``size`` is None, else fixed at
    ``size``. It is not compared with the eager model here (``openvino_encoder`` compiles and checks it).

    Raises:
        MissingDependencyError: onnx or onnxscript is not installed.
        CheckpointError: the exporter fails, or (``size`` None) no input side gives a dynamic-size graph.
    """
    require_onnx(("onnx", "onnxscript"), "openvino")
    graph = EncoderGraph(copy.deepcopy(model).float().cpu().eval())
    example = size or _padding_side(graph.model, model.config.image_size)
    if example is None:
        raise CheckpointError("no input side pads every attention block: no dynamic-size encoder graph")
    proto = _to_onnx(_torch_export(graph, example, dynamic_size=size is None), graph, opset)
    return atomic_write(path, lambda file: file.write(proto.SerializeToString()))


def check_sizes(model: ESPMedSAM, size: int) -> list[int]:
    """Input sides a dynamic-size graph is compared with the eager model at: the export side, the next
    multiple, and every configured one."""
    config = model.config
    return sorted({size, size + config.size_multiple, config.image_size, *config.inference_sizes})


def _dynamic_size_export(graph: ExportGraph, size: int, opset: int | None) -> Any | None:
    """The graph with a dynamic input side, or None (logged why) when the exporter cannot make one.

    torch.export bakes each shape-dependent branch in (its guard does not reach the ONNX graph), so the
    example side is one where no branch takes a special case: every attention block splits its grid into
    two or more windows per axis and pads it (padding by 0 is the same as none). The graph must then match
    the eager model at every configured side.
    """
    example = _padding_side(graph.model, size)
    if example is None:
        logger.info("no input side near %d pads every attention block: fixed size %d", size, size)
        return None
    try:
        program = _torch_export(graph, example, dynamic_size=True)
    except CheckpointError as error:
        logger.info("no dynamic-size export (%s): fixed size %d", error, size)
        return None
    proto = _to_onnx(program, graph, opset)
    mismatch = _check(proto, graph, check_sizes(graph.model, example))
    if mismatch:
        logger.info("the dynamic-size graph %s: fixed size %d", mismatch, size)
        return None
    return proto


def _padding_side(model: ESPMedSAM, size: int, steps: int = 16) -> int | None:
    """The input side nearest ``size`` at which every TinyViT attention block splits its token grid into
    two or more windows per axis and pads it."""
    from espmedsam.models.tinyvit import TinyViTBlock

    sides: list[tuple[TinyViTBlock, int]] = []  # each block and its grid side at ``size``
    hooks = [
        block.register_forward_pre_hook(lambda module, args: sides.append((module, args[0].shape[1])))
        for block in model.modules()
        if isinstance(block, TinyViTBlock)
    ]
    try:
        with torch.no_grad():
            model.image_encoder(torch.zeros(1, 3, size, size))
    finally:
        for hook in hooks:
            hook.remove()
    multiple = model.config.size_multiple
    candidates = sorted(
        range(size - steps * multiple, size + steps * multiple + 1, multiple), key=lambda s: abs(s - size)
    )
    for side in (s for s in candidates if s >= 2 * multiple):
        grids = [(block, grid * side // size) for block, grid in sides]
        # at least two windows per axis, and padding: the example meets no special case of either
        if all(grid > block.window_shape(grid) and grid % block.window_shape(grid) for block, grid in grids):
            return side
    return None


def _torch_export(graph: ExportGraph, size: int, *, dynamic_size: bool) -> Any:
    """torch.export (non-strict) of ``graph`` on an example batch of two modalities at side ``size``.

    Raises:
        CheckpointError: torch.export fails.
    """
    args, dims = _example(graph, size, dynamic_size)
    try:
        with _quiet(), _export_mode():
            return torch.export.export(graph, args, dynamic_shapes=dims, strict=False)
    except Exception as error:  # torch.export raises many kinds; any of them means no graph
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"torch.export failed: {first}") from error


def _to_onnx(program: Any, graph: ExportGraph, opset: int | None) -> Any:
    """The ONNX ModelProto of an ExportedProgram (dynamo exporter, onnxscript's optimiser).

    Raises:
        CheckpointError: the conversion fails.
    """
    try:
        with _quiet(), _export_mode():
            onnx_program = torch.onnx.export(
                program,
                input_names=graph.input_names,
                output_names=graph.output_names,
                opset_version=opset,
                dynamo=True,
                custom_translation_table=_translations(),
                external_data=False,
                verbose=False,
            )
    except Exception as error:  # the exporter raises many kinds; any of them means no graph
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"ONNX conversion failed: {first}") from error
    proto = onnx_program.model_proto
    _name_dimensions(proto)
    return proto


def _name_dimensions(proto: Any) -> None:
    """Call the symbolic batch and side dimensions of the graph's inputs and outputs "batch" and "size"."""
    images = next(value for value in proto.graph.input if value.name == "images")
    dims = images.type.tensor_type.shape.dim
    names = {dims[0].dim_param: "batch", dims[2].dim_param: "size"}
    for value in [*proto.graph.input, *proto.graph.output]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in names and dim.dim_param:
                dim.dim_param = names[dim.dim_param]


def _translations() -> dict[Any, Any]:
    return {torch.ops.aten.repeat_interleave.self_int: _repeat_interleave_self_int}


def _repeat_interleave_self_int(
    self: Any, repeats: Any, dim: int | None = None, output_size: Any = None
) -> Any:
    """``aten.repeat_interleave.self_int`` -> ONNX: unsqueeze after ``dim``, expand, merge the two axes.

    onnxscript 0.7's own translation puts symbolic repeats one axis early (the controllers' prompt tokens,
    repeated over an image's windows, meet it when S is dynamic).
    """
    from onnxscript import opset18 as op

    if dim is None:
        self, dim, rank = op.Reshape(self, op.Constant(value_ints=[-1])), 0, 1
    else:
        rank = len(self.shape)
    axis = dim % rank
    count = (
        op.Constant(value_ints=[repeats])
        if isinstance(repeats, int)
        else op.Reshape(repeats, op.Constant(value_ints=[-1]))
    )
    parts = [op.Constant(value_ints=[1] * (axis + 1)), count]
    if axis + 1 < rank:
        parts.append(op.Constant(value_ints=[1] * (rank - axis - 1)))
    tiled = op.Expand(op.Unsqueeze(self, op.Constant(value_ints=[axis + 1])), op.Concat(*parts, axis=0))
    shape = [op.Constant(value_ints=[-1]), op.Shape(self, start=axis + 1)]
    if axis:
        shape.insert(0, op.Shape(self, start=0, end=axis))
    return op.Reshape(tiled, op.Concat(*shape, axis=0))


def _inputs(
    graph: ExportGraph, side: int, batch: int, generator: torch.Generator
) -> tuple[torch.Tensor, ...]:
    """Random graph inputs for ``batch`` images of side ``side``, modalities 0, 1, 2, ... in turn."""
    config = graph.model.config
    images = torch.randn(batch, 3, side, side, generator=generator)
    modality = torch.arange(batch) % len(config.modalities)
    if not graph.has_classifier:
        return images, modality
    small = config.classifier.input_size
    return images, modality, torch.randn(batch, 3, small, small, generator=generator)


def _example(graph: ExportGraph, size: int, dynamic_size: bool) -> tuple[tuple[torch.Tensor, ...], dict]:
    """Example inputs (B = 2, two modalities when the model has them) and their dynamic dimensions."""
    config = graph.model.config
    args = _inputs(graph, size, 2, torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    image_dims: dict[int, Any] = {0: batch}
    if dynamic_size:
        side = config.size_multiple * torch.export.Dim("side", min=1, max=MAX_SIZE // config.size_multiple)
        image_dims.update({2: side, 3: side})
    dims: dict[str, Any] = {"images": image_dims, "modality": {0: batch}}
    if graph.has_classifier:
        dims[CLASSIFIER_INPUT] = {0: batch}
    return args, dims


@contextlib.contextmanager
def _export_mode() -> Iterator[None]:
    """Gathered modality routing, the encoder's graph layout (``graph_layout``), and the math attention
    kernel: the fused kernels' output strides make torch.export turn a reshape into a view that the ONNX
    decomposition then rejects."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with gathered_routing(), graph_layout(), sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        yield


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep the exporter's progress lines, warnings and log lines out of the command line's output."""
    loggers = [logging.getLogger(name) for name in ("torch", "onnxscript", "onnx_ir")]
    levels = [log.level for log in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for log in loggers:
            log.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for log, level in zip(loggers, levels, strict=True):
                log.setLevel(level)


def _check(proto: Any, graph: ExportGraph, sizes: list[int]) -> str | None:
    """Why the graph differs from the eager model at one of ``sizes`` (B = 2; and B = 1, 3 at the first
    side), or None."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(1)
    cases = [(sizes[0], 1), (sizes[0], 3)] + [(side, 2) for side in sizes]
    for side, batch in cases:
        args = _inputs(graph, side, batch, generator)
        with torch.no_grad():
            expected = graph(*args)
        feeds = {name: arg.numpy() for name, arg in zip(graph.input_names, args, strict=True)}
        try:
            got = session.run(None, feeds)
        except Exception as error:  # onnxruntime's own error types
            return f"fails at B={batch}, {side}x{side} ({str(error).splitlines()[0]})"
        for name, ref, out in zip(graph.output_names, expected, got, strict=True):
            ref = ref.numpy()
            diff = np.abs(out - ref) if out.shape == ref.shape else np.array([np.inf])
            # masks: a patch logit a rounding error away from the threshold flips a dense-prompt cell
            error = float(np.quantile(diff, 0.99) if name == "masks" else diff.max())
            if error > _CHECK_TOLERANCE * max(1.0, float(np.abs(ref).max())):
                return f"differs at B={batch}, {side}x{side} ({name}: {error:.2g})"
    return None
