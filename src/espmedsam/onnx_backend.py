"""onnxruntime backend: run an ``espmedsam export --format onnx`` file on the CPU without torch's model code.

The file's metadata holds the model config (pre- and post-processing come from it) and, for a graph
exported at one input side, ``fixed_size``. onnxruntime runs a whole graph whatever outputs are asked for,
and wants every graph input fed, so a file with a modality classifier is split into two sessions: the
segmentation graph (``images``, ``modality`` -> ``masks``) and the classifier's (``classifier_images`` ->
``modality_logits``), built the first time each is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from espmedsam.checkpoints.native import config_from_metadata
from espmedsam.checkpoints.onnx_export import (
    CLASSIFIER_INPUT,
    CLASSIFIER_OUTPUT,
    FORMAT,
    FORMAT_VERSION,
    INPUTS,
    OUTPUTS,
    require_onnx,
)
from espmedsam.config import ModelConfig
from espmedsam.errors import CheckpointError, InputError


class OnnxBackend:
    """An exported ESP-MedSAM in onnxruntime (CPUExecutionProvider, all graph optimisations).

    Args:
        path: the ``.onnx`` file written by ``export_onnx``.
        threads: intra-op threads; None: onnxruntime's default (one per physical core).
    Raises:
        MissingDependencyError: onnx or onnxruntime is not installed.
        CheckpointError: the file is missing, not an ONNX file, or not an espmedsam export.
    """

    packages: tuple[str, ...] = ("onnx", "onnxruntime")
    extra = "onnx"

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        require_onnx(self.packages, self.extra)
        import onnx

        self.path = Path(path)
        self.threads = threads
        if not self.path.is_file():
            raise CheckpointError(f"ONNX model {self.path} does not exist or is not a file")
        try:
            self._proto = onnx.load_model(str(self.path))
        except Exception as error:  # protobuf's DecodeError and friends
            raise CheckpointError(f"{self.path} is not an ONNX file or is truncated ({error})") from None
        metadata = {prop.key: prop.value for prop in self._proto.metadata_props}
        self.config = _config(self.path, metadata)
        self.fixed_size: int | None = int(metadata["fixed_size"]) if metadata.get("fixed_size") else None
        inputs = {value.name for value in self._proto.graph.input}
        if not set(INPUTS) <= inputs:
            raise CheckpointError(f"{self.path} lacks the graph inputs {', '.join(INPUTS)}")
        self.has_classifier = CLASSIFIER_INPUT in inputs
        self._sessions: dict[Any, Any] = {}
        self._check_runnable()  # fail here, not at the first image, if the runtime cannot run the graph

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.config.modalities

    def segment(self, images: np.ndarray, modality: np.ndarray) -> np.ndarray:
        """Mask logits of each image's own modality.

        Args:
            images: (B, 3, S, S) float32, normalised as ``preprocess`` does; S a multiple of
                ``config.size_multiple``, and ``fixed_size`` for a fixed-size graph.
            modality: (B,) int64 ids into ``config.modalities``.
        Returns:
            (B, 1, S, S) float32 logits.
        Raises:
            InputError: a wrong shape or side, or an id out of range.
        """
        images = _images(images)
        side = images.shape[-1]
        multiple = self.config.size_multiple
        if images.shape[-2] != side or side % multiple or side < 2 * multiple:
            raise InputError(
                f"images must be square with a side a multiple of {multiple}, got {images.shape}"
            )
        if self.fixed_size is not None and side != self.fixed_size:
            raise InputError(
                f"this ONNX model was exported at {self.fixed_size}x{self.fixed_size}, got {side}"
            )
        ids = np.ascontiguousarray(np.asarray(modality).reshape(-1), dtype=np.int64)
        if ids.shape[0] != images.shape[0]:
            raise InputError(f"got {ids.shape[0]} modalities for a batch of {images.shape[0]} images")
        if ids.size and (ids.min() < 0 or ids.max() >= len(self.modalities)):
            raise InputError(f"modality ids must lie in 0..{len(self.modalities) - 1}, got {ids.tolist()}")
        return self._run_segment(images, ids)

    def classify(self, images: np.ndarray) -> np.ndarray | None:
        """(B, 3, s, s) classifier inputs (``classifier_input``) -> (B, M) modality logits; None for a model
        without a classifier.

        Raises:
            InputError: a wrong shape.
        """
        if not self.has_classifier:
            return None
        images = _images(images)
        side = self.config.classifier.input_size
        if images.shape[-2:] != (side, side):
            raise InputError(f"classifier images must be (B, 3, {side}, {side}), got {images.shape}")
        return self._run_classify(images)

    def _check_runnable(self) -> None:
        self._segmenter()

    def _run_segment(self, images: np.ndarray, ids: np.ndarray) -> np.ndarray:
        (masks,) = self._segmenter().run([OUTPUTS[0]], {INPUTS[0]: images, INPUTS[1]: ids})
        return masks

    def _run_classify(self, images: np.ndarray) -> np.ndarray:
        (logits,) = self._classifier().run([CLASSIFIER_OUTPUT], {CLASSIFIER_INPUT: images})
        return logits

    def _segmenter(self) -> Any:
        if not self.has_classifier:
            return self._session("segment", None)
        return self._session("segment", (list(INPUTS), list(OUTPUTS)))

    def _classifier(self) -> Any:
        return self._session("classify", ([CLASSIFIER_INPUT], [CLASSIFIER_OUTPUT]))

    def _session(self, name: str, subgraph: tuple[list[str], list[str]] | None) -> Any:
        """The onnxruntime session of the whole graph, or of the part from some inputs to some outputs."""
        if name not in self._sessions:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.intra_op_num_threads = self.threads or 0
            options.inter_op_num_threads = 1
            options.log_severity_level = 3
            model = self._proto if subgraph is None else _extract(self._proto, *subgraph)
            try:
                self._sessions[name] = ort.InferenceSession(
                    model.SerializeToString(), options, providers=["CPUExecutionProvider"]
                )
            except Exception as error:  # onnxruntime's own error types
                first = str(error).strip().splitlines()[0]
                raise CheckpointError(f"onnxruntime cannot run {self.path}: {first}") from None
        return self._sessions[name]


def _extract(proto: Any, inputs: list[str], outputs: list[str]) -> Any:
    """The part of ``proto`` that computes ``outputs`` from ``inputs`` (weights shared by both parts are
    copied into each)."""
    from onnx.utils import Extractor

    return Extractor(proto).extract_model(inputs, outputs)


def _images(images: np.ndarray) -> np.ndarray:
    array = np.asarray(images)
    if array.ndim != 4 or array.shape[1] != 3:
        raise InputError(f"images must be a (B, 3, S, S) array, got shape {array.shape}")
    return np.ascontiguousarray(array, dtype=np.float32)


def _config(path: Path, metadata: dict[str, str]) -> ModelConfig:
    """The model config in an export's metadata, or a CheckpointError saying why there is none."""
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is an ONNX file but not an espmedsam export (no espmedsam metadata)")
    if metadata.get("format_version") != FORMAT_VERSION:
        version = metadata.get("format_version")
        raise CheckpointError(f"{path} has espmedsam ONNX version {version!r}; this reads {FORMAT_VERSION!r}")
    return config_from_metadata(path, metadata, ModelConfig)
