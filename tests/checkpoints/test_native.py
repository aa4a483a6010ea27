"""Native checkpoints: bitwise round trips, float16 shipping, atomic writes and every error path."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import espmedsam.checkpoints.native as native
from espmedsam import build_model
from espmedsam.checkpoints.native import default_checkpoint, load_model, save_model
from espmedsam.errors import CheckpointError, ConfigError, InputError


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build_model("tiny")
    with torch.no_grad():  # non-trivial BatchNorm statistics, so the round trip covers buffers too
        for name, buffer in model.named_buffers():
            if name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                buffer.normal_()
            elif name.endswith("num_batches_tracked"):
                buffer.fill_(7)
    return model


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def _forward(model: torch.nn.Module, size: int = 64):
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(images, [0, 3])


def _write(path, tensors, metadata):
    save_file(tensors, str(path), metadata=metadata)
    return path


def _metadata(model, **changes):
    meta = {"format": "espmedsam", "format_version": "1", "config": model.config.to_json()}
    meta.update(changes)
    return meta


def test_round_trip_tiny_is_bitwise(tiny, tmp_path):
    path = save_model(tiny, tmp_path / "tiny.safetensors")
    assert path == tmp_path / "tiny.safetensors"
    loaded = load_model(path)
    assert loaded.config == tiny.config
    assert not loaded.training
    _assert_same_state(tiny, loaded)
    a, b = _forward(tiny), _forward(loaded)
    for field in ("masks", "patch_logits", "embeddings"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


@pytest.mark.slow
def test_round_trip_default_is_bitwise(tmp_path):
    torch.manual_seed(0)
    model = build_model("default")
    loaded = load_model(save_model(model, tmp_path / "default.safetensors"))
    assert loaded.config == model.config
    _assert_same_state(model, loaded)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(images, "fundus").masks, loaded(images, "fundus").masks)


def test_metadata_holds_format_and_config(tiny, tmp_path):
    path = save_model(tiny, tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as file:
        meta = file.metadata()
    assert meta["format"] == "espmedsam" and meta["format_version"] == "1"
    assert json.loads(meta["config"]) == tiny.config.to_dict()


def test_float16_save_loads_as_float32(tiny, tmp_path):
    path = save_model(tiny, tmp_path / "half.safetensors", dtype=torch.float16)
    with safe_open(str(path), framework="pt") as file:
        stored = {k: file.get_tensor(k) for k in file.keys()}
    assert stored["decoder.mask_query.weight"].dtype == torch.float16
    assert stored["image_encoder.patch_embed.seq.0.bn.num_batches_tracked"].dtype == torch.int64
    loaded = load_model(path)
    state = loaded.state_dict()
    for key, value in tiny.state_dict().items():
        got = state[key]
        assert got.dtype == value.dtype, key
        expected = value.half().float() if value.is_floating_point() else value
        assert torch.equal(got, expected), key
    assert _forward(loaded).masks.dtype == torch.float32


def test_non_floating_dtype_is_rejected(tiny, tmp_path):
    with pytest.raises(InputError, match="floating"):
        save_model(tiny, tmp_path / "m.safetensors", dtype=torch.int8)


def test_atomic_write_leaves_only_the_checkpoint(tiny, tmp_path):
    target = tmp_path / "sub" / "m.safetensors"
    save_model(tiny, target)
    save_model(tiny, target)  # replacing an existing file
    assert sorted(os.listdir(tmp_path / "sub")) == ["m.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not the 0600 of a mkstemp file


def test_failed_write_keeps_the_old_file_and_no_temp(tiny, tmp_path, monkeypatch):
    target = save_model(tiny, tmp_path / "m.safetensors")
    before = target.read_bytes()

    def broken(tensors, metadata=None):
        raise OSError("disk full")

    monkeypatch.setattr(native, "safetensors_bytes", broken)
    with pytest.raises(OSError, match="disk full"):
        save_model(tiny, target)
    assert os.listdir(tmp_path) == ["m.safetensors"]
    assert target.read_bytes() == before


def test_wrong_shape_is_named(tiny, tmp_path):
    tensors = {k: v.clone() for k, v in tiny.state_dict().items()}
    tensors["decoder.mask_query.weight"] = torch.zeros(3, 5)
    path = _write(tmp_path / "bad.safetensors", tensors, _metadata(tiny))
    with pytest.raises(CheckpointError, match="mis-shaped") as info:
        load_model(path)
    assert "decoder.mask_query.weight" in str(info.value) and "bad.safetensors" in str(info.value)


def test_extra_and_missing_keys_are_named(tiny, tmp_path):
    tensors = {k: v.clone() for k, v in tiny.state_dict().items()}
    tensors["decoder.extra.weight"] = torch.zeros(2)
    del tensors["sppg.dense_prompter.0.bias"]
    path = _write(tmp_path / "bad.safetensors", tensors, _metadata(tiny))
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    message = str(info.value)
    assert "unexpected: decoder.extra.weight" in message
    assert "missing: sppg.dense_prompter.0.bias" in message
    assert "\n" not in message


def test_truncated_file(tiny, tmp_path):
    data = save_model(tiny, tmp_path / "m.safetensors").read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a safetensors file or is truncated") as info:
        load_model(path)
    assert "cut.safetensors" in str(info.value)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "junk.bin is an empty file"),
        (b"\x01\x02", "junk.bin is not a safetensors file"),
        (b"\x07" * 64 + b"x" * 1000, "junk.bin is not a safetensors file"),
    ],
)
def test_garbage_bytes(tmp_path, content, message):
    path = tmp_path / "junk.bin"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_model(path)


def test_torch_file_points_to_the_importers(tiny, tmp_path):
    path = tmp_path / "model.pth"
    torch.save(tiny.state_dict(), path)
    with pytest.raises(CheckpointError, match="not an espmedsam checkpoint; use `espmedsam import") as info:
        load_model(path)
    assert "model.pth" in str(info.value)


def test_safetensors_without_our_metadata(tiny, tmp_path):
    path = _write(tmp_path / "hf.safetensors", {"w": torch.zeros(2)}, None)
    with pytest.raises(CheckpointError, match="hf.safetensors .*not an espmedsam checkpoint"):
        load_model(path)


def test_unknown_format_version(tiny, tmp_path):
    path = _write(tmp_path / "v9.safetensors", {"w": torch.zeros(2)}, _metadata(tiny, format_version="9"))
    with pytest.raises(CheckpointError, match="format version '9'"):
        load_model(path)


def test_bad_config_names_file_and_key(tiny, tmp_path):
    config = tiny.config.to_dict()
    config["encoder"]["windw_sizes"] = [7, 7, 7, 7]
    meta = _metadata(tiny, config=json.dumps(config))
    path = _write(tmp_path / "cfg.safetensors", {"w": torch.zeros(2)}, meta)
    with pytest.raises(CheckpointError, match="cfg.safetensors has an invalid model config") as info:
        load_model(path)
    assert "encoder.windw_sizes" in str(info.value)


def test_unparsable_config(tiny, tmp_path):
    path = _write(tmp_path / "cfg.safetensors", {"w": torch.zeros(2)}, _metadata(tiny, config="{not json"))
    with pytest.raises(CheckpointError, match="unreadable model config"):
        load_model(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope.safetensors")


def test_default_checkpoint_is_a_loadable_file_or_none():
    path = default_checkpoint()
    assert path is None or (path.is_file() and path.name == native.DEFAULT_WEIGHTS)


def test_export_in_float16_with_per_modality_input_sizes(tmp_path):
    from espmedsam.checkpoints.native import export_checkpoint, load_checkpoint

    source = save_model(build_model("tiny"), tmp_path / "model.safetensors")
    sizes = {"fundus": 128}
    out = export_checkpoint(source, tmp_path / "ship.safetensors", dtype=torch.float16, inference_sizes=sizes)
    model = load_checkpoint(out)
    assert model.config.inference_sizes == (64, 64, 64, 128, 64, 64)
    assert model.input_size("fundus") == 128 and model.input_size("xray") == 64
    assert out.stat().st_size < 0.6 * source.stat().st_size
    with pytest.raises(ConfigError, match="unknown modality"):
        export_checkpoint(source, tmp_path / "x.safetensors", inference_sizes={"mri": 64})
    with pytest.raises(ConfigError, match="inference_sizes"):
        export_checkpoint(source, tmp_path / "x.safetensors", inference_sizes={"fundus": 100})


def test_export_keeps_a_unet_baseline_a_unet(tmp_path):
    from espmedsam.checkpoints.native import export_checkpoint, load_checkpoint, save_unet
    from espmedsam.models.unet import UNetBaseline, UNetConfig

    source = save_unet(UNetBaseline(UNetConfig(features=(4, 4, 8, 8, 16, 4))), tmp_path / "unet.safetensors")
    out = export_checkpoint(source, tmp_path / "out.safetensors", inference_sizes={"xray": 48})
    model = load_checkpoint(out)
    assert isinstance(model, UNetBaseline) and model.input_size("xray") == 48
