"""A native checkpoint with its image encoder compiled by OpenVINO, everything else in torch.

The image encoder is almost all of a forward pass. OpenVINO runs it about twice as fast as torch on a CPU
(``BENCHMARKS.md``, "Backends"), but an exported ``.onnx`` file holds only the prompt-free masks. Here the
encoder alone is exported (``export_encoder_onnx``), compiled by OpenVINO, and put in the model's place
(``OpenVinoImageEncoder``), so the decoders, boxes and clicks, the quality score and the modality
classifier keep running in torch: ``espmedsam serve --backend openvino`` and ``predict --backend openvino``
with a native checkpoint.

The exported encoder is kept in ``CACHE_DIR`` under a hash of the encoder's weights, so only the first
run with a checkpoint pays the export (about a minute); OpenVINO's own cache keeps the compiled graphs.
A fresh export is compared with the eager encoder in fp32 before it is used; a graph that differs is
refused with a one-line error.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from espmedsam.checkpoints.onnx_export import ENCODER_OUTPUT, INPUTS, export_encoder_onnx, require_onnx
from espmedsam.errors import CheckpointError
from espmedsam.models.controller import ControllerRoute
from espmedsam.models.espmedsam import ESPMedSAM
from espmedsam.models.tinyvit import TinyViT
from espmedsam.openvino_backend import CACHE_DIR as COMPILED_CACHE
from espmedsam.openvino_backend import DEVICE, cpu_has_bf16

CACHE_DIR = COMPILED_CACHE.parent / "encoders"
_CHECK_TOLERANCE = 2e-3  # max abs difference to the eager fp32 encoder, relative to max(1, |reference|)
logger = logging.getLogger(__name__)


def encoder_key(encoder: TinyViT) -> str:
    """A hash of the encoder's parameters and buffers (names, shapes, values): its cached graph's name."""
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:20]


class OpenVinoImageEncoder(nn.Module):
    """Stands in for ``ESPMedSAM.image_encoder``: images with a controller route run the compiled
    encoder graph (one static graph per input side, batch 1, as ``OpenVinoBackend`` does); the
    controller-free encoder (``route`` None, the modality classifier's) and training run the torch
    encoder it keeps.

    The graph is ``export_encoder_onnx``'s, kept in ``folder`` as ``encoder-KEY.onnx`` (any side) or,
    for an encoder whose windows follow the input side (no dynamic-side graph), ``encoder-KEY-S.onnx``
    per side S; it is exported at its first use and compared with the eager encoder then.

    Args:
        model: the model whose encoder this replaces (``use_openvino_encoder`` puts it in place).
        folder: where the exported graphs are kept.
        threads: inference threads; None: OpenVINO's default (one per physical core).
        bfloat16: bf16 where the CPU has it; False: fp32.
        cache_dir: OpenVINO's compiled-graph cache; None: none.
        progress: told before an export (which takes about a minute).
    """

    def __init__(
        self,
        model: ESPMedSAM,
        folder: Path,
        *,
        threads: int | None = None,
        bfloat16: bool = True,
        cache_dir: Path | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__()
        import openvino as ov

        self.torch_encoder = model.image_encoder
        # the model as it is now, torch encoder included, for exports: kept out of the module tree
        object.__setattr__(self, "_source", _with_encoder(model, self.torch_encoder))
        self.folder = Path(folder)
        self.key = encoder_key(self.torch_encoder)
        self.threads = threads
        self.cache_dir = cache_dir
        self.progress = progress
        self._core = ov.Core()
        self.precision = "bf16" if bfloat16 and cpu_has_bf16(self._core) else "f32"
        self._compiled: dict[tuple[int, str], Any] = {}
        self.train(model.training)  # a fresh module trains; this one starts as the model is

    def forward(self, images: torch.Tensor, route: ControllerRoute | None = None) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 256, S/s, S/s) float32 embeddings, as ``TinyViT.forward``."""
        if route is None or self.training or torch.is_grad_enabled() and images.requires_grad:
            return self.torch_encoder(images, route)
        side = images.shape[-1]
        pixels = images.detach().float().cpu().numpy()
        ids = route.index.cpu().numpy().astype(np.int64)
        compiled = self.compiled(side)
        embeddings = [self._run(compiled, pixels[i : i + 1], ids[i : i + 1]) for i in range(len(ids))]
        return torch.from_numpy(np.concatenate(embeddings)).to(images.device)

    def prepare(self, sides: Iterable[int]) -> None:
        """Export (if not cached) and compile the graphs of ``sides`` now, not at the first image there
        (a server does this before it takes requests)."""
        for side in sorted(set(sides)):
            self.compiled(side)

    def compiled(self, side: int, precision: str | None = None) -> Any:
        """The graph compiled for one image of ``side`` (in ``precision``, default the encoder's)."""
        precision = precision or self.precision
        key = (side, precision)
        if key not in self._compiled:
            model = self._core.read_model(str(self.graph(side)))
            model.reshape({INPUTS[0]: [1, 3, side, side], INPUTS[1]: [1]})
            config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
            if self.cache_dir is not None:
                config["CACHE_DIR"] = str(self.cache_dir)
            if self.threads:
                config["INFERENCE_NUM_THREADS"] = self.threads
            try:
                self._compiled[key] = self._core.compile_model(model, DEVICE, config)
            except Exception as error:  # OpenVINO raises RuntimeError with multi-line messages
                first = str(error).strip().splitlines()[0]
                raise CheckpointError(f"OpenVINO cannot compile the image encoder: {first}") from None
        return self._compiled[key]

    def graph(self, side: int) -> Path:
        """The exported graph that runs inputs of ``side``: the cached one, else a fresh, checked export
        (any side where the encoder allows it, else this side)."""
        dynamic = self.folder / f"encoder-{self.key}.onnx"
        fixed = self.folder / f"encoder-{self.key}-{side}.onnx"
        for path in (dynamic, fixed):
            if path.is_file():
                return path
        if self.progress:
            self.progress("exporting the image encoder for OpenVINO (once per checkpoint, about a minute)")
        try:
            path, check_side = export_encoder_onnx(self._source, dynamic), None
        except CheckpointError:  # windows that follow the input side: one graph per side
            path, check_side = export_encoder_onnx(self._source, fixed, size=side), side
        self._check(path, check_side)
        return path

    def _check(self, path: Path, side: int | None) -> None:
        """Compare the fp32 graph with the eager encoder on two images of two modalities (at ``side``,
        or the smallest configured side); a graph that differs is deleted and refused."""
        config = self._source.config
        side = side or min(config.inference_sizes or (config.image_size,))
        images = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))
        ids = torch.arange(2) % len(config.modalities)
        model = self._core.read_model(str(path))
        model.reshape({INPUTS[0]: [1, 3, side, side], INPUTS[1]: [1]})
        compiled = self._core.compile_model(model, DEVICE, {"INFERENCE_PRECISION_HINT": "f32"})
        with torch.no_grad():
            expected = self.torch_encoder(images, ControllerRoute.from_index(ids)).numpy()
        pixels, ids_array = images.numpy(), ids.numpy()
        got = np.concatenate([self._run(compiled, pixels[i : i + 1], ids_array[i : i + 1]) for i in range(2)])
        error = float(np.abs(got - expected).max())
        if error > _CHECK_TOLERANCE * max(1.0, float(np.abs(expected).max())):
            path.unlink(missing_ok=True)
            raise CheckpointError(f"the OpenVINO image encoder differs from the eager one ({error:.2g})")

    @staticmethod
    def _run(compiled: Any, pixels: np.ndarray, ids: np.ndarray) -> np.ndarray:
        return compiled({INPUTS[0]: pixels, INPUTS[1]: ids})[compiled.output(ENCODER_OUTPUT)]


def _with_encoder(model: ESPMedSAM, encoder: nn.Module) -> ESPMedSAM:
    """A shallow copy of ``model`` with ``encoder`` as its image encoder (the other modules shared)."""
    view = copy.copy(model)
    view._modules = dict(model._modules)
    view._modules["image_encoder"] = encoder
    return view


def use_openvino_encoder(
    model: ESPMedSAM,
    *,
    threads: int | None = None,
    bfloat16: bool = True,
    cache_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> ESPMedSAM:
    """Put an OpenVINO-compiled image encoder in ``model``'s place (the model is changed and returned).
    Its exported graph is kept in ``cache_dir`` (default ``CACHE_DIR``) under a hash of the encoder's
    weights, so a checkpoint is exported once (``progress`` is told then), at its first image.

    Raises:
        MissingDependencyError: openvino, onnx or onnxscript is not installed.
    """
    require_onnx(("onnx", "onnxscript", "openvino"), "openvino")
    if not isinstance(model.image_encoder, OpenVinoImageEncoder):
        folder = Path(cache_dir) if cache_dir is not None else CACHE_DIR
        model.image_encoder = OpenVinoImageEncoder(
            model, folder, threads=threads, bfloat16=bfloat16, cache_dir=COMPILED_CACHE, progress=progress
        )
    return model
