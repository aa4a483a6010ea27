"""A native checkpoint with its image encoder and prompt-free decoding compiled by OpenVINO.

OpenVINO runs a forward pass about twice as fast as torch on a CPU (``BENCHMARKS.md``, "Backends"), but
an exported ``.onnx`` file holds only the prompt-free masks. Here the encoder and the prompt-free decoders
(SPPG, QDMD) are exported as one graph that also gives the image embedding (``export_encoder_onnx``),
compiled by OpenVINO and put in the encoder's place (``OpenVinoImageEncoder``); the same graph pools the
modality classifier's features from the controller-free encoder. The promptable decoder (boxes, clicks,
the quality score's pass) and the classifier's small head keep running in torch: ``espmedsam serve
--backend openvino`` and ``predict --backend openvino`` with a native checkpoint. ``Predictor`` takes
the masks from the graph (``segment``) instead of decoding again.

The exported graph is kept in ``CACHE_DIR`` under a hash of the model's weights and of the graph's kind,
so only the first run with a checkpoint pays the export (about two minutes with the check and the
compiles); OpenVINO's own cache keeps the compiled graphs. A fresh export is compared with the eager
model in fp32 before it is used; a graph that differs is refused with a one-line error.
"""

from __future__ import annotations

import copy
import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from espmedsam.backends import NATIVE_OPENVINO_PACKAGES
from espmedsam.checkpoints.onnx_export import (
    CLASSIFIER_FEATURES,
    CLASSIFIER_INPUT,
    ENCODER_OUTPUT,
    INPUTS,
    OUTPUTS,
    export_encoder_onnx,
    require_onnx,
)
from espmedsam.errors import CheckpointError
from espmedsam.models.controller import ControllerRoute
from espmedsam.models.espmedsam import ESPMedSAM
from espmedsam.openvino_backend import CACHE_DIR as COMPILED_CACHE
from espmedsam.openvino_backend import compile_graph, cpu_has_bf16, kept_graph

CACHE_DIR = COMPILED_CACHE / "encoders"  # beside the compiled graphs
# part of the cache key: change it when the graph does
GRAPH_VERSION = "encoder+prompt-free-decoding+classifier-features 3"  # 3: channel LayerNorm as reductions
_CHECK_TOLERANCE = 2e-3  # max abs difference to the eager fp32 encoder, relative to max(1, |reference|)


def graph_key(model: nn.Module) -> str:
    """A hash of the graph's kind and the model's parameters and buffers (names, shapes, values): the
    name of its cached graph."""
    digest = hashlib.sha256(GRAPH_VERSION.encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:20]


class OpenVinoImageEncoder(nn.Module):
    """Stands in for ``ESPMedSAM.image_encoder``: images with a controller route run the compiled
    encoder graph (one static graph per input side, batch 1, as ``OpenVinoBackend`` does), and
    ``classifier_features`` the graph's classifier part; the controller-free encoder called directly
    (``route`` None) and training run the torch encoder it keeps.

    The graph is ``export_encoder_onnx``'s, kept in ``folder`` as ``encoder-KEY.onnx`` (any side) or,
    for an encoder whose windows follow the input side (no dynamic-side graph), ``encoder-KEY-S.onnx``
    per side S; it is exported at its first use and compared with the eager encoder then.

    Args:
        model: the model whose encoder this replaces (``use_openvino_encoder`` puts it in place).
        folder: where the exported graphs are kept.
        threads: inference threads; None: OpenVINO's default (one per physical core).
        bfloat16: bf16 where the CPU has it; False: fp32.
        cache_dir: OpenVINO's compiled-graph cache; None: none.
        progress: told before an export (which takes about two minutes with its check).
        max_graphs: compiled input sides kept at once (each holds its own copy of the weights and its
            activations: ~0.2 GB, ~0.6 GB at 512²); the least recently used one goes when another is
            needed, and comes back from ``cache_dir`` in about half a second. None: every side.
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
        max_graphs: int | None = None,
    ) -> None:
        super().__init__()
        import openvino as ov

        self.torch_encoder = model.image_encoder
        # the model as it is now, torch encoder included, for exports: kept out of the module tree
        object.__setattr__(self, "_source", _with_encoder(model, self.torch_encoder))
        self.folder = Path(folder)
        self.key = graph_key(self._source)
        self.threads = threads
        self.cache_dir = cache_dir
        self.progress = progress
        self._core = ov.Core()
        self.precision = "bf16" if bfloat16 and cpu_has_bf16(self._core) else "f32"
        self.max_graphs = max_graphs
        self._compiled: OrderedDict[int, Any] = OrderedDict()  # input side -> compiled graph, last used last
        self._classifier: Any = None  # the compiled classifier part, once asked for
        self._classifier_side = model.config.classifier.input_size if model.classifier is not None else None
        self.train(model.training)  # a fresh module trains; this one starts as the model is

    def forward(self, images: torch.Tensor, route: ControllerRoute | None = None) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 256, S/s, S/s) float32 embeddings, as ``TinyViT.forward``."""
        if route is None or self.training or torch.is_grad_enabled() and images.requires_grad:
            return self.torch_encoder(images, route)
        return self.segment(images, route.index)[0]

    def segment(
        self, images: torch.Tensor, ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) images and (B,) modality ids -> float32 (B, 256, S/s, S/s) embeddings (the
        encoder's), (B, 1, S, S) prompt-free mask logits and (B, 1, g, g) patch logits, as
        ``ESPMedSAM.encode`` then ``decode`` give them, from one run of the graph."""
        compiled = self.compiled(images.shape[-1])
        pixels = images.detach().float().cpu().numpy()
        ids_array = ids.cpu().numpy().astype(np.int64)
        runs = [self._run(compiled, pixels[i : i + 1], ids_array[i : i + 1]) for i in range(len(ids_array))]
        return tuple(  # type: ignore[return-value]
            torch.from_numpy(np.concatenate([run[k] for run in runs])).to(images.device) for k in range(3)
        )

    @property
    def has_classifier(self) -> bool:
        """Whether the graph also pools the modality classifier's features (``classifier_features``)."""
        return self._classifier_side is not None

    def classifier_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, s, s) classifier inputs -> (B, 2C) float32 features: the controller-free embedding
        pooled, what ``ModalityClassifier.pool`` gives for ``encode(images, None)``."""
        if self._classifier is None:
            self._classifier = self._classifier_part(self._any_graph(), self.precision)
        pixels = images.detach().float().cpu().numpy()
        output = self._classifier.output(CLASSIFIER_FEATURES)
        features = [
            self._classifier({CLASSIFIER_INPUT: pixels[i : i + 1]})[output] for i in range(len(pixels))
        ]
        return torch.from_numpy(np.concatenate(features)).to(images.device)

    def _classifier_part(self, path: Path, precision: str) -> Any:
        """The exported graph's classifier part, compiled."""
        side = self._classifier_side
        assert side is not None, "this model has no modality classifier"
        cache = self.cache_dir if precision == self.precision else None  # the check's fp32 one is not kept
        return compile_graph(
            self._core, path, {CLASSIFIER_INPUT: [1, 3, side, side]}, precision,
            outputs=[CLASSIFIER_FEATURES], threads=self.threads, cache_dir=cache,
            name="the classifier's encoder",
        )  # fmt: skip

    def _any_graph(self) -> Path:
        """An exported graph (each holds the classifier part): one already written, else the graph of the
        smallest configured side."""
        written = sorted(self.folder.glob(f"encoder-{self.key}*.onnx"))
        if written:
            return written[0]
        config = self._source.config
        return self.graph(min(config.inference_sizes or (config.image_size,)))

    def prepare(self, sides: Iterable[int]) -> None:
        """Export (if not cached) and compile the graphs of ``sides`` (and the classifier's) now, not at
        the first image there (a server does this before it takes requests)."""
        for side in sorted(set(sides)):
            self.compiled(side)
        if self.has_classifier:
            self.classifier_features(torch.zeros(1, 3, self._classifier_side, self._classifier_side))

    def compiled(self, side: int) -> Any:
        """The graph compiled for one image of ``side`` (its segmentation part)."""
        return kept_graph(
            self._compiled, side, self.max_graphs,
            lambda: self._segmentation_part(self.graph(side), side, self.precision),
        )  # fmt: skip

    def _segmentation_part(self, path: Path, side: int, precision: str) -> Any:
        """The exported graph's segmentation part (no classifier input or output), compiled for ``side``."""
        cache = self.cache_dir if precision == self.precision else None  # the check's fp32 one is not kept
        return compile_graph(
            self._core, path, _shapes(side), precision, outputs=[ENCODER_OUTPUT, *OUTPUTS],
            threads=self.threads, cache_dir=cache, name="the image encoder",
        )  # fmt: skip

    def graph(self, side: int) -> Path:
        """The exported graph that runs inputs of ``side``: the cached one, else a fresh, checked export
        (any side where the encoder allows it, else this side)."""
        dynamic = self.folder / f"encoder-{self.key}.onnx"
        fixed = self.folder / f"encoder-{self.key}-{side}.onnx"
        for path in (dynamic, fixed):
            if path.is_file():
                return path
        if self.progress:
            self.progress(
                "exporting the image encoder for OpenVINO (once per checkpoint, about two minutes; "
                "--backend torch starts at once)"
            )
        path, check_side = self._export(dynamic, fixed, side)
        self._check(path, check_side)
        return path

    def _export(self, dynamic: Path, fixed: Path, side: int) -> tuple[Path, int | None]:
        """Export the graph of any side to ``dynamic`` (checked at no side in particular: None), else
        the graph of ``side`` to ``fixed`` (checked there). Where a per-side graph of these weights is
        kept already, their encoder gave no dynamic-side graph before, and the attempt, which fails only
        after tracing most of the encoder, is not made again."""
        if not any(self.folder.glob(f"encoder-{self.key}-*.onnx")):
            try:
                return export_encoder_onnx(self._source, dynamic), None
            except CheckpointError:  # windows that follow the input side: one graph per side
                pass
        return export_encoder_onnx(self._source, fixed, size=side), side

    def _check(self, path: Path, side: int | None) -> None:
        """Compare the fp32 graph with the eager encoder on two images of two modalities (at ``side``,
        or the smallest configured side); a graph that differs is deleted and refused."""
        config = self._source.config
        side = side or min(config.inference_sizes or (config.image_size,))
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(2, 3, side, side, generator=generator)
        ids = torch.arange(2) % len(config.modalities)
        compiled = self._segmentation_part(path, side, "f32")
        with torch.no_grad():
            embeddings = self.torch_encoder(images, ControllerRoute.from_index(ids))
            out = self._source.decode(embeddings, ids, side, images)
        pixels, ids_array = images.numpy(), ids.numpy()
        runs = [self._run(compiled, pixels[i : i + 1], ids_array[i : i + 1]) for i in range(2)]
        pairs = [(np.concatenate([run[k] for run in runs]), expected)
                 for k, expected in enumerate((embeddings, out.masks, out.patch_logits))]  # fmt: skip
        if self.has_classifier:
            pairs.append(self._classifier_pair(path, generator))
        for k, (got, expected) in enumerate(pairs):
            diff = np.abs(got - expected.numpy())
            # masks: a patch logit a rounding error from the threshold flips a dense-prompt cell
            error = float(np.quantile(diff, 0.99) if k in (1, 2) else diff.max())
            if error > _CHECK_TOLERANCE * max(1.0, float(expected.abs().max())):
                path.unlink(missing_ok=True)
                raise CheckpointError(f"the OpenVINO image encoder differs from the eager one ({error:.2g})")

    def _classifier_pair(self, path: Path, generator: torch.Generator) -> tuple[np.ndarray, torch.Tensor]:
        """The fp32 graph's classifier features of a random image, and the eager model's."""
        side = self._classifier_side
        assert side is not None
        images = torch.randn(1, 3, side, side, generator=generator)
        compiled = self._classifier_part(path, "f32")
        got = compiled({CLASSIFIER_INPUT: images.numpy()})[compiled.output(CLASSIFIER_FEATURES)]
        with torch.no_grad():
            return got, self._source.classifier.pool(self.torch_encoder(images, None))

    @staticmethod
    def _run(compiled: Any, pixels: np.ndarray, ids: np.ndarray) -> list[np.ndarray]:
        """One image through the graph: its embeddings, mask logits and patch logits."""
        results = compiled({INPUTS[0]: pixels, INPUTS[1]: ids})
        return [results[compiled.output(name)] for name in (ENCODER_OUTPUT, *OUTPUTS)]


def _shapes(side: int) -> dict[str, list[int]]:
    """The graph's input shapes for one image of ``side``."""
    return {INPUTS[0]: [1, 3, side, side], INPUTS[1]: [1]}


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
    max_graphs: int | None = None,
) -> ESPMedSAM:
    """Put an OpenVINO-compiled image encoder (with the prompt-free decoding, see ``OpenVinoImageEncoder``)
    in ``model``'s place (the model is changed and returned). Its exported graph is kept in ``cache_dir``
    (default ``CACHE_DIR``) under a hash of the model's weights, so a checkpoint is exported once
    (``progress`` is told then), at its first image.

    Raises:
        MissingDependencyError: openvino, onnx or onnxscript is not installed.
    """
    require_onnx(NATIVE_OPENVINO_PACKAGES, "openvino")
    if not isinstance(model.image_encoder, OpenVinoImageEncoder):
        folder = Path(cache_dir) if cache_dir is not None else CACHE_DIR
        model.image_encoder = OpenVinoImageEncoder(
            model,
            folder,
            threads=threads,
            bfloat16=bfloat16,
            cache_dir=COMPILED_CACHE,
            progress=progress,
            max_graphs=max_graphs,
        )
    return model
