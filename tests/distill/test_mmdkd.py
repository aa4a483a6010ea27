from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from espmedsam import build_model, load_model
from espmedsam.checkpoints.native import save_model
from espmedsam.checkpoints.sam import save_sam_encoder
from espmedsam.cli import app
from espmedsam.config import DistillConfig, EncoderConfig, load_distill_config
from espmedsam.distill.cache import CacheKey, EmbeddingCache, fill
from espmedsam.distill.images import InputStore, dihedral, hold_out, list_images
from espmedsam.distill.mmdkd import distill, embedding_mse, teacher_input
from espmedsam.distill.teacher import TinyViTTeacher, fingerprint, load_teacher
from espmedsam.errors import CheckpointError, ConfigError, InputError
from espmedsam.models.sam_vit import SamViTConfig, SamViTEncoder
from espmedsam.models.tinyvit import TinyViT


class CountingTeacher(nn.Module):
    """A tiny SAM ViT that counts the images it embeds."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.encoder = SamViTEncoder(SamViTConfig.tiny()).eval()
        self.config = self.encoder.config
        self.calls = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += images.shape[0]
        return self.encoder(images)


def _write_images(folder: Path, count: int, seed: int = 0) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        size = (48 + 4 * i, 64)
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


@pytest.fixture
def images(tmp_path):
    return _write_images(tmp_path / "images", 6)


def _config(tmp_path: Path, **changes) -> DistillConfig:
    base = DistillConfig(
        image_size=64, epochs=2, batch_size=2, lr=1e-3, held_out=0.2, cache_dir=str(tmp_path / "cache"),
        out_dir=str(tmp_path / "run"), teacher_batch_size=3,
    )  # fmt: skip
    return dataclasses.replace(base, **changes)


def _student() -> nn.Module:
    torch.manual_seed(0)
    return build_model("tiny")


def test_teacher_embeds_each_image_once_across_epochs_and_runs(tmp_path, images):
    teacher = CountingTeacher()
    found = list_images(images)
    result = distill(_student(), teacher, found, _config(tmp_path), stage="common")
    assert teacher.calls == result.teacher_images == len(found)  # 2 epochs + 3 held-out evaluations
    again = distill(_student(), teacher, found, _config(tmp_path), stage="common")
    assert again.teacher_images == 0 and teacher.calls == len(found)


def test_each_variant_is_embedded_once(tmp_path, images):
    teacher = CountingTeacher()
    found = list_images(images)
    distill(_student(), teacher, found, _config(tmp_path, variants=3, epochs=3), stage="common")
    train, held = hold_out(found, 0.2, 0)
    assert teacher.calls == 3 * len(train) + len(held)


def test_recomputing_the_teacher_instead_of_caching(tmp_path, images):
    teacher = CountingTeacher()
    found = list_images(images)
    result = distill(_student(), teacher, found, _config(tmp_path, use_cache=False), stage="common")
    train, held = hold_out(found, 0.2, 0)
    assert teacher.calls == 2 * len(train) + 3 * len(held)
    assert not (tmp_path / "cache").exists() and len(result.epoch_seconds) == 2


def test_modality_stage_leaves_all_but_its_controller_bitwise_unchanged(tmp_path, images):
    student = _student()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    found = list_images(images, "fundus")
    distill(student, CountingTeacher(), found, _config(tmp_path, lr=1e-2), stage="modality")
    after = load_model(tmp_path / "run" / "student.safetensors").state_dict()
    slot = student.modalities.index("fundus")
    own = [k for k in before if f".controllers.{slot}." in k]
    assert own and any(not torch.equal(before[k], after[k]) for k in own)
    others = [k for k in before if k not in own]
    assert all(torch.equal(before[k], after[k]) for k in others)  # shared weights, BN stats, controllers


def test_common_stage_trains_the_shared_encoder_only(tmp_path, images):
    student = _student()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    distill(student, CountingTeacher(), list_images(images), _config(tmp_path), stage="common")
    after = student.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("image_encoder.") and ".controllers." not in k for k in changed)


def test_held_out_mse_falls_with_a_tiny_teacher(tmp_path):
    images = _write_images(tmp_path / "many", 10, seed=3)
    config = _config(tmp_path, epochs=12, lr=3e-3, lr_decay=0.95, held_out=0.2)
    result = distill(_student(), CountingTeacher(), list_images(images), config, stage="common")
    first, last = result.records[0], result.records[-1]
    assert last["held_out_mse"] < 0.5 * first["held_out_mse"]
    assert last["held_out_cosine"] > first["held_out_cosine"]
    lines = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == list(range(13))
    assert (tmp_path / "run" / "curves.png").is_file()


def test_cache_build_resumes_after_an_interruption(tmp_path):
    cache = EmbeddingCache(tmp_path, "teacher")
    jobs = [(CacheKey(f"{i:064x}", 64, 0), lambda i=i: torch.full((3, 8, 8), float(i))) for i in range(7)]
    calls = []

    def embed(x):
        calls.append(len(x))
        return x[:, :, :4, :4] * 2

    def interrupt(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fill(cache, jobs, embed, batch_size=3, progress=interrupt)
    assert len(cache.missing([key for key, _ in jobs])) == 4
    assert fill(cache, jobs, embed, batch_size=3) == 4 and calls == [3, 3, 1]
    assert not cache.missing([key for key, _ in jobs]) and not list(tmp_path.rglob("*.tmp"))
    stored = cache.get(jobs[5][0])
    assert stored.dtype == torch.float32 and torch.equal(stored, torch.full((3, 4, 4), 10.0))


def test_wrong_architecture_teachers_are_rejected(tmp_path):
    mobilesam = tmp_path / "mobile_sam.pt"
    torch.save({"image_encoder.patch_embed.seq.0.c.weight": torch.zeros(32, 3, 3, 3)}, mobilesam)
    with pytest.raises(CheckpointError, match="is not a teacher .* 297 missing"):
        load_teacher(mobilesam)  # a TinyViT stem alone
    native = save_model(build_model("tiny"), tmp_path / "student.safetensors")
    with pytest.raises(CheckpointError, match="is not a teacher"):
        load_teacher(native)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_teacher(tmp_path / "missing.pth")
    with pytest.raises(InputError, match="does not match the student"):
        embedding_mse(torch.zeros(1, 32, 4, 4), torch.zeros(1, 256, 4, 4))


def _tinyvit_checkpoint(path: Path, stem: str) -> Path:
    """A MobileSAM-like (strided stem) or LiteMedSAM-like (pointwise stem) file of image_encoder.* weights."""
    torch.manual_seed(2)
    encoder = TinyViT(EncoderConfig(stem=stem), num_controllers=0)
    torch.save({f"image_encoder.{k}": v for k, v in encoder.state_dict().items()}, path)
    return path


@pytest.mark.parametrize(("stem", "grid"), [("strided", 4), ("pointwise", 16)])
def test_tinyvit_teachers_load_by_their_stem(tmp_path, stem, grid):
    teacher = load_teacher(_tinyvit_checkpoint(tmp_path / "tinyvit.pth", stem))
    assert isinstance(teacher, TinyViTTeacher) and teacher.config.stem == stem
    assert not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        assert teacher(torch.rand(1, 3, 64, 64)).shape == (1, 256, grid, grid)


def test_distill_from_a_litemedsam_teacher_into_both_student_grids(tmp_path, images):
    teacher = load_teacher(_tinyvit_checkpoint(tmp_path / "lite_medsam.pth", "pointwise"))
    config = _config(tmp_path, epochs=1, teacher_input="medsam")
    for name in ("litemedsam", "default"):  # the same grid, and a 4x coarser one (averaged teacher grid)
        student = build_model(name)
        before = {k: v.clone() for k, v in student.state_dict().items()}
        result = distill(student, teacher, list_images(images), config, stage="common")
        # students that pad differently get their own cache entries
        assert result.teacher_images == len(list_images(images)) and len(result.records) == 2
        changed = [k for k in before if not torch.equal(before[k], student.state_dict()[k])]
        assert changed and all(k.startswith("image_encoder.") for k in changed)


def test_imported_teacher_round_trip_keeps_its_fingerprint(tmp_path):
    teacher = SamViTEncoder(SamViTConfig.tiny())
    loaded = load_teacher(save_sam_encoder(teacher, tmp_path / "teacher.safetensors"))
    assert fingerprint(loaded) == fingerprint(teacher)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_dihedral_variants_are_distinct_and_zero_is_identity():
    x = torch.arange(16.0).view(1, 4, 4)
    variants = [dihedral(x, v) for v in range(8)]
    assert torch.equal(variants[0], x) and torch.equal(variants[1], x.flip(-1))
    assert len({tuple(v.flatten().tolist()) for v in variants}) == 8
    with pytest.raises(InputError):
        dihedral(x, 8)


def test_kept_inputs_equal_fresh_ones_and_respect_the_memory_cap(images):
    found = list_images(images)
    model = build_model("tiny")
    one_input = 3 * 64 * 64 * 4
    kept, fresh = InputStore(model.preprocess, 64, 2 * one_input), InputStore(model.preprocess, 64, 0)
    for variant in (0, 5):
        assert torch.equal(kept.batch(found, [variant] * 6), fresh.batch(found, [variant] * 6))
    assert len(kept._kept) == 2 and not fresh._kept


def test_dataset_folders_use_their_train_split(tmp_path):
    _write_images(tmp_path / "ds" / "images", 4)
    (tmp_path / "ds" / "split.json").write_text(json.dumps({"train": ["img0", "img2"], "test": ["img1"]}))
    found = list_images(tmp_path / "ds", "xray")
    assert [p.path.stem for p in found] == ["img0", "img2"] and {p.modality for p in found} == {"xray"}


def test_shipped_recipes_have_both_stages():
    for name in ("mmdkd_cpu_256", "mmdkd_paper_1024"):
        common, modality = (load_distill_config(name, stage) for stage in ("common", "modality"))
        assert common.image_size == modality.image_size
    assert load_distill_config("mmdkd_paper_1024", "modality").epochs == 200
    with pytest.raises(ConfigError, match="stage"):
        load_distill_config("mmdkd_cpu_256", "decoder")
    with pytest.raises(ConfigError, match="variants"):
        load_distill_config(None, "common", ["variants=9"])


def test_cli_distils_both_stages(tmp_path, images):
    torch.manual_seed(1)
    teacher = save_sam_encoder(SamViTEncoder(SamViTConfig.tiny()), tmp_path / "teacher.safetensors")
    common = ["--set", "image_size=64", "--set", "epochs=1", "--set", f"cache_dir={tmp_path / 'cache'}"]
    args = ["distill", "common", "-t", str(teacher), "-i", str(images), "--model", "tiny", *common]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "common")])
    assert result.exit_code == 0, result.output
    assert "held-out MSE" in result.output
    student = tmp_path / "common" / "student.safetensors"
    data = f"{images}:ultrasound"
    args = ["distill", "modality", "-t", str(teacher), "-d", data, "--student", str(student)]
    result = CliRunner().invoke(app, [*args, *common, "--out", str(tmp_path / "modality")])
    assert result.exit_code == 0, result.output
    assert load_model(tmp_path / "modality" / "student.safetensors").config.name == "tiny"


def test_teacher_gets_sam_or_medsam_normalisation_from_any_student():
    from espmedsam.config import IMAGENET_MEAN, IMAGENET_STD
    from espmedsam.models.registry import official_config

    official = build_model(dataclasses.replace(official_config(), image_size=64))  # x / mean - 1
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    x, _ = official.preprocess(image, 64)
    raw = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    sam = (raw - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(teacher_input(x, official, "sam"), sam, atol=1e-4)
    medsam = teacher_input(x, official, "medsam")
    assert torch.allclose(medsam, (raw - raw.min()) / (raw.max() - raw.min()), atol=1e-5)
    default = build_model("tiny")
    x, _ = default.preprocess(image, 64)
    assert teacher_input(x, default, "sam") is x
    lite = build_model("litemedsam")  # per-image min-max input: already MedSAM's, SAM's up to scale
    x, _ = lite.preprocess(image, 64)
    assert torch.allclose(teacher_input(x, lite, "medsam"), x, atol=1e-6)
    scaled = (raw - raw.min()) * 255 / (raw.max() - raw.min())
    expected = (scaled - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        1, 3, 1, 1
    )
    assert torch.allclose(teacher_input(x, lite, "sam"), expected, atol=1e-3)


def test_cached_targets_are_the_teachers_embeddings_of_that_image_and_variant(tmp_path, images):
    from espmedsam.distill.cache import CacheKey
    from espmedsam.distill.images import InputStore
    from espmedsam.distill.mmdkd import cache_folder_name

    teacher, student = CountingTeacher(), _student()
    config = _config(tmp_path, variants=4, epochs=1, held_out=0.0)
    distill(student, teacher, list_images(images), config, stage="common")
    cache = EmbeddingCache(tmp_path / "cache", cache_folder_name(teacher, student, config))
    store = InputStore(student.preprocess, 64)
    for image in list_images(images)[:3]:
        for variant in range(4):
            expected = teacher.encoder(store.get(image, variant)[None])[0]
            stored = cache.get(CacheKey(image.digest, 64, variant))
            assert torch.allclose(stored, expected, atol=2e-3, rtol=2e-3)


def test_two_modalities_train_only_their_own_controllers(tmp_path, images):
    student = _student()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    found = list_images(images, "fundus")[:3] + list_images(images, "xray")[3:]
    distill(student, CountingTeacher(), found, _config(tmp_path, weight_decay=0.1), stage="modality")
    after = student.state_dict()
    slots = [student.modalities.index(m) for m in ("fundus", "xray")]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert all(any(f".controllers.{k}." in name for name in changed) for k in slots)
    assert all(any(f".controllers.{k}." in name for k in slots) for name in changed)


def test_repeated_images_are_embedded_once_and_bad_inputs_fail_early(tmp_path, images):
    teacher = CountingTeacher()
    found = list_images(images)
    distill(_student(), teacher, found + found, _config(tmp_path), stage="common")
    assert teacher.calls == len(found)
    with pytest.raises(InputError, match="no images"):
        distill(_student(), teacher, [], _config(tmp_path), stage="common")
    wide = build_model(dataclasses.replace(build_model("tiny").config, encoder=dataclasses.replace(
        build_model("tiny").config.encoder, out_chans=48)))  # fmt: skip
    with pytest.raises(InputError, match="channels"):
        distill(wide, teacher, found, _config(tmp_path, cache_dir=str(tmp_path / "other")), stage="common")
    assert teacher.calls == len(found)  # refused before any teacher work
