"""ONNX export and the onnxruntime backend, on tiny models with per-modality controllers."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from espmedsam.checkpoints.native import save_model
from espmedsam.cli import app
from espmedsam.config import ModelConfig
from espmedsam.errors import CheckpointError, InputError, MissingDependencyError
from espmedsam.models.controller import ControllerRoute, gathered_routing
from espmedsam.models.registry import build_model, tiny_config

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

from espmedsam.checkpoints import onnx_export  # noqa: E402
from espmedsam.checkpoints.onnx_export import export_onnx  # noqa: E402
from espmedsam.onnx_backend import OnnxBackend  # noqa: E402

SIZE = 64  # the tiny config's image_size
MIXED = [0, 3, 5]  # three modalities in one batch


def _tiny(**encoder) -> torch.nn.Module:
    """The tiny model with a classifier, controllers and hypernetworks that differ per modality (a fresh
    controller is the identity, which would hide a wrong route)."""
    config = tiny_config()
    config = dataclasses.replace(
        config,
        encoder=dataclasses.replace(config.encoder, **encoder),
        classifier=dataclasses.replace(config.classifier, enabled=True, input_size=SIZE, hidden_dim=16),
    )
    torch.manual_seed(0)
    model = build_model(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".controllers." in name or "hypernetworks" in name:
                parameter.add_(0.2 * torch.randn_like(parameter))
    return model.eval()


def _inputs(batch: int, size: int = SIZE, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor((MIXED * batch)[:batch])
    return torch.randn(batch, 3, size, size, generator=generator), ids


def _eager_masks(model, images: torch.Tensor, ids: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(images, ids).masks.numpy()


@pytest.fixture(scope="module")
def model():
    return _tiny()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    """The model exported through the command line at a fixed side (the fast path): (path, CLI result)."""
    folder = tmp_path_factory.mktemp("onnx")
    checkpoint = save_model(model, folder / "tiny.safetensors")
    out = folder / "tiny.onnx"
    args = ["export", str(checkpoint), "--format", "onnx", "--out", str(out), "--size", str(SIZE)]
    return out, CliRunner().invoke(app, args)


@pytest.fixture(scope="module")
def backend(exported):
    return OnnxBackend(exported[0], threads=1)


def test_gathered_routing_matches_eager_routing(model):
    images, ids = _inputs(3)
    eager = model(images, ids)
    with torch.no_grad(), gathered_routing():
        gathered = model(images, ids)
        assert model.route(ids).groups == ()  # the gathered path is the one taken
    for a, b in ((eager.masks, gathered.masks), (eager.patch_logits, gathered.patch_logits)):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
    bank = model.image_encoder.layers[1].blocks[0].controllers
    x = torch.randn(3, 4, 4, bank[0].adapter.fc1.in_features)
    eager_route, gathered_route = ControllerRoute.from_index(ids), ControllerRoute.gathered(ids)
    assert torch.allclose(bank.adapt(x, eager_route), bank.adapt(x, gathered_route), atol=1e-5, rtol=0)
    for a, b in zip(bank.prompts(eager_route), bank.prompts(gathered_route), strict=True):
        assert torch.equal(a, b)


def test_cli_writes_an_onnx_file(exported):
    out, result = exported
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and out.is_file()
    proto = onnx.load(str(out), load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert [i.name for i in proto.graph.input] == ["images", "modality", "classifier_images"]
    assert [o.name for o in proto.graph.output] == ["masks", "patch_logits", "modality_logits"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_cli_rejects_fp16_for_onnx(tmp_path, model):
    checkpoint = save_model(model, tmp_path / "tiny.safetensors")
    args = ["export", str(checkpoint), "--format", "onnx", "--out", str(tmp_path / "m.onnx"), "--fp16"]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, InputError) and "--fp16" in str(result.exception)
    assert not (tmp_path / "m.onnx").exists()


def test_metadata_round_trip(backend, model):
    assert backend.config == model.config
    assert backend.fixed_size == SIZE
    assert backend.has_classifier and backend.modalities == model.modalities


def test_parity_with_torch_on_a_mixed_batch(backend, model):
    images, ids = _inputs(3)
    masks = backend.segment(images.numpy(), ids.numpy())
    assert masks.shape == (3, 1, SIZE, SIZE) and masks.dtype == np.float32
    assert np.abs(masks - _eager_masks(model, images, ids)).max() <= 1e-3


@pytest.mark.parametrize("batch", [1, 3])
def test_batch_is_dynamic(backend, model, batch):
    images, ids = _inputs(batch, seed=batch)  # exported at B = 2
    masks = backend.segment(images.numpy(), ids.numpy())
    assert np.abs(masks - _eager_masks(model, images, ids)).max() <= 1e-3


def test_classify_runs_the_classifier_alone(backend, model):
    images, _ = _inputs(2)
    with torch.no_grad():
        expected = model.classify(images).numpy()
    logits = backend.classify(images.numpy())
    assert logits.shape == (2, len(model.modalities))
    assert np.abs(logits - expected).max() <= 1e-4
    classifier = backend._sessions["classify"]
    assert [i.name for i in classifier.get_inputs()] == ["classifier_images"]


def test_segment_checks_its_inputs(backend):
    images, ids = _inputs(2)
    with pytest.raises(InputError, match="exported at 64x64"):
        backend.segment(np.zeros((1, 3, 96, 96), np.float32), np.zeros(1, np.int64))
    with pytest.raises(InputError, match="modalities for a batch"):
        backend.segment(images.numpy(), ids[:1].numpy())
    with pytest.raises(InputError, match="must lie in"):
        backend.segment(images.numpy(), np.array([0, 9]))
    with pytest.raises(InputError, match=r"\(B, 3, S, S\)"):
        backend.segment(images.numpy()[:, :1], ids.numpy())


def test_missing_garbage_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        OnnxBackend(tmp_path / "missing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\xffnot a protobuf" * 50)
    with pytest.raises(CheckpointError, match="not an ONNX file"):
        OnnxBackend(garbage)
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    value = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(
        [node], "g", [value("x", onnx.TensorProto.FLOAT, [1])], [value("y", onnx.TensorProto.FLOAT, [1])]
    )
    foreign = tmp_path / "foreign.onnx"
    onnx.save(onnx.helper.make_model(graph), str(foreign))
    with pytest.raises(CheckpointError, match="not an espmedsam export"):
        OnnxBackend(foreign)
    proto = onnx.load(str(foreign))
    onnx.helper.set_model_props(proto, {"format": "espmedsam-onnx", "format_version": "1", "config": "{"})
    onnx.save(proto, str(foreign))
    with pytest.raises(CheckpointError, match="unreadable model config"):
        OnnxBackend(foreign)


def test_missing_packages_name_the_extra(monkeypatch, model, tmp_path):
    real = onnx_export.importlib.util.find_spec
    monkeypatch.setattr(
        onnx_export.importlib.util, "find_spec", lambda name: None if name == "onnxscript" else real(name)
    )
    with pytest.raises(MissingDependencyError, match=r'onnxscript; pip install "espmedsam\[onnx\]"'):
        export_onnx(model, tmp_path / "m.onnx")


def test_export_rejects_a_bad_size(model, tmp_path):
    with pytest.raises(InputError, match="multiple of 32"):
        export_onnx(model, tmp_path / "m.onnx", size=70)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("ESPMEDSAM_ONNX_DYNAMIC"), reason="1-2 minutes; set ESPMEDSAM_ONNX_DYNAMIC=1"
)
def test_input_side_is_dynamic(tmp_path):
    """Fixed windows (as the bundled model): one graph for every side, parity with torch at each."""
    model = _tiny(balanced_windows=False)
    path = export_onnx(model, tmp_path / "dynamic.onnx")  # symbolic shapes make this export slow
    backend = OnnxBackend(path, threads=1)
    assert backend.fixed_size is None
    metadata = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert metadata["fixed_size"] == ""
    assert ModelConfig.from_dict(json.loads(metadata["config"])) == model.config
    for batch, size in [(1, 64), (3, 96), (2, 128), (1, 224), (2, 256), (1, 320)]:
        images, ids = _inputs(batch, size, seed=size)
        masks = backend.segment(images.numpy(), ids.numpy())
        assert masks.shape == (batch, 1, size, size)
        assert np.abs(masks - _eager_masks(model, images, ids)).max() <= 1e-3, size


def test_predict_with_onnxruntime_writes_the_masks_torch_writes(model, exported, tmp_path):
    from PIL import Image

    from espmedsam.predict import Predictor
    from espmedsam.predict_files import predict_files

    rng = np.random.default_rng(0)
    paths = []
    for i, shape in enumerate(((40, 64, 3), (64, 30), (50, 50, 3))):
        paths.append(tmp_path / f"case{i}.png")
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(paths[-1])
    runs = {
        "torch": Predictor(model, device="cpu", size=SIZE, bfloat16=False),
        "onnxruntime": Predictor(OnnxBackend(exported[0], threads=1)),
    }
    for name, predictor in runs.items():
        results = list(predict_files(predictor, paths, tmp_path / name))  # --modality auto: the classifier
        assert all(r.ok and r.chosen_by == "classifier" for r in results), results
    for path in paths:
        masks = [np.asarray(Image.open(tmp_path / name / f"{path.stem}_mask.png")) for name in runs]
        assert masks[0].shape == masks[1].shape and (masks[0] == masks[1]).mean() > 0.999
    rows = [(tmp_path / name / "predictions.csv").read_text().splitlines() for name in runs]
    assert [r.split(",")[1] for r in rows[0]] == [r.split(",")[1] for r in rows[1]]  # same modalities
