"""Importers on synthetic checkpoints built from the reference manifests (names, shapes, dtypes)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch

from espmedsam import build_model
from espmedsam.checkpoints.importers import import_mobilesam, import_official, official_key
from espmedsam.errors import CheckpointError, InputError
from espmedsam.models.registry import get_config

REFERENCE = Path(__file__).resolve().parents[2].parent / "shared" / "reference"
OFFICIAL_TSV = REFERENCE / "espmedsam_official_state_dict.tsv"
MOBILESAM_TSV = REFERENCE / "mobilesam_image_encoder_state_dict.tsv"
SAM_TSV = REFERENCE / "sam_vit_b_state_dict.tsv"
SAM_DECODER = ("mask_decoder.transformer.", "mask_decoder.output_upscaling.", "prompt_encoder.pe_layer.")


def _manifest(path: Path) -> list[tuple[str, list[int], str]]:
    if not path.is_file():
        pytest.skip(f"reference manifest {path} is not available")
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            name, shape, dtype = line.split("\t")
            rows.append((name, [int(d) for d in shape.strip("[]").split(",") if d], dtype))
    return rows


def _random_state(rows, seed: int) -> dict[str, torch.Tensor]:
    """Random tensors with the manifest's names and shapes; BatchNorm variances positive."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape, dtype in rows:
        if dtype == "int64":
            state[name] = torch.randint(0, 100, shape, dtype=torch.int64, generator=generator)
        elif name.endswith("running_var"):
            state[name] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[name] = torch.randn(shape, generator=generator) * 0.05
    return state


@pytest.fixture(scope="module")
def official_state():
    return _random_state(_manifest(OFFICIAL_TSV), seed=0)


@pytest.fixture(scope="module")
def official_file(official_state, tmp_path_factory):
    path = tmp_path_factory.mktemp("official") / "espmedsam.pth"
    torch.save(official_state, path)
    return path


@pytest.fixture(scope="module")
def default_model():
    """One six-modality model shared by the tests that import into it (each snapshots it first)."""
    torch.manual_seed(4)
    return build_model("default")


@pytest.fixture(scope="module")
def official(official_file):
    return import_official(official_file)


def _save(state, tmp_path, name="ckpt.pth"):
    path = tmp_path / name
    torch.save(state, path)
    return path


# --- official layout ---------------------------------------------------------------------------------


def test_official_key_map():
    assert official_key("SemiTViT.neck.0.weight") == "image_encoder.neck.0.weight"
    assert (
        official_key("SemiTViT.layers.2.blocks.1.attn.deep_QKV_embeddings_med")
        == "image_encoder.layers.2.blocks.1.controllers.0.prompt_tokens"
    )
    assert official_key("mask_decoder.output_hypernetworks_mlps.0.layers.2.bias") == (
        "decoder.output_hypernetworks_mlps.0.layers.2.bias"
    )
    assert official_key("SemiTViT.head.weight") is None
    assert official_key("prompt_encoder.no_mask_embed.weight") is None
    assert official_key("mask_decoder.iou_token.weight") == "mask_decoder.iou_token.weight"  # -> unexpected


def test_official_loads_into_the_official_layout(official, official_state):
    assert official.config.name == "official"
    assert sum(p.numel() for p in official.parameters()) == 12_461_727
    buffers = ("running_mean", "running_var", "num_batches_tracked", "gaussian_matrix")
    assert sum(v.numel() for k, v in official_state.items() if not k.endswith(buffers)) == 12_789_587
    block = official.image_encoder.layers[2].blocks[3]
    prefix = "SemiTViT.layers.2.blocks.3."
    assert torch.equal(block.controllers[0].adapter.fc1.weight, official_state[prefix + "med_dah.fc1.weight"])
    assert torch.equal(
        block.controllers[0].prompt_tokens, official_state[prefix + "attn.deep_QKV_embeddings_med"]
    )
    assert torch.equal(block.controllers[0].prompt_bias, official_state[prefix + "attn.med_attention_biases"])
    assert torch.equal(block.attn.qkv.weight, official_state[prefix + "attn.qkv.weight"])
    assert torch.equal(official.sppg.patch_decoder[0].weight, official_state["patch_decoder.0.weight"])
    assert torch.equal(official.sppg.dense_prompter[1].bias, official_state["dense_prompter.1.bias"])
    assert torch.equal(official.decoder.mask_query.weight, official_state["mask_query.weight"])
    pe = official.decoder.pe_layer.positional_encoding_gaussian_matrix
    assert torch.equal(pe, official_state["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"])
    hyper = official.decoder.output_hypernetworks_mlps[0].layers[2].weight
    assert torch.equal(hyper, official_state["mask_decoder.output_hypernetworks_mlps.0.layers.2.weight"])


@pytest.mark.slow
def test_official_forward_for_every_modality(official):
    images = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    masks = []
    with torch.no_grad():
        for modality in range(6):
            out = official(images, modality)
            assert out.masks.shape == (1, 1, 256, 256)
            assert out.patch_logits.shape == (1, 1, 8, 8)
            assert out.embeddings.shape == (1, 256, 16, 16)
            assert torch.isfinite(out.masks).all()
            masks.append(out.masks)
    assert not torch.equal(masks[0], masks[1])  # each modality decodes its own query


def test_loading_after_eval_equals_loading_before(official):
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    state = official.state_dict()
    before = build_model("official").train()
    before.load_state_dict(state)
    before.eval()
    after = build_model("official")
    with torch.no_grad():
        after(images, 0)  # a forward in eval mode first, so any cache would be filled with the fresh weights
        after.load_state_dict(state)
        expected = official(images, 0).masks
        assert torch.equal(before(images, 0).masks, expected)
        assert torch.equal(after(images, 0).masks, expected)


def test_official_errors_list_every_problem(official_state, tmp_path):
    state = dict(official_state)
    state["SemiTViT.layers.1.blocks.0.med_dah.fc1.weight"] = torch.zeros(3, 3)
    del state["mask_query.weight"]
    del state["SemiTViT.head.bias"]
    state["mask_decoder.iou_token.weight"] = torch.zeros(1, 256)
    state["SemiTViT.norm_head.weight"] = torch.zeros(5)
    path = _save(state, tmp_path, "broken.pth")
    with pytest.raises(CheckpointError) as info:
        import_official(path)
    message = str(info.value)
    assert "broken.pth" in message and "\n" not in message
    assert "image_encoder.layers.1.blocks.0.controllers.0.adapter.fc1.weight [3, 3]" in message
    assert "missing: decoder.mask_query.weight" in message
    assert "unexpected: mask_decoder.iou_token.weight" in message
    assert "missing unused key SemiTViT.head.bias" in message
    assert "SemiTViT.norm_head.weight is [5], expected [320]" in message


def test_official_missing_unused_key_alone_errors(official_state, tmp_path):
    state = {k: v for k, v in official_state.items() if k != "prompt_encoder.no_mask_embed.weight"}
    with pytest.raises(CheckpointError, match="missing unused key prompt_encoder.no_mask_embed.weight"):
        import_official(_save(state, tmp_path))


def test_official_rejects_other_checkpoints(tmp_path):
    path = _save({"image_encoder.neck.0.weight": torch.zeros(1)}, tmp_path, "mobile.pt")
    with pytest.raises(CheckpointError, match="mobile.pt has no SemiTViT"):
        import_official(path)


# --- official weights into one modality's slot -------------------------------------------------------------


def _is_slot_key(key: str, slot: int) -> bool:
    return f".controllers.{slot}." in key or f"output_hypernetworks_mlps.{slot}." in key


def test_modality_into_fresh_default_model(official, official_file, caplog):
    with caplog.at_level(logging.WARNING, logger="espmedsam.checkpoints.importers"):
        model = import_official(official_file, modality="ultrasound")
    assert not caplog.records
    assert model.config.name == "default"
    source, state = official.state_dict(), model.state_dict()
    for key, value in source.items():
        if ".controllers.0." in key:
            assert torch.equal(state[key.replace(".controllers.0.", ".controllers.2.")], value), key
        elif "output_hypernetworks_mlps.0." in key:
            assert torch.equal(state[key.replace("mlps.0.", "mlps.2.")], value), key
        elif key != "decoder.mask_query.weight":
            assert torch.equal(state[key], value), key  # shared weights
    assert torch.equal(model.decoder.mask_query.weight[2], official.decoder.mask_query.weight[2])
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64), "ultrasound").masks.shape == (1, 1, 64, 64)


def test_modality_into_existing_model_writes_only_its_slot(official, official_file, default_model, caplog):
    model = default_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="espmedsam.checkpoints.importers"):
        result = import_official(official_file, modality=4, into=model)
    assert result is model
    assert any("differ" in r.getMessage() and "microscopy" in r.getMessage() for r in caplog.records)
    source, state = official.state_dict(), model.state_dict()
    for key, value in state.items():
        if _is_slot_key(key, 4):
            official_name = key.replace(".controllers.4.", ".controllers.0.").replace("mlps.4.", "mlps.0.")
            assert torch.equal(value, source[official_name]), key
        elif key == "decoder.mask_query.weight":
            assert torch.equal(value[4], source[key][4])
            rows = [0, 1, 2, 3, 5]
            assert torch.equal(value[rows], before[key][rows])
        else:
            assert torch.equal(value, before[key]), key  # other slots and shared weights untouched


def test_modality_argument_errors(official, official_file):
    two_modalities = dataclasses.replace(get_config("tiny"), modalities=("dermoscopy", "fundus"))
    with pytest.raises(InputError, match="needs modality"):
        import_official(official_file, into=official)
    with pytest.raises(InputError, match="unknown modality"):
        import_official(official_file, modality="mri")
    with pytest.raises(InputError, match="per-modality model"):
        import_official(official_file, modality=0, into=official)
    with pytest.raises(InputError, match="not one of the model's"):
        import_official(official_file, modality="xray", into=build_model(two_modalities))


def test_modality_into_mismatched_model_errors_and_leaves_it(official_file):
    model = build_model("tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="mis-shaped"):
        import_official(official_file, modality=1, into=model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# --- MobileSAM --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mobilesam_state():
    rows = _manifest(MOBILESAM_TSV)
    rows += [
        row for row in _manifest(SAM_TSV) if row[0].startswith(SAM_DECODER + ("mask_decoder.iou_token",))
    ]
    return _random_state(rows, seed=1)


def test_mobilesam_loads_encoder_and_decoder_parts(mobilesam_state, default_model, tmp_path):
    model = default_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = import_mobilesam(_save(mobilesam_state, tmp_path, "mobile_sam.pt"), into=model)
    assert result is model
    state = model.state_dict()
    for key, value in state.items():
        if key.startswith("image_encoder.") and ".controllers." not in key:
            assert torch.equal(value, mobilesam_state[key]), key
        elif key.startswith(("decoder.transformer.", "decoder.output_upscaling.")):
            assert torch.equal(value, mobilesam_state["mask_" + key]), key
        elif key == "decoder.pe_layer.positional_encoding_gaussian_matrix":
            assert torch.equal(value, mobilesam_state["prompt_encoder.pe_layer." + key.split(".")[-1]])
        else:  # controllers, SPPG, queries, hypernetworks keep their initialisation
            assert torch.equal(value, before[key]), key


def test_mobilesam_skips_mis_shaped_decoder_parts(mobilesam_state, default_model, tmp_path, caplog):
    state = dict(mobilesam_state)
    state["mask_decoder.output_upscaling.0.weight"] = torch.zeros(2, 2)
    model = default_model
    fresh = model.decoder.output_upscaling[0].weight.clone()
    with caplog.at_level(logging.INFO, logger="espmedsam.checkpoints.importers"):
        import_mobilesam(_save(state, tmp_path), into=model)
    assert torch.equal(model.decoder.output_upscaling[0].weight, fresh)
    assert "mask_decoder.output_upscaling.0.weight" in caplog.text


def test_mobilesam_missing_encoder_key_errors(mobilesam_state, default_model, tmp_path):
    state = {k: v for k, v in mobilesam_state.items() if k != "image_encoder.layers.2.blocks.4.mlp.fc2.bias"}
    state["image_encoder.neck.1.weight"] = torch.zeros(3)
    before = {k: v.clone() for k, v in default_model.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        import_mobilesam(_save(state, tmp_path, "mobile_sam.pt"), into=default_model)
    assert all(torch.equal(v, before[k]) for k, v in default_model.state_dict().items())
    message = str(info.value)
    assert "mobile_sam.pt" in message
    assert "missing: image_encoder.layers.2.blocks.4.mlp.fc2.bias" in message
    assert "image_encoder.neck.1.weight [3]" in message


def test_mobilesam_rejects_files_without_an_encoder(tmp_path):
    with pytest.raises(CheckpointError, match="no image_encoder"):
        import_mobilesam(_save({"SemiTViT.neck.0.weight": torch.zeros(1)}, tmp_path))
