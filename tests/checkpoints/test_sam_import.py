"""import_sam and the torch checkpoint helpers on synthetic SAM-layout checkpoints."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from espmedsam.checkpoints.sam import import_sam
from espmedsam.checkpoints.torch_io import read_torch_state_dict
from espmedsam.errors import CheckpointError, ConfigError
from espmedsam.models.sam_vit import SamViTConfig, SamViTEncoder


class NeedsCode:
    """An object torch.load(weights_only=True) must refuse."""


def _tiny_state() -> tuple[SamViTEncoder, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = SamViTEncoder(SamViTConfig.tiny()).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    state = {f"image_encoder.{k}": v.clone() for k, v in model.state_dict().items()}
    state["prompt_encoder.no_mask_embed.weight"] = torch.zeros(1, 256)
    state["mask_decoder.iou_token.weight"] = torch.zeros(1, 256)
    return model, state


def _save(obj: object, path: Path) -> Path:
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("nest", [None, "model", "state_dict"])
def test_round_trip(tmp_path: Path, nest: str | None) -> None:
    model, state = _tiny_state()
    path = _save(state if nest is None else {nest: state, "epoch": 3}, tmp_path / "sam.pth")
    imported = import_sam(path)  # tiny inferred from width and depth
    assert not imported.training and imported.config == SamViTConfig.tiny()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(imported(images), model(images), rtol=0, atol=0)


def test_explicit_variant_and_config(tmp_path: Path) -> None:
    _, state = _tiny_state()
    path = _save(state, tmp_path / "sam.pth")
    assert import_sam(path, config=SamViTConfig.tiny()).config == SamViTConfig.tiny()
    assert import_sam(path, variant="tiny").config == SamViTConfig.tiny()
    other = dataclasses.replace(SamViTConfig.tiny(), pretrain_img_size=128)
    expected = r"mis-shaped: pos_embed \[1, 4, 4, 32\] vs model \[1, 8, 8, 32\]"
    with pytest.raises(CheckpointError, match=expected):
        import_sam(path, config=other)
    with pytest.raises(ConfigError):
        import_sam(path, variant="vit_q")


def test_every_problem_in_one_error(tmp_path: Path) -> None:
    _, state = _tiny_state()
    state["image_encoder.neck.0.weight"] = torch.zeros(32, 32, 3, 3)
    del state["image_encoder.blocks.0.attn.rel_pos_h"]
    state["image_encoder.blocks.0.attn.extra"] = torch.zeros(1)
    path = _save(state, tmp_path / "sam.pth")
    with pytest.raises(CheckpointError) as info:
        import_sam(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert "1 missing: blocks.0.attn.rel_pos_h" in message
    assert "1 unexpected: blocks.0.attn.extra" in message
    assert "1 mis-shaped: neck.0.weight [32, 32, 3, 3] vs model [32, 32, 1, 1]" in message


def test_listing_is_capped(tmp_path: Path) -> None:
    _, state = _tiny_state()
    for i in range(15):
        state[f"image_encoder.extra.{i}"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"15 unexpected: .*, \.\.\. and 5 more"):
        import_sam(_save(state, tmp_path / "sam.pth"))


def test_not_sam_or_unknown_layout(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no image_encoder"):
        import_sam(_save({"mask_decoder.x": torch.zeros(1)}, tmp_path / "a.pth"))
    state = {"image_encoder.patch_embed.proj.weight": torch.zeros(40, 3, 16, 16)}
    with pytest.raises(CheckpointError, match="width 40 and 0 blocks"):
        import_sam(_save(state, tmp_path / "b.pth"))


def _truncated(path: Path) -> None:
    _, state = _tiny_state()
    torch.save(state, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _random_bytes(path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    path.write_bytes(bytes(torch.randint(0, 256, (2000,), generator=generator).tolist()))


@pytest.mark.parametrize(
    "write",
    [
        _truncated,
        _random_bytes,
        lambda p: p.write_text("this is a text file\n"),
        lambda p: p.write_bytes(b""),
        lambda p: torch.save({"weights": NeedsCode()}, p),
        lambda p: torch.save([torch.zeros(1)], p),
        lambda p: torch.save({"epoch": 3}, p),
    ],
    ids=["truncated", "random", "text", "empty", "needs-code", "list", "no-tensors"],
)
def test_unreadable_file(tmp_path: Path, write) -> None:
    path = tmp_path / "broken.pth"
    write(path)
    with pytest.raises(CheckpointError) as info:
        import_sam(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        read_torch_state_dict(tmp_path / "nope.pth")


def test_saved_teacher_round_trip(tmp_path):
    from espmedsam.checkpoints.native import save_model
    from espmedsam.checkpoints.sam import load_sam_encoder, save_sam_encoder
    from espmedsam.errors import CheckpointError
    from espmedsam.models.registry import build_model
    from espmedsam.models.sam_vit import SamViTConfig, SamViTEncoder

    encoder = SamViTEncoder(SamViTConfig.tiny()).eval()
    path = save_sam_encoder(encoder, tmp_path / "teacher.safetensors")
    loaded = load_sam_encoder(path)
    assert loaded.config == encoder.config
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(loaded(x), encoder(x))
    student = save_model(build_model("tiny"), tmp_path / "student.safetensors")
    with pytest.raises(CheckpointError, match="not a 'espmedsam-sam-encoder' file"):
        load_sam_encoder(student)
