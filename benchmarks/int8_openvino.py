"""int8 against bf16 in OpenVINO: NNCF post-training quantization of the exported graph, per modality.

Usage: python benchmarks/int8_openvino.py --onnx MODEL.onnx [--modalities dermoscopy fundus ...]
       [--calibration 24] [--eval 20] [--runs 5] [--threads 2] [--out FILE]

For each modality, the segmentation graph at the modality's input side is compiled twice: as exported
(bf16 where the CPU has it) and after ``nncf.quantize`` (int8 matmuls and convolutions, transformer mode,
the modality fixed in the graph, calibrated on ``--calibration`` training images of that modality's
in-domain dataset). Both are timed
(batch 1, median of ``--runs`` after a warm-up) and both segment ``--eval`` validation images: their Dice
against the ground truth and against each other.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from _data import IN_DOMAIN, split_images
from _report import cpu_description, median_seconds, report

from espmedsam.checkpoints.onnx_export import INPUTS, OUTPUTS
from espmedsam.data.io import read_image, read_mask
from espmedsam.metrics import dice
from espmedsam.openvino_backend import OpenVinoBackend, compile_graph, cut_graph
from espmedsam.predict import Predictor


def inputs_of(predictor: Predictor, paths: list[Path], modality: str, size: int) -> list[tuple]:
    """(normalised (1, 3, S, S) float32 input, its metadata) of each image."""
    out = []
    for path in paths:
        x, meta = predictor.io.preprocess(read_image(path), size)
        out.append((x.numpy(), meta))
    return out


def with_modality_fixed(model: object, modality_id: int) -> object:
    """``model`` with its modality input replaced by the constant ``modality_id`` and constants folded, so
    the per-modality selection of controller weights is gone from the graph (NNCF 3.4's quantizer setup
    fails on those selects: ``KeyError: '... node_select'``)."""
    import openvino.opset13 as ops
    from openvino.passes import ConstantFolding, Manager

    parameter = next(p for p in model.get_parameters() if p.get_friendly_name() == INPUTS[1])
    constant = ops.constant(np.array([modality_id], dtype=np.int64))
    for target in list(parameter.output(0).get_target_inputs()):
        target.replace_source_output(constant.output(0))
    model.remove_parameter(parameter)
    model.validate_nodes_and_infer_types()
    manager = Manager()
    manager.register_pass(ConstantFolding())
    manager.run_passes(model)
    return model


def quantized(backend: OpenVinoBackend, side: int, modality_id: int, calibration: list) -> object:
    """The segmentation graph at ``side`` for one modality (its input ``images`` only), quantized to int8 on
    the calibration inputs."""
    import nncf

    model = cut_graph(backend._core.read_model(str(backend.path)), list(INPUTS), [OUTPUTS[0]])
    model.reshape({INPUTS[0]: [1, 3, side, side], INPUTS[1]: [1]})
    model = with_modality_fixed(model, modality_id)
    dataset = nncf.Dataset(calibration, lambda x: {INPUTS[0]: x})
    return nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibration))


def compiled(backend: OpenVinoBackend, model: object, side: int) -> object:
    """The quantized graph compiled as the backend compiles its own (precision, latency hint, threads)."""
    shapes = {INPUTS[0]: [1, 3, side, side]}
    precision, threads = backend.precision, backend.threads
    return compile_graph(backend._core, model, shapes, precision, threads=threads, name="the int8 graph")


def feed_of(graph: object, x: np.ndarray, modality_id: int) -> dict:
    """The inputs ``graph`` takes: the images, and the modality where it is not fixed in the graph."""
    feed = {INPUTS[0]: x}
    if len(graph.inputs) > 1:
        feed[INPUTS[1]] = np.array([modality_id], dtype=np.int64)
    return feed


def masks_of(graph: object, inputs: list[tuple], modality_id: int, predictor: Predictor) -> list[np.ndarray]:
    masks = []
    for x, meta in inputs:
        logits = torch.from_numpy(graph(feed_of(graph, x, modality_id))[graph.output(OUTPUTS[0])])
        masks.append(predictor.io.postprocess(logits, meta)[0, 0].numpy() > 0)
    return masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, required=True)
    parser.add_argument("--modalities", nargs="*", default=None, help="default: all six")
    parser.add_argument("--calibration", type=int, default=24, help="training images per modality")
    parser.add_argument("--eval", type=int, default=20, help="validation images per modality")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backend = OpenVinoBackend(args.onnx, threads=args.threads)
    predictor = Predictor(backend)
    modalities = list(backend.modalities)
    dataset_of = dict(zip(modalities, IN_DOMAIN, strict=True))
    lines = [
        f"{cpu_description()}; OpenVINO {backend.precision} against NNCF int8, {args.threads} threads,"
        f" batch 1, median of {args.runs}; int8 calibrated on {args.calibration} training images each,"
        f" Dice on up to {args.eval} validation images each (the count in the table)",
        "",
        "| modality | input | bf16 s | int8 s | int8 speed-up | quantize s | val images | Dice bf16 |"
        " Dice int8 | int8 vs bf16 masks (mean / min Dice) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for modality in args.modalities or modalities:
        index, size = modalities.index(modality), predictor.input_size(modality)
        name = dataset_of[modality]
        train = [p for p, _ in split_images((name,), "train")][: args.calibration]
        val = [p for p, _ in split_images((name,), "val")][: args.eval]
        truth = [read_mask(p.parent.parent / "masks" / f"{p.stem}.png") for p in val]
        start = time.perf_counter()
        int8_model = quantized(
            backend, size, index, [x for x, _ in inputs_of(predictor, train, modality, size)]
        )
        quantize_s = time.perf_counter() - start
        graphs = {
            "bf16": backend._compiled("segment", (1, 3, size, size)),
            "int8": compiled(backend, int8_model, size),
        }
        x = inputs_of(predictor, val[:1], modality, size)[0][0]
        feeds = {k: feed_of(g, x, index) for k, g in graphs.items()}
        seconds = {k: median_seconds(lambda g=g, f=feeds[k]: g(f), args.runs) for k, g in graphs.items()}
        evaluated = inputs_of(predictor, val, modality, size)
        masks = {k: masks_of(g, evaluated, index, predictor) for k, g in graphs.items()}
        scores = {k: np.mean([dice(m, t) for m, t in zip(v, truth, strict=True)]) for k, v in masks.items()}
        agree = [dice(a, b) for a, b in zip(masks["int8"], masks["bf16"], strict=True)]
        lines.append(
            f"| {modality} | {size}² | {seconds['bf16']:.3f} | {seconds['int8']:.3f} |"
            f" {seconds['bf16'] / seconds['int8']:.2f}× | {quantize_s:.0f} | {len(val)} |"
            f" {scores['bf16']:.4f} | {scores['int8']:.4f} | {np.mean(agree):.4f} / {np.min(agree):.4f} |"
        )
        print(lines[-1], flush=True)
    report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
