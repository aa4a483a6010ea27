"""The detail branch and controllers limited to the last stages (the bundled layout)."""

from __future__ import annotations

import pytest
import torch

from espmedsam.config import apply_overrides
from espmedsam.models.registry import build_model, get_config

# the bundled layout: LiteMedSAM's pointwise stem (output stride 4, sides multiples of 8)
LAYOUT = ["encoder.stem=pointwise", "controller.first_stage=3", "detail.enabled=true"]
STRIDED = ["controller.first_stage=3", "detail.enabled=true"]  # MobileSAM's stem: the branch pools by 4


def _model(seed: int = 0, overrides: list[str] = LAYOUT):
    torch.manual_seed(seed)
    model = build_model(apply_overrides(get_config("tiny"), overrides))
    with torch.no_grad():  # trained-looking controllers and detail branch: nothing left at zero
        for name, parameter in model.named_parameters():
            if ".controllers." in name or "detail_branch" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def test_early_stages_carry_no_controllers():
    encoder = _model().image_encoder
    assert all(len(block.controllers) == 0 for block in encoder.layers[1].blocks)
    assert all(len(block.controllers) == 6 for block in encoder.layers[3].blocks)


@pytest.mark.parametrize(
    ("layout", "size"), [(LAYOUT, 40), (LAYOUT, 56), (LAYOUT, 72), (STRIDED, 96), (STRIDED, 160)]
)
def test_detail_path_at_odd_sizes_in_mixed_batches(layout, size):
    model = _model(overrides=layout).eval()
    x = torch.rand(3, 3, size, size)
    names = ["fundus", "xray", "fundus"]
    with torch.no_grad():
        batch = model(x, names).masks
        singles = torch.cat([model(x[i : i + 1], [n]).masks for i, n in enumerate(names)])
    assert batch.shape == (3, 1, size, size)
    assert torch.allclose(batch, singles, atol=1e-5)


def test_detail_branch_reaches_the_mask_at_full_resolution():
    model = _model().eval()
    x = torch.rand(1, 3, 64, 64)
    y = x.clone()
    y[..., 30, 30] += 1.0  # one pixel: finer than an embedding cell
    with torch.no_grad():
        base = model.decode(model.encode(x, "fundus"), "fundus", 64, x).masks
        poked = model.decode(model.encode(x, "fundus"), "fundus", 64, y).masks
    changed = (poked - base).abs()[0, 0] > 0
    assert changed[30, 30] and not changed[:20].any()  # local: nothing moves far from the pixel


def test_perturbing_one_controller_leaves_other_modalities_bitwise_equal():
    model = _model().eval()
    x = torch.rand(4, 3, 64, 64)
    names = ["dermoscopy", "fundus", "xray", "fundus"]
    with torch.no_grad():
        before = model(x, names).masks
        fundus = model.modalities.index("fundus")
        for block in model.image_encoder.layers[3].blocks:
            controller = block.controllers[fundus]
            controller.prompt_tokens.add_(1.0)
            controller.adapter.fc2.weight.add_(0.5)
        after = model(x, names).masks
    others = [0, 2]
    assert torch.equal(before[others], after[others])
    assert not torch.allclose(before[[1, 3]], after[[1, 3]])


def test_fresh_detail_branch_is_the_identity():
    torch.manual_seed(0)
    plain = build_model(get_config("tiny")).eval()
    torch.manual_seed(0)
    grown = build_model(apply_overrides(get_config("tiny"), ["detail.enabled=true"])).eval()
    grown.load_state_dict(plain.state_dict(), strict=False)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(plain(x, "fundus").masks, grown(x, "fundus").masks)
