"""Which runtime runs a checkpoint: torch (native ``.safetensors``), onnxruntime or OpenVINO (an
``espmedsam export --format onnx`` file), or ``auto``, the fastest one installed for the file given.
OpenVINO also takes a native checkpoint: its encoder and prompt-free decoders are then compiled by
OpenVINO and the rest runs in torch (``openvino_encoder``), prompts and quality scores included.

Measured on two CPU cores (``BENCHMARKS.md``, "Backends"): OpenVINO in bf16 is the fastest where it is
installed, then torch with bf16 autocast; onnxruntime runs fp32 kernels only and comes last, so ``auto``
takes it only for an ``.onnx`` file without OpenVINO.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import NamedTuple

from espmedsam.errors import InputError

BACKENDS = ("auto", "torch", "onnxruntime", "openvino")
# what OpenVINO needs for a native checkpoint: the exporter of its encoder graph, and OpenVINO itself
NATIVE_OPENVINO_PACKAGES = ("onnx", "onnxscript", "openvino")
EXPORTED = (".onnx",)


class BackendChoice(NamedTuple):
    """The backend that runs, and a one-line notice when ``auto`` passed over a faster one (else None)."""

    name: str
    notice: str | None = None


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def is_exported(checkpoint: Path | None) -> bool:
    return checkpoint is not None and checkpoint.suffix.lower() in EXPORTED


def choose_backend(backend: str, checkpoint: Path | None, *, native_openvino: bool = False) -> BackendChoice:
    """Resolve ``backend`` (one of ``BACKENDS``) for ``checkpoint`` (None: the bundled weights).

    ``auto`` keeps torch for a native checkpoint, unless ``native_openvino`` (``espmedsam serve``: one
    model held for hours, where OpenVINO's speed is worth its memory and its one-time export) and OpenVINO
    and the exporter are installed.

    Raises:
        InputError: an unknown backend, or a checkpoint of the wrong kind for the backend asked for.
    """
    if backend not in BACKENDS:
        raise InputError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    exported = is_exported(checkpoint)
    if backend == "auto":
        if not exported and native_openvino:
            if all(installed(package) for package in NATIVE_OPENVINO_PACKAGES):
                return BackendChoice("openvino")
            return BackendChoice(
                "torch", 'openvino is not installed (pip install "espmedsam[openvino]"): torch'
            )
        if not exported:
            return BackendChoice("torch")
        if installed("openvino"):
            return BackendChoice("openvino")
        return BackendChoice(
            "onnxruntime", 'openvino is not installed (pip install "espmedsam[openvino]"): using onnxruntime'
        )
    if backend == "torch" and exported:
        raise InputError(f"--backend torch runs native .safetensors checkpoints, not {checkpoint}")
    if backend == "onnxruntime" and not exported:
        raise InputError(
            f"--backend {backend} needs --checkpoint MODEL.onnx (espmedsam export CKPT --format onnx)"
        )
    return BackendChoice(backend)
