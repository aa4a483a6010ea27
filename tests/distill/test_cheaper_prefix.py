"""The cheaper encoder prefix: same grid, the teacher's weights, only the prefix learns."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from espmedsam.config import ModelConfig
from espmedsam.distill.prefix import (
    PrefixSample,
    cheaper_prefix_config,
    distill_prefix,
    prefix_parameters,
    student_from,
)
from espmedsam.errors import InputError
from espmedsam.models.registry import build_model, tiny_config


def pointwise_tiny() -> ModelConfig:
    config = tiny_config()
    return dataclasses.replace(config, encoder=dataclasses.replace(config.encoder, stem="pointwise"))


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return build_model(pointwise_tiny())


def test_the_cheaper_prefix_keeps_the_output_grid():
    config = pointwise_tiny()
    cheaper = cheaper_prefix_config(config)
    assert cheaper.encoder.stem == "patch2" and cheaper.encoder.merge_strides[0] == 1
    assert cheaper.encoder.output_stride == config.encoder.output_stride == 4


def test_only_a_pointwise_stem_before_a_stride_two_stage_is_replaced():
    with pytest.raises(InputError, match="pointwise stem"):
        cheaper_prefix_config(tiny_config())  # MobileSAM's strided stem


@pytest.mark.parametrize("side", [64, 72, 40])
def test_the_student_gives_the_teachers_shapes_at_odd_sizes_and_mixed_modalities(teacher, side):
    student = student_from(teacher)
    images = torch.randn(2, 3, side, side)
    with torch.no_grad():
        ours, theirs = student(images, ["xray", "fundus"]), teacher(images, ["xray", "fundus"])
    assert ours.embeddings.shape == theirs.embeddings.shape
    assert ours.masks.shape == theirs.masks.shape == (2, 1, side, side)


def test_the_student_starts_from_the_teacher_on_2x2_means(teacher):
    student = student_from(teacher)
    rest = {k: v for k, v in student.state_dict().items() if not k.endswith("patch_embed.seq.0.c.weight")}
    theirs = teacher.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in rest.items())
    # on an image constant over each 2x2 patch, the stems agree position for position
    coarse = torch.randn(1, 3, 32, 32).repeat_interleave(2, -1).repeat_interleave(2, -2)
    with torch.no_grad():
        ours = student.image_encoder.patch_embed(coarse)
        full = teacher.image_encoder.patch_embed(coarse)
    torch.testing.assert_close(ours, full[..., ::2, ::2], rtol=1e-4, atol=1e-5)


def test_distillation_moves_only_the_prefix_and_lowers_the_error(teacher):
    torch.manual_seed(1)
    student = student_from(teacher)
    stem = student.image_encoder.patch_embed.seq[0].c.weight
    with torch.no_grad():  # a stem away from the teacher's, so there is something to learn
        stem.add_(0.1 * torch.randn_like(stem))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    train = [PrefixSample(torch.randn(3, 64, 64), m) for m in (0, 1, 3, 3)]
    history = distill_prefix(
        student,
        teacher,
        train,
        train[:2],
        steps=20,
        batch_size=2,
        crop=48,
        lr=3e-3,
        eval_every=10,
        bf16=False,
    )
    assert len(history.losses) == 20 and [row[0] for row in history.held_out] == [0, 10, 20]
    assert min(row[2] for row in history.held_out) < history.held_out[0][2]  # the embedding error fell
    prefix = {id(p) for p in prefix_parameters(student)}
    named = dict(student.named_parameters())
    moved = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    assert moved and all(id(named[k]) in prefix for k in moved if k in named)
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())


def test_the_mask_divergence_is_zero_only_where_the_masks_agree():
    from espmedsam.losses import mask_divergence

    logits = torch.randn(2, 1, 16, 16) * 4
    assert abs(float(mask_divergence(logits, logits))) < 1e-6
    assert float(mask_divergence(-logits, logits)) > 0.5
    assert float(mask_divergence(logits + 0.5, logits)) > 0


def test_with_a_mask_weight_the_student_learns_the_teachers_masks(teacher):
    torch.manual_seed(2)
    student = student_from(teacher)
    stem = student.image_encoder.patch_embed.seq[0].c.weight
    with torch.no_grad():
        stem.add_(0.2 * torch.randn_like(stem))
    train = [PrefixSample(torch.randn(3, 64, 64), m) for m in (0, 1, 3, 3)]
    history = distill_prefix(
        student, teacher, train, train[:2], steps=20, batch_size=2, crop=48, lr=3e-3,
        mask_weight=10.0, eval_every=10, bf16=False,
    )  # fmt: skip
    masks = [row[3] for row in history.held_out]
    assert masks[0] > 0 and min(masks) < masks[0]
    assert history.best == min(history.held_out, key=lambda row: row[2] + 10.0 * row[3])


def test_a_step_without_the_mask_term_skips_the_decoders(teacher):
    from espmedsam.distill.prefix import prefix_errors

    student, images, modality = student_from(teacher), torch.randn(2, 3, 48, 48), torch.tensor([0, 3])
    with torch.no_grad():
        with_masks = prefix_errors(student, teacher, images, modality)
        without = prefix_errors(student, teacher, images, modality, masks=False)
    assert float(without[2]) == 0.0 and float(with_masks[2]) > 0
    torch.testing.assert_close(without[:2], with_masks[:2])


def test_the_prefix_file_holds_the_whole_difference_and_refuses_other_models(teacher, tmp_path):
    from espmedsam.checkpoints.native import save_model
    from espmedsam.distill.prefix import is_prefix_file, load_prefix, save_prefix

    trained = student_from(teacher)
    with torch.no_grad():
        for param in prefix_parameters(trained):
            param.add_(torch.randn_like(param))
    path = save_prefix(trained, tmp_path / "p.safetensors")
    assert is_prefix_file(path) and path.stat().st_size < 100_000
    rebuilt = load_prefix(student_from(teacher), path)
    theirs = trained.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in rebuilt.state_dict().items())
    whole = save_model(teacher, tmp_path / "whole.safetensors")
    assert not is_prefix_file(whole) and not is_prefix_file(tmp_path / "missing")
    with pytest.raises(InputError, match="not a cheaper prefix"):
        load_prefix(student_from(teacher), whole)
    other = build_model(
        dataclasses.replace(
            pointwise_tiny(),
            encoder=dataclasses.replace(pointwise_tiny().encoder, embed_dims=(16, 16, 16, 32)),
        )
    )
    with pytest.raises(InputError, match="not a cheaper prefix"):
        load_prefix(student_from(other), path)


def test_no_training_or_no_held_out_images_is_an_error(teacher):
    sample = PrefixSample(torch.randn(3, 64, 64), 0)
    for train, held_out in (([], [sample]), ([sample], [])):
        with pytest.raises(InputError, match="training and held-out"):
            distill_prefix(student_from(teacher), teacher, train, held_out, steps=1)
