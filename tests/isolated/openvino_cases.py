"""The OpenVINO backend and ``--backend auto``, on the tiny exported model of ``test_onnx`` (run by
``tests/test_openvino.py`` in a process of its own)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from espmedsam import backends
from espmedsam.backends import choose_backend
from espmedsam.cli import app
from espmedsam.errors import InputError

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

from espmedsam.metrics import dice  # noqa: E402
from espmedsam.onnx_backend import OnnxBackend  # noqa: E402
from espmedsam.openvino_backend import OpenVinoBackend  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests folder, for test_onnx's fixtures
from test_onnx import SIZE, _eager_masks, _inputs, exported, model  # noqa: E402, F401  (fixtures)


@pytest.fixture(scope="module")
def fp32(exported, tmp_path_factory):  # noqa: F811
    cache = tmp_path_factory.mktemp("openvino-cache")
    return OpenVinoBackend(exported[0], threads=1, bfloat16=False, cache_dir=cache)


def test_fp32_masks_equal_torch_on_a_mixed_batch(fp32, model):  # noqa: F811
    images, ids = _inputs(3)
    masks = fp32.segment(images.numpy(), ids.numpy())
    assert fp32.precision == "f32" and masks.shape == (3, 1, SIZE, SIZE)
    assert np.abs(masks - _eager_masks(model, images, ids)).max() <= 1e-3


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_any_batch_runs_on_the_one_graph_of_its_side(fp32, model, batch):  # noqa: F811
    images, ids = _inputs(batch, seed=batch)
    assert np.abs(fp32.segment(images.numpy(), ids.numpy()) - _eager_masks(model, images, ids)).max() <= 1e-3
    assert list(fp32._segments) == [(1, 3, SIZE, SIZE)]


def test_kept_graphs_drop_the_least_recently_used_beyond_their_limit():
    from collections import OrderedDict

    from espmedsam.openvino_backend import kept_graph

    compiled = []

    def compile_for(side):
        return lambda: compiled.append(side) or f"graph {side}"

    graphs = OrderedDict()
    for side in (64, 96, 64, 128, 96):  # 64 used again before 128 comes: 96 goes, then 64
        assert kept_graph(graphs, side, 2, compile_for(side)) == f"graph {side}"
    assert compiled == [64, 96, 128, 96] and list(graphs) == [128, 96]
    unlimited = OrderedDict()
    for side in (64, 96, 128, 64):
        kept_graph(unlimited, side, None, compile_for(side))
    assert list(unlimited) == [96, 128, 64]


def test_bf16_masks_agree_with_fp32_within_the_dice_tolerance(exported, model):  # noqa: F811
    """bf16 where the CPU has it (fp32 otherwise, then exactly the fp32 result)."""
    backend = OpenVinoBackend(exported[0], threads=1, cache_dir=None)
    images, ids = _inputs(4, seed=7)
    reference = _eager_masks(model, images, ids) > 0
    masks = backend.segment(images.numpy(), ids.numpy()) > 0
    assert min(dice(m[0], r[0]) for m, r in zip(masks, reference, strict=True)) >= 0.98


def test_a_graph_compiled_for_throughput_runs_side_by_side_with_the_same_masks(fp32, exported):  # noqa: F811
    import openvino as ov

    from espmedsam.checkpoints.onnx_export import INPUTS, OUTPUTS
    from espmedsam.openvino_backend import compile_graph

    images, ids = _inputs(1, seed=3)
    shapes = {INPUTS[0]: [1, 3, SIZE, SIZE], INPUTS[1]: [1]}
    graph = compile_graph(
        ov.Core(), exported[0], shapes, "f32", outputs=[OUTPUTS[0]], threads=2, hint="THROUGHPUT"
    )
    assert str(graph.get_property("PERFORMANCE_HINT")).endswith("THROUGHPUT")
    queue = ov.AsyncInferQueue(graph, 2)
    results = {}
    queue.set_callback(
        lambda request, index: results.setdefault(index, request.get_output_tensor(0).data.copy())
    )
    for index in range(2):
        queue.start_async({INPUTS[0]: images.numpy(), INPUTS[1]: ids.numpy()}, index)
    queue.wait_all()
    expected = fp32.segment(images.numpy(), ids.numpy())
    assert sorted(results) == [0, 1]
    assert all(np.abs(results[index] - expected).max() <= 1e-4 for index in results)


def test_classifier_equals_onnxruntime(fp32, exported):  # noqa: F811
    images, _ = _inputs(2)
    expected = OnnxBackend(exported[0], threads=1).classify(images.numpy())
    assert np.abs(fp32.classify(images.numpy()) - expected).max() <= 1e-4


def test_inputs_are_checked_as_onnxruntime_checks_them(fp32):
    with pytest.raises(InputError, match="exported at 64x64"):
        fp32.segment(np.zeros((1, 3, 96, 96), np.float32), np.zeros(1, np.int64))
    with pytest.raises(InputError, match="must lie in"):
        fp32.segment(np.zeros((2, 3, SIZE, SIZE), np.float32), np.array([0, 9]))


def test_auto_prefers_openvino_for_an_exported_file(tmp_path):
    assert choose_backend("auto", tmp_path / "m.onnx") == ("openvino", None)
    assert choose_backend("auto", tmp_path / "m.safetensors") == ("torch", None)
    assert choose_backend("auto", None) == ("torch", None)


def test_auto_falls_back_with_a_one_line_notice(monkeypatch, tmp_path):
    monkeypatch.setattr(backends, "installed", lambda package: package != "openvino")
    choice = choose_backend("auto", tmp_path / "m.onnx")
    assert choice.name == "onnxruntime"
    assert "openvino is not installed" in choice.notice and "\n" not in choice.notice
    served = choose_backend("auto", None, native_openvino=True)  # serve's auto: torch, and says why
    assert served.name == "torch" and "openvino is not installed" in served.notice


def test_serve_auto_takes_openvino_for_a_native_checkpoint(tmp_path):
    assert choose_backend("auto", None, native_openvino=True) == ("openvino", None)
    assert choose_backend("auto", tmp_path / "m.safetensors", native_openvino=True) == ("openvino", None)


def test_openvino_refuses_a_unet_in_one_line_and_auto_keeps_it_in_torch(tmp_path):
    from espmedsam.checkpoints.native import save_unet
    from espmedsam.cli.common import make_predictor
    from espmedsam.models.unet import UNetBaseline, UNetConfig

    checkpoint = save_unet(
        UNetBaseline(UNetConfig(features=(4, 4, 8, 8, 16, 4))), tmp_path / "unet.safetensors"
    )
    with pytest.raises(InputError, match="runs ESP-MedSAM checkpoints") as raised:
        make_predictor(checkpoint, "openvino", "cpu", None, False, 1, 1)
    assert "\n" not in str(raised.value)
    predictor = make_predictor(checkpoint, "auto", "cpu", None, False, 1, 1, native_openvino=True)
    assert isinstance(predictor.model, torch.nn.Module)


def test_a_native_checkpoint_keeps_one_compiled_side_fewer_than_an_exported_file(model, tmp_path):  # noqa: F811
    """Its torch model and the quality score's decoder pass sit beside the graphs (1.5 GB over a folder)."""
    from espmedsam.checkpoints.native import save_model
    from espmedsam.cli.common import make_predictor

    checkpoint = save_model(model, tmp_path / "tiny.safetensors")
    folder_run = make_predictor(checkpoint, "openvino", "cpu", None, False, 1, 1, max_graphs=2)
    served = make_predictor(checkpoint, "openvino", "cpu", None, False, 1, 1, max_graphs=None)
    assert folder_run.model.image_encoder.max_graphs == 1
    assert served.model.image_encoder.max_graphs is None


@pytest.mark.parametrize(
    ("backend", "checkpoint", "message"),
    [
        ("tensorrt", "m.onnx", "must be one of auto, torch, onnxruntime, openvino"),
        ("torch", "m.onnx", "runs native .safetensors"),
        ("onnxruntime", "m.safetensors", "needs --checkpoint MODEL.onnx"),
        ("onnxruntime", None, "needs --checkpoint MODEL.onnx"),
    ],
)
def test_a_backend_that_cannot_run_the_checkpoint_is_one_line(backend, checkpoint, message):
    with pytest.raises(InputError, match=message) as raised:
        choose_backend(backend, None if checkpoint is None else Path(checkpoint))
    assert "\n" not in str(raised.value)


def test_predict_auto_without_openvino_notices_and_writes_the_same_masks(
    exported,  # noqa: F811
    monkeypatch,
    tmp_path,
):
    from PIL import Image

    from espmedsam import openvino_backend

    monkeypatch.setattr(openvino_backend, "CACHE_DIR", tmp_path / "cache")
    image = tmp_path / "case.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(image)
    written = {}
    for name, has_openvino in (("openvino", True), ("onnxruntime", False)):
        monkeypatch.setattr(
            backends, "installed", lambda package, ok=has_openvino: ok or package != "openvino"
        )
        out = tmp_path / name
        args = ["predict", str(image), "-c", str(exported[0]), "--fp32", "-o", str(out), "-m", "dermoscopy"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        assert ("openvino is not installed" in result.output) is (not has_openvino)
        written[name] = np.asarray(Image.open(out / "case_mask.png"))
    assert (written["openvino"] == written["onnxruntime"]).mean() > 0.999
    assert any((tmp_path / "cache").iterdir())  # the compiled graph, kept for the next process


# --- a native checkpoint with its image encoder in OpenVINO (``openvino_encoder``) -------------------


@pytest.fixture(scope="module")
def hybrid(model, tmp_path_factory):  # noqa: F811
    """A copy of the tiny model with its encoder compiled by OpenVINO in fp32, and the cache folder."""
    import copy

    from espmedsam.openvino_encoder import use_openvino_encoder

    cache = tmp_path_factory.mktemp("encoders")
    said = []
    hybrid = use_openvino_encoder(
        copy.deepcopy(model), threads=1, bfloat16=False, cache_dir=cache, progress=said.append
    )
    return hybrid, cache, said


@pytest.fixture(scope="module")
def unbalanced(tmp_path_factory):
    """The tiny model with fixed-size windows, as the bundled weights have: one graph for every side."""

    from espmedsam.openvino_encoder import use_openvino_encoder
    from test_onnx import _tiny

    cache = tmp_path_factory.mktemp("encoders-unbalanced")
    hybrid = use_openvino_encoder(_tiny(balanced_windows=False), threads=1, bfloat16=False, cache_dir=cache)
    return _tiny(balanced_windows=False), hybrid, cache


def test_openvino_is_a_backend_for_a_native_checkpoint(tmp_path):
    assert choose_backend("openvino", tmp_path / "m.safetensors") == ("openvino", None)
    assert choose_backend("openvino", None) == ("openvino", None)


@pytest.mark.parametrize(("batch", "size"), [(3, SIZE), (1, 96)])
def test_the_openvino_encoder_gives_the_eager_masks(hybrid, model, batch, size):  # noqa: F811
    """Mixed modalities (each with its own controller) at the export side and at two others."""
    images, ids = _inputs(batch, size, seed=batch)
    with torch.no_grad():
        got = hybrid[0](images, ids)
        expected = model(images, ids)
    torch.testing.assert_close(got.embeddings, expected.embeddings, rtol=1e-3, atol=1e-3)
    assert np.abs(got.masks.numpy() - expected.masks.numpy()).max() <= 1e-2


def test_an_encoder_with_fixed_windows_exports_one_graph_for_every_side(unbalanced):
    eager, hybrid, cache = unbalanced
    for batch, size in [(2, SIZE), (1, 96)]:
        images, ids = _inputs(batch, size, seed=size)
        with torch.no_grad():
            got, expected = hybrid(images, ids), eager(images, ids)
        torch.testing.assert_close(got.embeddings, expected.embeddings, rtol=1e-3, atol=1e-3)
    assert [path.name.count("-") for path in cache.glob("encoder-*.onnx")] == [1]  # no per-side graphs


def test_the_classifier_features_come_from_the_graph(hybrid, model, monkeypatch):  # noqa: F811
    from espmedsam.predict import Predictor

    assert not hybrid[0].image_encoder.training and hybrid[0].image_encoder.has_classifier
    images, _ = _inputs(2)
    with torch.no_grad():  # encode(images, None) itself stays in torch
        assert torch.equal(hybrid[0].encode(images, None), model.encode(images, None))
    image = np.random.default_rng(2).integers(0, 255, (50, 70, 3), np.uint8)
    expected = Predictor(model, bfloat16=False).classify(image)
    monkeypatch.setattr(hybrid[0].image_encoder.torch_encoder, "forward", lambda *a: pytest.fail("torch"))
    got = Predictor(hybrid[0], bfloat16=False).classify(image)
    assert got.modality == expected.modality
    assert got.probabilities == pytest.approx(expected.probabilities, abs=1e-3)


def test_the_exported_encoder_is_cached_per_weights(hybrid, model, monkeypatch):  # noqa: F811
    import copy

    from espmedsam import openvino_encoder

    _, cache, said = hybrid
    # windows that follow the input side: one graph per side met so far, each exported once
    assert said and all("exporting the image encoder" in line for line in said)
    assert len(list(cache.glob("encoder-*-*.onnx"))) == len(said)
    monkeypatch.setattr(
        openvino_encoder, "export_encoder_onnx", lambda *a, **k: pytest.fail("exported again")
    )
    again = openvino_encoder.use_openvino_encoder(copy.deepcopy(model), threads=1, cache_dir=cache)
    assert isinstance(again.image_encoder, openvino_encoder.OpenVinoImageEncoder)


def test_at_most_max_graphs_sides_stay_compiled(hybrid, model):  # noqa: F811
    import copy

    from espmedsam.openvino_encoder import use_openvino_encoder

    small = use_openvino_encoder(
        copy.deepcopy(model), threads=1, bfloat16=False, cache_dir=hybrid[1], max_graphs=1
    )
    for size in (SIZE, 96, SIZE):  # each side evicts the other, and comes back
        images, ids = _inputs(2, size, seed=size)
        with torch.no_grad():
            got, expected = small(images, ids), model(images, ids)
        torch.testing.assert_close(got.embeddings, expected.embeddings, rtol=1e-3, atol=1e-3)
        assert list(small.image_encoder._compiled) == [size]


def _exports_copying(graphs: dict, calls: list):
    """A stand-in for ``export_encoder_onnx`` (an export of the tiny model takes half a minute): records
    each call's ``size`` and writes a copy of ``graphs[size]``, or fails as the exporter does for an
    encoder whose windows follow the side where ``graphs`` has no such size."""
    import shutil

    from espmedsam.errors import CheckpointError

    def export(source, path, *, size=None, **kwargs):
        calls.append(size)
        if size not in graphs:
            raise CheckpointError("torch.export failed: a stand-in")
        shutil.copy(graphs[size], path)
        return Path(path)

    return export


def test_an_encoder_graph_that_differs_is_refused_in_one_line(hybrid, model, monkeypatch, tmp_path):  # noqa: F811
    import copy

    from espmedsam import openvino_encoder
    from espmedsam.errors import CheckpointError

    other = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in other.image_encoder.parameters():
            parameter.add_(0.5)
    # the graph written for ``other`` is ``model``'s
    graphs = {SIZE: hybrid[0].image_encoder.graph(SIZE)}
    monkeypatch.setattr(openvino_encoder, "export_encoder_onnx", _exports_copying(graphs, []))
    compiled = openvino_encoder.use_openvino_encoder(other, threads=1, cache_dir=tmp_path)
    images, ids = _inputs(1)
    with pytest.raises(CheckpointError, match="differs from the eager one") as raised, torch.no_grad():
        compiled(images, ids)
    assert "\n" not in str(raised.value) and not list(tmp_path.glob("encoder-*.onnx"))


def test_a_kept_per_side_graph_spares_the_attempt_at_any_side(hybrid, model, monkeypatch, tmp_path):  # noqa: F811
    """Weights whose encoder gave no graph of any side are exported per side; once one per-side graph is
    kept, a new side is exported for that side alone, without the failing attempt at any side first."""
    import copy

    from espmedsam import openvino_encoder

    encoder = hybrid[0].image_encoder
    graphs = {SIZE: encoder.graph(SIZE), 96: encoder.graph(96)}
    calls: list = []
    monkeypatch.setattr(openvino_encoder, "export_encoder_onnx", _exports_copying(graphs, calls))
    fresh = openvino_encoder.use_openvino_encoder(copy.deepcopy(model), threads=1, cache_dir=tmp_path)
    assert fresh.image_encoder.graph(SIZE).name.endswith(f"-{SIZE}.onnx")
    assert calls == [None, SIZE]
    assert fresh.image_encoder.graph(96).name.endswith("-96.onnx")
    assert calls == [None, SIZE, 96]
    fresh.image_encoder.graph(SIZE)  # kept: no export
    assert calls == [None, SIZE, 96]


def test_predict_with_backend_openvino_on_a_native_checkpoint(hybrid, model, monkeypatch, tmp_path):  # noqa: F811
    from PIL import Image

    from espmedsam import openvino_encoder
    from espmedsam.checkpoints.native import save_model

    hybrid[0].image_encoder.graph(SIZE)  # the checkpoint's graph, exported once for these tests
    monkeypatch.setattr(openvino_encoder, "CACHE_DIR", hybrid[1])
    checkpoint = save_model(model, tmp_path / "tiny.safetensors")
    image = np.random.default_rng(0).integers(0, 255, (50, 70, 3), np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    masks = {}
    for backend in ("torch", "openvino"):
        out = tmp_path / backend
        args = ["predict", str(tmp_path / "a.png"), "-c", str(checkpoint), "--modality", "fundus",
                "--backend", backend, "--out", str(out), "--fp32"]  # fmt: skip
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        masks[backend] = np.array(Image.open(next(out.glob("a_mask.png")))) > 0
    assert dice(masks["openvino"], masks["torch"]) >= 0.98 or not masks["torch"].any()


def test_the_predictor_takes_the_prompt_free_masks_from_the_graph(hybrid, model, monkeypatch):  # noqa: F811
    """One graph run gives the embedding and the prompt-free masks: torch decodes nothing again."""
    from espmedsam.predict import Predictor

    compiled = hybrid[0]
    image = np.random.default_rng(1).integers(0, 255, (50, 70, 3), np.uint8)
    expected = Predictor(model, bfloat16=False).predict_with_patch_maps([image], "fundus")[0]

    def decode(*args, **kwargs):
        pytest.fail("decoded in torch")

    monkeypatch.setattr(compiled, "decode", decode)
    got = Predictor(compiled, bfloat16=False).predict_with_patch_maps([image], "fundus")[0]
    assert dice(got.mask, expected.mask) >= 0.98 or not expected.mask.any()
    assert np.abs(got.patch_map - expected.patch_map).max() <= 1e-2
