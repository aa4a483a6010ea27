"""Training with a teacher's masks as a second target (``teacher``, ``teacher_weight``, ``teacher_focus``)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from espmedsam.checkpoints.native import load_model, save_model
from espmedsam.errors import ConfigError
from espmedsam.losses import mask_divergence
from espmedsam.train import train
from espmedsam.train.loop import _Teaching, build_datasets, build_network, load_teacher
from espmedsam.train.validate import forward_group


@pytest.fixture
def teacher_file(tmp_path, prefix_config, start):
    """The start with its controllers grown and its whole network moved: another prefix, other masks."""
    teacher = build_network(prefix_config(start))
    torch.manual_seed(2)
    with torch.no_grad():
        for param in teacher.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return save_model(teacher.eval(), tmp_path / "teacher.safetensors")


@pytest.fixture
def taught_config(prefix_config, start, teacher_file):
    """``taught_config(**changes)``: the frozen-prefix recipe from ``start`` with ``teacher_file`` as the
    teacher."""

    def make(**changes):
        return prefix_config(start, teacher=str(teacher_file), **({"teacher_weight": 5.0} | changes))

    return make


def test_training_items_carry_the_teachers_own_prefix(taught_config):
    config = taught_config()
    model = build_network(config)
    teacher = load_teacher(config, model, torch.device("cpu"))
    train_set, val_set, _ = build_datasets(config, model, teacher)
    item = train_set[0]
    with torch.no_grad():
        expected = teacher.image_encoder.prefix(item["image"][None], 3)[0]
    # the model's and the teacher's prefixes differ, and each item holds the teacher's on the same input
    assert not torch.allclose(item["features"], item["teacher_features"], atol=1e-2)
    assert torch.allclose(item["teacher_features"], expected, atol=5e-3)  # stored as float16
    assert "teacher_features" not in val_set[0]


def test_the_teacher_term_is_zero_for_the_teacher_itself(taught_config):
    config = taught_config()
    model = build_network(config)
    teacher = load_teacher(config, model, torch.device("cpu"))
    train_set, _, _ = build_datasets(config, model, teacher)
    group = {k: v[None] for k, v in train_set[0].items()}
    teaching = _Teaching(teacher, 5.0)
    with torch.no_grad():
        own = forward_group(teacher, {**group, "features": group["teacher_features"]}).masks
        students = forward_group(model.eval(), group).masks
    assert float(teaching.divergence(group, own)) == pytest.approx(0.0, abs=1e-5)
    assert float(teaching.divergence(group, students)) == pytest.approx(
        float(mask_divergence(students, own)), rel=1e-5
    )
    assert float(teaching.divergence(group, students)) > 1e-4


def test_a_run_with_a_teacher_logs_and_learns_its_term(taught_config):
    config = taught_config(epochs=3, teacher_weight=50.0, lr=3e-3)
    result = train(config)
    records = [json.loads(line) for line in (result.out_dir / "log.jsonl").read_text().splitlines()]
    taught = [r["teacher_loss"] for r in records if r.get("kind") == "train"]
    assert taught and all(value > 0 for value in taught)
    assert taught[-1] < taught[0]  # the masks move toward the teacher's
    trained = load_model(result.last_path)
    assert trained.config.controller.enabled  # the student's own layout, not the teacher's file


def test_teacher_and_its_weight_come_together(tiny_config):
    with pytest.raises(ConfigError, match="come together"):
        dataclasses.replace(tiny_config, teacher="bundled")
    with pytest.raises(ConfigError, match="come together"):
        dataclasses.replace(tiny_config, teacher_weight=1.0)
    with pytest.raises(ConfigError, match="frozen_prefix"):
        dataclasses.replace(tiny_config, teacher="bundled", teacher_weight=1.0, frozen_encoder=True)


def test_focus_leaves_agreeing_batches_alone_and_weighs_the_image_that_parts_ways():
    torch.manual_seed(0)
    teacher = torch.randn(4, 1, 16, 16) * 3
    border = teacher + 0.3 * torch.randn_like(teacher)  # every image off by a little
    assert float(mask_divergence(border, teacher, focus=1.0)) == pytest.approx(
        float(mask_divergence(border, teacher)), rel=0.1
    )
    student = border.clone().requires_grad_(True)
    flipped = border.clone()
    flipped[0] = -teacher[0]  # image 0: the student finds what the teacher misses, and the reverse
    with torch.no_grad():
        student.copy_(flipped)
    plain = mask_divergence(student, teacher)
    focused = mask_divergence(student, teacher, focus=1.0)
    assert focused.item() > 1.5 * plain.item()
    (grad_plain,) = torch.autograd.grad(plain, student)
    (grad_focused,) = torch.autograd.grad(focused, student)
    assert _first_image_share(grad_focused) > _first_image_share(grad_plain) > 0.5


def _first_image_share(grad: torch.Tensor) -> float:
    return float(grad[0].abs().sum() / grad.abs().sum())


def test_teacher_focus_is_checked(tiny_config):
    with pytest.raises(ConfigError, match="needs teacher"):
        dataclasses.replace(tiny_config, teacher_focus=1.0)
    with pytest.raises(ConfigError, match="negative"):
        dataclasses.replace(tiny_config, teacher="bundled", teacher_weight=1.0, teacher_focus=-1.0)


def test_a_teacher_of_other_modalities_is_refused(taught_config):
    config = taught_config()
    model = build_network(config)
    model.config = dataclasses.replace(model.config, modalities=model.config.modalities[::-1])
    with pytest.raises(ConfigError, match="modalities"):
        load_teacher(config, model, torch.device("cpu"))
