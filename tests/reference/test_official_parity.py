"""The package's ``official`` layout against an independent re-implementation of the official forward pass.

``official_reference.official_forward`` is written from ``shared/reference/official_forward.md`` alone and
reads a raw state dict with the official key names. A random such state dict (``manifest``) is saved with
``torch.save``, imported with ``espmedsam.import_official`` and both forward passes are compared on the same
officially normalised random image.
"""

from __future__ import annotations

import pytest
import torch
from manifest import manifest_available, random_official_state_dict
from official_reference import PIXEL_MEAN, official_forward, official_normalise

pytestmark = pytest.mark.skipif(not manifest_available(), reason="official state-dict manifest not available")

NUM_MODALITIES = 6


def _random_image(size: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return official_normalise(torch.randint(0, 256, (batch, 3, size, size), generator=g, dtype=torch.uint8))


@pytest.fixture(scope="module")
def official_state_dict() -> dict[str, torch.Tensor]:
    return random_official_state_dict(seed=0)


# ---------------------------------------------------------------------------------------------------------
# the reference on its own


def test_normalise_is_x_over_mean_minus_one():
    rgb = torch.tensor([[[[0.0]], [[116.28]], [[255.0]]]])
    out = official_normalise(rgb)
    expected = torch.tensor([-1.0, 0.0, 255.0 / PIXEL_MEAN[2] - 1.0])
    torch.testing.assert_close(out.flatten(), expected)
    assert official_normalise(torch.full((3, 4, 4), 255, dtype=torch.uint8)).dtype == torch.float32


@pytest.mark.parametrize("size", [256, 512])
def test_reference_shapes(official_state_dict, size):
    x = _random_image(size, batch=2)
    masks, patch_map, emb = official_forward(official_state_dict, x, 3)
    assert masks.shape == (2, 1, size, size)
    assert patch_map.shape == (2, 1, size // 32, size // 32)
    assert emb.shape == (2, 256, size // 16, size // 16)
    for t in (masks, patch_map, emb):
        assert torch.isfinite(t).all()


def test_reference_whole_map_window_path_runs(official_state_dict):
    # 224 -> layers[2] runs on a 14 x 14 map == its window: the H == W == w whole-map branch
    masks, patch_map, emb = official_forward(official_state_dict, _random_image(224), 0)
    assert masks.shape == (1, 1, 224, 224)
    assert patch_map.shape == (1, 1, 7, 7)
    assert emb.shape == (1, 256, 14, 14)


def test_reference_patch_threshold_is_mixed(official_state_dict):
    _, patch_map, _ = official_forward(official_state_dict, _random_image(256), 0)
    on = torch.sigmoid(patch_map) >= 0.5
    assert on.any() and not on.all(), "the random patch decoder bias should put patches on both sides"


def test_reference_mcls_selects_the_mask_channel(official_state_dict):
    x = _random_image(256)
    outs = [official_forward(official_state_dict, x, c) for c in (0, 1, 5)]
    for m, p, e in outs[1:]:
        torch.testing.assert_close(p, outs[0][1], rtol=0, atol=0)
        torch.testing.assert_close(e, outs[0][2], rtol=0, atol=0)
        assert (m - outs[0][0]).abs().max() > 1e-2
    with pytest.raises(ValueError):
        official_forward(official_state_dict, x, 6)


def test_reference_batch_is_per_image(official_state_dict):
    x = _random_image(256, batch=2)
    batched = official_forward(official_state_dict, x, 4)
    for b in range(2):
        single = official_forward(official_state_dict, x[b : b + 1], 4)
        for t_batch, t_single in zip(batched, single, strict=True):
            torch.testing.assert_close(t_batch[b : b + 1], t_single, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "key, matters",
    [
        ("SemiTViT.layers.3.blocks.1.attn.attention_biases", True),
        ("SemiTViT.layers.2.blocks.0.attn.med_attention_biases", True),
        ("SemiTViT.layers.1.blocks.1.attn.deep_QKV_embeddings_med", True),
        ("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix", True),
        ("mask_query.weight", True),
        ("SemiTViT.head.weight", False),
        ("SemiTViT.norm_head.weight", False),
        ("prompt_encoder.no_mask_embed.weight", False),
        ("prompt_encoder.point_embeddings.0.weight", False),
    ],
)
def test_reference_parameter_influence(official_state_dict, key, matters):
    x = _random_image(256)
    base = official_forward(official_state_dict, x, 2)
    changed = dict(official_state_dict)
    changed[key] = official_state_dict[key] + 0.5
    out = official_forward(changed, x, 2)
    diff = max((a - b).abs().max().item() for a, b in zip(base, out, strict=True))
    assert (diff > 1e-3) == matters, f"{key}: max diff {diff}"


# ---------------------------------------------------------------------------------------------------------
# the package's official layout against the reference


def _import_official():
    import espmedsam

    fn = getattr(espmedsam, "import_official", None)
    if fn is None:
        try:
            from espmedsam.checkpoints.importers import import_official as fn
        except ImportError:
            pytest.skip("espmedsam.import_official is not available yet")
    return fn


@pytest.fixture(scope="module")
def imported_model(official_state_dict, tmp_path_factory):
    import_official = _import_official()
    path = tmp_path_factory.mktemp("official") / "espmedsam_official_random.pth"
    torch.save(official_state_dict, path)
    model = import_official(path)
    return model.eval()


def _compare(model, state_dict, x: torch.Tensor, mcls: int) -> dict[str, float]:
    with torch.no_grad():
        ours = model(x, [mcls] * x.shape[0])
    ref_masks, ref_patch, ref_emb = official_forward(state_dict, x, mcls)
    assert ours.masks.shape == ref_masks.shape
    assert ours.patch_logits.shape == ref_patch.shape
    assert ours.embeddings.shape == ref_emb.shape

    emb_tol = 1e-4 * max(1.0, ref_emb.abs().max().item())
    patch_tol = 1e-4 * max(1.0, ref_patch.abs().max().item())
    torch.testing.assert_close(ours.embeddings, ref_emb, rtol=0, atol=emb_tol)
    torch.testing.assert_close(ours.patch_logits, ref_patch, rtol=0, atol=patch_tol)
    assert torch.equal(torch.sigmoid(ours.patch_logits) >= 0.5, torch.sigmoid(ref_patch) >= 0.5)
    torch.testing.assert_close(ours.masks, ref_masks, rtol=0, atol=1e-3)
    agree = ((ours.masks >= 0) == (ref_masks >= 0)).float().mean().item()
    assert agree >= 0.999, f"only {agree:.5f} of thresholded mask pixels agree"
    return {
        "embeddings": (ours.embeddings - ref_emb).abs().max().item(),
        "patch_logits": (ours.patch_logits - ref_patch).abs().max().item(),
        "masks": (ours.masks - ref_masks).abs().max().item(),
        "mask_agreement": agree,
    }


@pytest.mark.parametrize("mcls", range(NUM_MODALITIES))
def test_official_layout_matches_reference_256(imported_model, official_state_dict, mcls):
    _compare(imported_model, official_state_dict, _random_image(256, batch=2, seed=10 + mcls), mcls)


@pytest.mark.slow
@pytest.mark.parametrize("mcls", [1, 4])
def test_official_layout_matches_reference_1024(imported_model, official_state_dict, mcls):
    _compare(imported_model, official_state_dict, _random_image(1024, batch=1, seed=20 + mcls), mcls)
