"""Frozen-encoder training on cached embeddings."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from espmedsam.checkpoints.native import load_model
from espmedsam.data.dataset import SegmentationFolder, parse_dataset_arg
from espmedsam.distill.cache import CacheKey
from espmedsam.errors import ConfigError
from espmedsam.models.espmedsam import ESPMedSAM
from espmedsam.models.registry import build_model
from espmedsam.train import train
from espmedsam.train.frozen import CachedEmbeddingSet, EncoderCache, build_cache, variant_input
from espmedsam.train.validate import collate_by_size


def _frozen(tiny_config, tmp_path, **changes):
    return dataclasses.replace(
        tiny_config,
        frozen_encoder=True,
        variants=2,
        input_sizes=(64, 64, 64, 32, 64, 64),  # fundus at 32: batches mix two input sizes
        cache_dir=str(tmp_path / "cache"),
        bf16=False,
        num_workers=0,
        **changes,
    )


def _count_encoder_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = ESPMedSAM.encode

    def counting(self, images, modality=None):
        calls.append(images.shape[0])
        return original(self, images, modality)

    monkeypatch.setattr(ESPMedSAM, "encode", counting)
    return calls


def test_frozen_training_changes_only_sppg_and_decoder(tiny_config, tmp_path, monkeypatch):
    calls = _count_encoder_calls(monkeypatch)
    start = build_model("tiny")
    config = _frozen(tiny_config, tmp_path)
    result = train(config)
    # 2 x 4 training images x 2 variants + 2 x 2 validation images, each embedded once
    assert sum(calls) == 2 * 4 * 2 + 2 * 2
    trained = load_model(result.last_path)
    assert trained.config.inference_sizes == config.input_sizes
    before, after = start.state_dict(), trained.state_dict()
    encoder = [k for k in before if k.startswith("image_encoder.")]
    assert all(torch.equal(before[k], after[k]) for k in encoder)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(("sppg.", "decoder.")))
    assert len(list((tmp_path / "cache").rglob("*.npz"))) == 2 * 4 * 2 + 2 * 2
    assert 0.0 <= result.best_dice <= 1.0

    calls.clear()  # a second run reads every embedding from the cache
    train(dataclasses.replace(config, out_dir=str(tmp_path / "again")))
    assert calls == []


def test_cached_entry_is_the_encoder_embedding_of_its_variant(tmp_path, datasets):
    model = build_model("tiny")
    folder = SegmentationFolder(parse_dataset_arg(datasets[0]), "train")
    dataset = CachedEmbeddingSet(EncoderCache(tmp_path, "fp"), [folder], [64], variants=2, seed=3)
    assert build_cache(model, dataset, seed=3, bf16=False, batch_size=3) == 8
    assert build_cache(model, dataset, seed=3, bf16=False) == 0
    for variant in (0, 1):
        image, mask, digest = dataset.sample(1)
        x, m, valid = variant_input(model, image, mask, 64, variant, 3, digest)
        entry = dataset.cache.get(CacheKey(digest, 64, variant))
        with torch.no_grad():
            expected = model.encode(x[None], None)[0]
        assert torch.allclose(entry["embedding"], expected, atol=2e-3)  # stored as float16
        assert torch.equal(entry["mask"], m) and tuple(entry["valid"].tolist()) == valid
    plain = variant_input(model, image, mask, 64, 0, 3, digest)[0]
    assert not torch.equal(plain, variant_input(model, image, mask, 64, 1, 3, digest)[0])


def test_variant_of_item_depends_on_epoch(tmp_path, datasets):
    folder = SegmentationFolder(parse_dataset_arg(datasets[0]), "train")
    dataset = CachedEmbeddingSet(EncoderCache(tmp_path, "fp"), [folder], [64], variants=3, seed=0)
    seen = set()
    for epoch in range(6):
        dataset.set_epoch(epoch)
        seen |= {dataset.variant_of(i) for i in range(len(dataset))}
    assert seen == {0, 1, 2}


def test_collate_by_size_groups_same_sizes_in_order():
    items = [{"image": torch.zeros(3, s, s), "mask": torch.zeros(1, s, s)} for s in (8, 16, 8)]
    groups = collate_by_size(items)
    assert [tuple(g["image"].shape) for g in groups] == [(2, 3, 8, 8), (1, 3, 16, 16)]


def test_input_sizes_need_one_size_per_modality(tiny_config, tmp_path):
    config = dataclasses.replace(_frozen(tiny_config, tmp_path), input_sizes=(64, 64))
    with pytest.raises(ConfigError, match="one size per model modality"):
        train(config)


def test_frozen_datasets_keep_no_decoded_images_once_embedded(tiny_config, tmp_path):
    from espmedsam.train.loop import build_datasets, build_network

    config = _frozen(tiny_config, tmp_path)
    train_set, val_set, _ = build_datasets(config, build_network(config))
    folders = [*train_set.folders, *val_set.folders]
    assert folders and all(not folder._cache for folder in folders)  # the embeddings are on disk
    assert train_set[0]["embedding"].ndim == 3
