from __future__ import annotations

import numpy as np
import pytest
import torch

from espmedsam import MODALITIES, build_model
from espmedsam.errors import InputError


def _randomise_controllers(model: torch.nn.Module) -> None:
    """Fresh controllers start as the identity; give them distinct weights so routing matters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".controllers." in name or "output_hypernetworks" in name or "mask_query" in name:
                p.normal_(0, 0.2)


@pytest.mark.parametrize("size", [256, 512, 1024])
def test_output_shapes_tiny(tiny_model, size):
    out = tiny_model(torch.randn(2, 3, size, size), ["xray", "fundus"])
    assert out.masks.shape == (2, 1, size, size)
    assert out.patch_logits.shape == (2, 1, size // 32, size // 32)
    assert out.embeddings.shape == (2, 32, size // 16, size // 16)


@pytest.mark.parametrize("size", [256, 512])
def test_output_shapes_default(default_model, size):
    with torch.inference_mode():
        out = default_model(torch.randn(1, 3, size, size), torch.tensor([3]))
    assert out.masks.shape == (1, 1, size, size)
    assert out.patch_logits.shape == (1, 1, size // 32, size // 32)
    assert out.embeddings.shape == (1, 256, size // 16, size // 16)


@pytest.mark.slow
def test_output_shapes_default_1024(default_model):
    with torch.inference_mode():
        out = default_model(torch.randn(1, 3, 1024, 1024), "dermoscopy")
    assert out.masks.shape == (1, 1, 1024, 1024)
    assert out.patch_logits.shape == (1, 1, 32, 32)
    assert out.embeddings.shape == (1, 256, 64, 64)


@pytest.mark.parametrize("name", ["tiny", "official"])
def test_mixed_batch_equals_single_images(name):
    model = build_model(name)
    _randomise_controllers(model)
    size = 64 if name == "tiny" else 128
    images = torch.randn(4, 3, size, size)
    modality = [5, 0, 3, 0]
    with torch.inference_mode():
        batch = model(images, modality)
        for i, m in enumerate(modality):
            single = model(images[i : i + 1], [m])
            torch.testing.assert_close(batch.masks[i : i + 1], single.masks, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(batch.embeddings[i : i + 1], single.embeddings, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(
                batch.patch_logits[i : i + 1], single.patch_logits, atol=1e-4, rtol=1e-4
            )


def test_modalities_give_different_masks(tiny_model):
    _randomise_controllers(tiny_model)
    image = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        masks = [tiny_model(image, m).masks for m in MODALITIES]
    assert not torch.allclose(masks[0], masks[1])


def test_loss_reaches_only_its_controller(tiny_model):
    tiny_model.train()
    k = 2
    out = tiny_model(torch.randn(2, 3, 64, 64), [k, k])
    (out.masks.mean() + out.patch_logits.mean()).backward()
    touched = {n for n, p in tiny_model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    controller_params = [n for n, _ in tiny_model.named_parameters() if ".controllers." in n]
    assert controller_params
    for name in controller_params:
        slot = int(name.split(".controllers.")[1].split(".")[0])
        if slot != k:
            grad = dict(tiny_model.named_parameters())[name].grad
            assert grad is None, name
    assert any(f".controllers.{k}." in n for n in touched)
    assert any(f"output_hypernetworks_mlps.{k}." in n for n in touched)
    assert not any("output_hypernetworks_mlps.0." in n for n in touched)


def test_patch_decoder_learns_only_from_patch_loss(tiny_model):
    tiny_model.train()
    out = tiny_model(torch.randn(1, 3, 64, 64), "xray")
    out.masks.sum().backward()
    for name, p in tiny_model.sppg.patch_decoder.named_parameters():
        assert p.grad is None or not p.grad.any(), name


def test_encode_without_controller_differs_from_with(tiny_model):
    _randomise_controllers(tiny_model)
    images = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        shared = tiny_model.encode(images)
        routed = tiny_model.encode(images, "xray")
    assert shared.shape == routed.shape == (1, 32, 4, 4)
    assert not torch.allclose(shared, routed)


@pytest.mark.parametrize(
    "images, message",
    [
        (torch.randn(1, 3, 100, 100), "multiple of 32"),
        (torch.randn(1, 1, 64, 64), "(B, 3, S, S)"),
        (torch.randn(3, 64, 64), "(B, 3, S, S)"),
    ],
)
def test_bad_images_raise(tiny_model, images, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_model(images, "xray")


@pytest.mark.parametrize(
    "modality, message", [("mri", "unknown modality"), ([7], "0..5"), (["xray"] * 3, "3 modalities")]
)
def test_bad_modality_raises(tiny_model, modality, message):
    with pytest.raises(InputError, match=message):
        tiny_model(torch.randn(2, 3, 64, 64), modality)


@pytest.mark.parametrize("shape", [(50, 80), (80, 50, 3), (33, 33, 4), (64, 64, 1)])
def test_preprocess_postprocess_round_trip(tiny_model, shape):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=shape, dtype=np.uint8)
    x, meta = tiny_model.preprocess(image, size=128)
    assert x.shape == (1, 3, 128, 128)
    assert max(meta.resized_size) == 128
    assert meta.original_size == shape[:2]
    h, w = meta.resized_size
    assert torch.all(x[..., h:, :] == 0) and torch.all(x[..., :, w:] == 0)
    logits = torch.zeros(1, 1, 128, 128)
    logits[..., :h, :w] = 1.0
    back = tiny_model.postprocess(logits, meta)
    assert back.shape == (1, 1, *shape[:2])
    torch.testing.assert_close(back, torch.ones_like(back))


def test_preprocess_normalises_like_config(tiny_model):
    image = np.full((32, 32, 3), 200, dtype=np.uint8)
    x, _ = tiny_model.preprocess(image, size=32)
    mean = torch.tensor(tiny_model.config.pixel_mean)
    std = torch.tensor(tiny_model.config.pixel_std)
    torch.testing.assert_close(x[0, :, 0, 0], (200 - mean) / std)


def test_official_normalisation_is_x_over_mean_minus_one():
    model = build_model("official")
    x, _ = model.preprocess(np.full((32, 32, 3), 100, dtype=np.uint8), size=32)
    torch.testing.assert_close(x[0, :, 0, 0], 100 / torch.tensor(model.config.pixel_mean) - 1)


@pytest.mark.parametrize("image", [np.zeros((10, 10, 2), np.uint8), np.zeros((10, 10), np.float32)])
def test_preprocess_rejects_bad_arrays(tiny_model, image):
    with pytest.raises(InputError):
        tiny_model.preprocess(image)


def test_preprocess_rejects_bad_size(tiny_model):
    with pytest.raises(InputError, match="multiple of 32"):
        tiny_model.preprocess(np.zeros((10, 10), np.uint8), size=100)


def test_boxes_decoded_in_several_passes_equal_one_pass(monkeypatch):
    """Large inputs decode their boxes a few at a time (``BOX_PASS_PIXELS``): the same masks."""
    import dataclasses

    from espmedsam.models import espmedsam as espmedsam_module
    from espmedsam.models.registry import tiny_config

    config = tiny_config()
    model = build_model(dataclasses.replace(config, prompt=dataclasses.replace(config.prompt, enabled=True)))
    model.eval()
    with torch.no_grad():
        embeddings = model.encode(torch.randn(2, 3, 64, 64), [0, 1])
        boxes = torch.tensor([[4.0, 4, 40, 40], [10, 8, 60, 50], [0, 0, 63, 63]])
        owners = torch.tensor([0, 1, 1])
        one_pass = model.box_decoder(embeddings, 64)(boxes, owners)
        monkeypatch.setattr(espmedsam_module, "BOX_PASS_PIXELS", 64 * 64)  # one box per pass
        passes = model.box_decoder(embeddings, 64)(boxes, owners)
    assert passes[0].shape == (3, 1, 64, 64) and passes[1].shape == (3,)
    assert torch.allclose(passes[0], one_pass[0], atol=1e-5) and torch.allclose(
        passes[1], one_pass[1], atol=1e-5
    )
