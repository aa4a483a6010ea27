"""Structured pruning: hidden widths in the config, the surgeon's least-squares refit, a pruned model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from espmedsam.checkpoints.native import load_model, save_model
from espmedsam.config import EncoderConfig
from espmedsam.distill.prefix import PrefixSample, prefix_errors
from espmedsam.distill.prune import (
    HiddenGram,
    PruneWidths,
    calibration_batches,
    collect_grams,
    decoding_parameters,
    is_pruned_from,
    prunable_layers,
    pruned_model,
    pruned_parameters,
    surgeon_keep,
)
from espmedsam.errors import ConfigError, InputError
from espmedsam.models.registry import build_model, tiny_config


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return build_model(tiny_config()).eval()


@pytest.fixture(scope="module")
def grams(teacher):
    generator = torch.Generator().manual_seed(1)
    samples = [
        PrefixSample(torch.randn(3, side, side, generator=generator), modality)
        for side, modality in ((64, 0), (64, 1), (96, 2), (96, 3), (64, 4))
    ]
    return collect_grams(teacher, calibration_batches(samples, batch_size=2), bf16=False)


def test_hidden_widths_must_match_the_blocks():
    config = tiny_config().encoder
    blocks = sum(config.depths[1:])
    assert dataclasses.replace(config, mlp_hidden_dims=(8,) * blocks).mlp_hidden(1) == [8] * config.depths[1]
    with pytest.raises(ConfigError, match="mlp_hidden_dims needs"):
        dataclasses.replace(config, mlp_hidden_dims=(8,) * (blocks + 1))
    with pytest.raises(ConfigError, match="mbconv_hidden_dims needs"):
        dataclasses.replace(config, mbconv_hidden_dims=(0,) * config.depths[0])


def test_without_hidden_widths_the_ratios_give_them():
    config = EncoderConfig()
    assert config.mbconv_hidden() == [256, 256]
    assert config.mlp_hidden(2) == [640] * 6 and config.mlp_hidden(3) == [1280] * 2


def test_the_surgeon_drops_channels_that_others_repeat_at_no_cost():
    generator = torch.Generator().manual_seed(0)
    free = torch.randn(500, 6, generator=generator, dtype=torch.float64)
    # channels 6-9 are sums of the first six: the map's output needs only those
    hidden = torch.cat([free, free[:, :4] + free[:, 1:5]], dim=1)
    gram = HiddenGram(10)
    gram.add(hidden[None])
    weight = torch.randn(3, 11, generator=generator, dtype=torch.float64)
    kept, refit = surgeon_keep(weight, gram.matrix, keep=6)
    assert len(kept) == 6 and refit.shape == (3, 7)
    ones = torch.ones(500, 1, dtype=torch.float64)
    full = torch.cat([hidden, ones], dim=1) @ weight.T
    pruned = torch.cat([hidden[:, kept], ones], dim=1) @ refit.T
    assert torch.allclose(pruned, full, atol=0.05 * full.abs().max())


def test_every_image_counts_once_whatever_its_size():
    gram = HiddenGram(2)
    gram.add(torch.ones(1, 10, 2))
    gram.add(torch.zeros(1, 1000, 2))
    assert gram.images == 2
    assert gram.matrix[0, 0].item() == pytest.approx(0.5)
    assert gram.matrix[-1, -1].item() == pytest.approx(1.0)


def test_grams_are_collected_for_each_prunable_layer(teacher, grams):
    layers = prunable_layers(teacher)
    assert set(grams) == set(layers) and len(layers) == sum(teacher.config.encoder.depths)
    assert all(gram.images == 5 for gram in grams.values())
    assert not any(".controllers." in name for name in layers)


def test_keeping_every_channel_changes_nothing(teacher, grams):
    student = pruned_model(teacher, grams, PruneWidths())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(student.encode(images, [0, 1]), teacher.encode(images, [0, 1]))


def test_a_pruned_model_is_narrower_and_round_trips_through_a_checkpoint(teacher, grams, tmp_path):
    student = pruned_model(teacher, grams, PruneWidths(mbconv=0.5, mlp=(0.5, 0.5, 0.5)))
    encoder = student.config.encoder
    half = int(teacher.config.encoder.embed_dims[0] * 4 * 0.5)
    assert encoder.mbconv_hidden() == [half] * encoder.depths[0]
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())
    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        ours, theirs = student(images, ["xray", "fundus"]), teacher(images, ["xray", "fundus"])
    assert ours.masks.shape == theirs.masks.shape == (2, 1, 96, 96)
    reloaded = load_model(save_model(student, tmp_path / "pruned.safetensors"))
    assert reloaded.config == student.config
    with torch.no_grad():
        assert torch.equal(reloaded(images, ["xray", "fundus"]).masks, ours.masks)


def test_the_refit_beats_cutting_the_same_channels(teacher, grams):
    """The surgeon's weights reproduce the teacher's embedding better than the kept channels alone."""
    widths = PruneWidths(mbconv=0.5, mlp=(0.5, 0.5, 0.5))
    student = pruned_model(teacher, grams, widths)
    cut = build_model(student.config).eval()
    state = {k: v for k, v in student.state_dict().items()}
    for name, layer in prunable_layers(student).items():  # the kept channels with their old output weights
        kept = _kept_rows(teacher.state_dict(), student.state_dict(), name)
        old = teacher.state_dict()
        if f"{name}.fc2.weight" in state:
            state[f"{name}.fc2.weight"] = old[f"{name}.fc2.weight"][:, kept]
            state[f"{name}.fc2.bias"] = old[f"{name}.fc2.bias"]
        else:
            state[f"{name}.conv3.c.weight"] = old[f"{name}.conv3.c.weight"][:, kept]
            state[f"{name}.conv3.bn.running_mean"] = old[f"{name}.conv3.bn.running_mean"]
        del layer
    cut.load_state_dict(state)
    generator = torch.Generator().manual_seed(1)  # the calibration images themselves
    images = torch.randn(2, 3, 64, 64, generator=generator)
    with torch.no_grad():
        target = teacher.encode(images, [0, 1])
        refit_error = (student.encode(images, [0, 1]) - target).pow(2).mean()
        cut_error = (cut.encode(images, [0, 1]) - target).pow(2).mean()
    assert refit_error < cut_error


def _kept_rows(teacher_state: dict, student_state: dict, name: str) -> list[int]:
    """Indices of the teacher's hidden channels the student kept (matched by their input weights)."""
    key = f"{name}.fc1.weight" if f"{name}.fc1.weight" in student_state else f"{name}.conv1.c.weight"
    theirs, ours = teacher_state[key].flatten(1), student_state[key].flatten(1)
    return [int((theirs == row).all(1).nonzero()[0]) for row in ours]


def test_the_pruned_layers_are_what_distillation_trains(teacher):
    params = pruned_parameters(teacher)
    encoder_params = {id(p) for p in teacher.image_encoder.parameters()}
    assert params and all(id(p) in encoder_params for p in params)
    controller_params = {id(p) for name, p in teacher.named_parameters() if ".controllers." in name}
    assert not controller_params & {id(p) for p in params}


def test_the_decoding_side_is_the_controllers_refiner_sppg_and_qdmd(teacher):
    names = {id(p): name for name, p in teacher.named_parameters()}
    chosen = [names[id(p)] for p in decoding_parameters(teacher)]
    assert len(set(chosen)) == len(chosen)
    decoding = [name for name in names.values() if name.startswith(("refiner.", "sppg.", "decoder."))]
    controllers = [name for name in names.values() if ".controllers." in name]
    # the promptable and click decoders read the embedding too, but the prompt-free masks never use them
    assert controllers and sorted(chosen) == sorted(decoding + controllers)
    assert not {id(p) for p in pruned_parameters(teacher)} & {id(p) for p in decoding_parameters(teacher)}


def test_the_mask_divergence_reaches_the_decoding_side(teacher, grams):
    student = pruned_model(teacher, grams, PruneWidths(mbconv=0.5))
    student.requires_grad_(False)
    params = decoding_parameters(student)
    for param in params:
        param.requires_grad_(True)
    images, modality = torch.randn(2, 3, 64, 64), torch.tensor([0, 3])
    *_, masks = prefix_errors(student, teacher, images, modality)
    masks.backward()
    assert all(p.grad is not None for p in student.decoder.output_upscaling.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.sppg.parameters())
    controllers = [p for name, p in student.named_parameters() if ".controllers." in name]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in controllers)


def test_a_pruned_model_is_recognised_as_pruned_from_its_teacher(teacher, grams):
    student = pruned_model(teacher, grams, PruneWidths(mbconv=0.5, mlp=(0.5, 1.0, 1.0)))
    assert is_pruned_from(student, teacher) and is_pruned_from(teacher, teacher)
    other = dataclasses.replace(teacher.config.encoder, embed_dims=(16, 32, 48, 64))
    assert not is_pruned_from(build_model(dataclasses.replace(teacher.config, encoder=other)), teacher)


def test_a_kept_fraction_outside_zero_to_one_is_refused():
    with pytest.raises(InputError, match="kept fraction"):
        PruneWidths(mbconv=0.0)
