"""OpenVINO backend: an ``espmedsam export --format onnx`` file compiled by OpenVINO for the CPU.

OpenVINO fuses what torch's eager mode runs op by op (GELU into the matmul before it, LayerNorm, the
window shuffles) and runs in bf16 where the CPU has bf16 units (AMX, AVX-512 BF16), in fp32 elsewhere.
Pre- and post-processing, the checks on inputs and the split into a segmentation and a classifier graph
are the onnxruntime backend's (``OnnxBackend``); only the runtime differs. A graph is compiled for each
input side it meets, at batch 1, and a batch runs image by image: static shapes run faster than OpenVINO's
dynamic ones, a CPU gains nothing from batches, and one graph per side keeps compilation and cache small.
Compiled graphs are kept in ``CACHE_DIR`` (OpenVINO's model cache, keyed by graph, shape and CPU), so only
the first run on a machine pays the compilation (5-15 s per side); later processes load it in about a second.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from espmedsam.checkpoints.onnx_export import (
    CLASSIFIER_INPUT,
    CLASSIFIER_OUTPUT,
    INPUTS,
    OUTPUTS,
    require_onnx,
)
from espmedsam.errors import CheckpointError
from espmedsam.memory import release_freed_memory
from espmedsam.onnx_backend import OnnxBackend

DEVICE = "CPU"
CACHE_DIR = Path.home() / ".cache" / "espmedsam" / "openvino"


def cpu_has_bf16(core: Any = None) -> bool:
    """Whether OpenVINO's CPU plugin can run bf16 on this CPU (AMX or AVX-512 BF16)."""
    import openvino as ov

    return "BF16" in (core or ov.Core()).get_property(DEVICE, "OPTIMIZATION_CAPABILITIES")


class OpenVinoBackend(OnnxBackend):
    """An exported ESP-MedSAM compiled by OpenVINO (CPU plugin, latency hint).

    Args:
        path: the ``.onnx`` file written by ``export_onnx``.
        threads: inference threads; None: OpenVINO's default (one per physical core).
        bfloat16: run in bf16 where the CPU has it (``precision`` says what runs); False: fp32.
        cache_dir: where compiled graphs are kept between processes (the CLI's: ``CACHE_DIR``); None: not
            kept.
        max_graphs: input sides whose segmentation graph is kept compiled at once (``kept_graph``); None:
            all (a server's).
    Raises:
        MissingDependencyError: onnx or openvino is not installed.
        CheckpointError: the file is missing, not an espmedsam export, or OpenVINO cannot compile it.
    """

    packages = ("onnx", "openvino")
    extra = "openvino"

    def __init__(
        self,
        path: str | Path,
        *,
        threads: int | None = None,
        bfloat16: bool = True,
        cache_dir: Path | None = None,
        max_graphs: int | None = None,
    ) -> None:
        require_onnx(self.packages, self.extra)  # a one-line error, not an ImportError, without openvino
        import openvino as ov

        self.cache_dir = cache_dir
        self.max_graphs = max_graphs
        # each side's input shape -> its segmentation graph, the last used last
        self._segments: OrderedDict[tuple[int, ...], Any] = OrderedDict()
        self._core = ov.Core()  # one runtime for every graph this backend compiles
        self.precision = (
            "bf16" if bfloat16 and cpu_has_bf16(self._core) else "f32"
        )  # what the graphs compute in
        super().__init__(path, threads=threads)

    def _check_runnable(self) -> None:
        side = self.fixed_size or self.config.image_size
        self._compiled("segment", (1, 3, side, side))

    def _run_segment(self, images: np.ndarray, ids: np.ndarray) -> np.ndarray:
        compiled = self._compiled("segment", (1, *images.shape[1:]))
        output = compiled.output(OUTPUTS[0])
        masks = [
            compiled({INPUTS[0]: images[i : i + 1], INPUTS[1]: ids[i : i + 1]})[output]
            for i in range(len(ids))
        ]
        return np.concatenate(masks) if masks else np.zeros((0, 1, *images.shape[2:]), np.float32)

    def _run_classify(self, images: np.ndarray) -> np.ndarray:
        compiled = self._compiled("classify", (1, *images.shape[1:]))
        output = compiled.output(CLASSIFIER_OUTPUT)
        logits = [compiled({CLASSIFIER_INPUT: images[i : i + 1]})[output] for i in range(len(images))]
        return np.concatenate(logits) if logits else np.zeros((0, len(self.modalities)), np.float32)

    def _compiled(self, graph: str, shape: tuple[int, ...]) -> Any:
        """The graph ("segment" or "classify") compiled for images of ``shape``, compiled once; at most
        ``max_graphs`` segmentation sides kept (``kept_graph``)."""
        if graph == "segment":
            return kept_graph(
                self._segments, tuple(shape), self.max_graphs, lambda: self._compile(graph, shape)
            )
        key = (graph, tuple(shape))
        if key not in self._sessions:
            self._sessions[key] = self._compile(graph, shape)
        return self._sessions[key]

    def _compile(self, graph: str, shape: tuple[int, ...]) -> Any:
        inputs, output = (
            (list(INPUTS), OUTPUTS[0]) if graph == "segment" else ([CLASSIFIER_INPUT], CLASSIFIER_OUTPUT)
        )
        shapes = {inputs[0]: list(shape), **({inputs[1]: [shape[0]]} if len(inputs) > 1 else {})}
        return compile_graph(
            self._core, self.path, shapes, self.precision, outputs=[output], threads=self.threads,
            cache_dir=self.cache_dir, name=str(self.path),
        )  # fmt: skip


def kept_graph(graphs: OrderedDict[Any, Any], key: Any, limit: int | None, compile: Callable[[], Any]) -> Any:
    """``graphs[key]``, made by ``compile`` the first time it is asked for; with ``limit``, at most that
    many kept: the least recently used one is dropped first, and its copy of the weights and its activation
    arena handed back to the system (OpenVINO shares neither between static graphs; compiling it again
    from the compiled-graph cache takes about half a second)."""
    if key in graphs:
        graphs.move_to_end(key)
        return graphs[key]
    if limit is not None and len(graphs) >= limit:
        graphs.popitem(last=False)
        release_freed_memory()
    graphs[key] = compile()
    return graphs[key]


def compile_graph(
    core: Any,
    model: Any,
    shapes: dict[str, list[int]],
    precision: str,
    *,
    outputs: list[str] | None = None,
    threads: int | None = None,
    cache_dir: Path | None = None,
    name: str = "the graph",
    profile: bool = False,
    hint: str = "LATENCY",
) -> Any:
    """``model`` (an ``openvino.Model``, or a path OpenVINO reads) reshaped to the static ``shapes`` (input
    name -> shape) and compiled for the CPU in ``precision`` with the performance ``hint`` (``LATENCY``:
    one request at a time on all threads; ``THROUGHPUT``: streams that run requests side by side); with
    ``outputs``, only the part from the inputs ``shapes`` names to those outputs (``cut_graph``); with
    ``profile``, each infer request keeps per-node times (``PERF_COUNT``, read by ``get_profiling_info``).

    Raises:
        CheckpointError: OpenVINO cannot read or compile it (one line, naming ``name``).
    """
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": hint}
    if cache_dir is not None:
        config["CACHE_DIR"] = str(cache_dir)
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    if profile:
        config["PERF_COUNT"] = True
    try:
        if isinstance(model, (str, Path)):
            model = core.read_model(str(model))
        if outputs is not None:
            model = cut_graph(model, list(shapes), outputs)
        model.reshape(shapes)
        return core.compile_model(model, DEVICE, config)
    except Exception as error:  # OpenVINO raises RuntimeError with multi-line messages
        raise _one_line(error, name) from None


def _one_line(error: Exception, name: str) -> CheckpointError:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return CheckpointError(f"OpenVINO cannot compile {name}: {first}")


def cut_graph(model: Any, inputs: list[str], outputs: list[str]) -> Any:
    """The part of ``model`` (an ``openvino.Model``) from the named inputs to the named outputs (the other
    inputs and outputs dropped, so a segmentation needs no classifier images and the reverse)."""
    import openvino as ov

    parameters = [p for p in model.get_parameters() if p.get_friendly_name() in inputs]
    results = [o for o in model.outputs if o.get_names() & set(outputs)]
    return ov.Model(results, parameters, model.get_friendly_name())
