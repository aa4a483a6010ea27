from __future__ import annotations

import csv
import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from espmedsam import Predictor, build_model
from espmedsam.checkpoints.native import save_model
from espmedsam.errors import InputError
from espmedsam.models.registry import get_config
from espmedsam.predict_files import PredictOptions, expand_inputs, predict_files

nib = pytest.importorskip("nibabel")


def _png(path: Path, shape=(30, 40, 3), seed=0) -> Path:
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)).save(path)
    return path


def _predictor(**options) -> Predictor:
    return Predictor(build_model("tiny"), size=64, **options)


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / "predictions.csv").open() as file:
        return list(csv.DictReader(file))


def test_a_bad_file_fails_alone_and_is_listed(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    good = [_png(folder / f"xray_{i}.png", seed=i) for i in range(3)]
    (folder / "xray_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out"
    results = list(predict_files(_predictor(batch_size=2), expand_inputs([folder]), out))
    failed = [r for r in results if not r.ok]
    assert len(results) == 4 and [r.source.name for r in failed] == ["xray_broken.png"]
    assert "xray_broken.png" in failed[0].error
    for path in good:
        assert (out / f"{path.stem}_mask.png").is_file() and (out / f"{path.stem}_overlay.png").is_file()
    rows = _rows(out)
    assert len(rows) == 4 and sum(bool(r["error"]) for r in rows) == 1
    assert {r["modality"] for r in rows if not r["error"]} == {"xray"}


def test_the_cli_summarises_failures_with_a_non_zero_exit(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    _png(folder / "xray_good.png")
    (folder / "xray_text.png").write_text("<html>not an image</html>")
    checkpoint = save_model(build_model("tiny"), tmp_path / "tiny.safetensors")
    out = tmp_path / "out"
    args = ["predict", str(folder), "-o", str(out), "-c", str(checkpoint), "--size", "64"]
    result = subprocess.run([sys.executable, "-m", "espmedsam", *args], capture_output=True, text=True)
    assert result.returncode == 3, result.stderr
    assert "1 of 2 inputs failed" in result.stderr and "xray_text.png" in result.stderr
    assert "Traceback" not in result.stderr
    assert (out / "xray_good_mask.png").is_file() and not (out / "xray_text_mask.png").exists()


def test_without_classifier_or_prefix_the_file_fails_with_advice(tmp_path):
    path = _png(tmp_path / "case.png")
    [result] = predict_files(_predictor(), [path], tmp_path / "out")
    assert not result.ok and "--modality" in result.error
    [result] = predict_files(_predictor(), [path], tmp_path / "out", PredictOptions(modality="fundus"))
    assert result.ok and result.modality == "fundus" and result.chosen_by == "option"


def test_unknown_modality_is_refused_up_front(tmp_path):
    with pytest.raises(InputError, match="unknown modality 'bone'"):
        list(
            predict_files(_predictor(), [_png(tmp_path / "a.png")], tmp_path, PredictOptions(modality="bone"))
        )


def test_the_classifier_chooses_when_nothing_else_says(tmp_path):
    config = get_config("tiny")
    config = dataclasses.replace(
        config, classifier=dataclasses.replace(config.classifier, enabled=True, input_size=32)
    )
    predictor = Predictor(build_model(config), size=64)
    [result] = predict_files(predictor, [_png(tmp_path / "case.png")], tmp_path / "out")
    assert result.ok and result.chosen_by == "classifier" and result.modality in config.modalities
    assert 0 < result.probability <= 1
    assert _rows(tmp_path / "out")[0]["probability"] == f"{result.probability:.4f}"


def test_a_nifti_volume_gives_a_nifti_mask_with_its_affine_and_a_montage(tmp_path):
    volume = np.random.default_rng(0).normal(100, 20, (24, 20, 6)).astype(np.float32)
    affine = np.diag([0.5, 0.7, 2.0, 1.0])
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(volume, affine), path)
    [result] = predict_files(_predictor(), [path], tmp_path / "out", PredictOptions(modality="xray"))
    assert result.ok and result.frames == 6
    written = nib.load(tmp_path / "out" / "scan_mask.nii.gz")
    assert written.shape == volume.shape and np.allclose(written.affine, affine)
    assert int(np.asarray(written.dataobj).sum()) == result.foreground_pixels
    assert result.foreground_mm2 == pytest.approx(result.foreground_pixels * 0.5 * 0.7)
    assert (tmp_path / "out" / "scan_montage.png").is_file()


def test_folders_list_images_volumes_and_dicom_series(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    del pydicom
    _png(tmp_path / "a.png")
    (tmp_path / "b.nii.gz").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    series = tmp_path / "series"
    series.mkdir()
    (series / "1.dcm").write_bytes(b"\0" * 128 + b"DICM")
    assert expand_inputs([tmp_path]) == [tmp_path / "a.png", tmp_path / "b.nii.gz", series]
    assert expand_inputs([series]) == [series]


def test_the_bundled_classifier_recognises_the_bundled_examples():
    from espmedsam.checkpoints.native import default_checkpoint, load_model
    from espmedsam.data.io import read_image
    from espmedsam.predict import EXAMPLES_DIR

    predictor = Predictor(load_model(default_checkpoint()), device="cpu")
    examples = sorted(EXAMPLES_DIR.glob("*.jpg"))
    assert len(examples) >= 4
    for path in examples:
        guess = predictor.classify(read_image(path))
        assert guess.modality == path.name.split("_")[0], (path.name, guess)
        assert guess.probability > 0.6


def _page_stack(path: Path, count: int = 3) -> Path:
    pages = [Image.fromarray(np.full((20, 24), 60 * i, np.uint8)) for i in range(count)]
    pages[0].save(path, save_all=True, append_images=pages[1:])
    return path


def test_a_multi_page_tiff_gives_a_multi_page_mask_a_montage_and_one_row(tmp_path):
    path = _page_stack(tmp_path / "pages.tif")
    out = tmp_path / "out"
    [result] = predict_files(_predictor(), [path], out, PredictOptions(modality="xray"))
    assert result.ok and result.frames == 3 and result.page is None
    with Image.open(out / "pages_mask.tif") as mask:
        assert mask.n_frames == 3 and mask.size == (24, 20)
    assert (out / "pages_montage.png").is_file() and not (out / "pages_overlay.png").exists()
    [row] = _rows(out)
    assert (row["file"], row["frames"], row["page"], row["series"]) == (str(path), "3", "", "")


def test_page_segments_one_page_as_a_2d_image(tmp_path):
    path = _page_stack(tmp_path / "pages.gif")
    out = tmp_path / "out"
    [result] = predict_files(_predictor(), [path], out, PredictOptions(modality="xray", page=2))
    assert result.ok and result.frames == 1 and result.page == 2
    assert np.asarray(Image.open(out / "pages_page2_mask.png")).shape == (20, 24)
    assert (out / "pages_page2_overlay.png").is_file()
    assert _rows(out)[0]["page"] == "2"
    [beyond] = predict_files(_predictor(), [path], out, PredictOptions(modality="xray", page=3))
    assert not beyond.ok and "no page 3" in beyond.error
    with pytest.raises(InputError, match="--page must be 0 or more"):
        list(predict_files(_predictor(), [path], out, PredictOptions(modality="xray", page=-1)))


def _dicom_slices(folder: Path, count: int, number: int, name: str) -> str:
    """``count`` CT slices of one new series (SeriesNumber ``number``); its SeriesInstanceUID."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series = generate_uid()
    for k in range(count):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = "CT", series, number, k + 1
        ds.Rows, ds.Columns, ds.PhotometricInterpretation, ds.SamplesPerPixel = 12, 16, "MONOCHROME2", 1
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = (np.arange(12 * 16, dtype=np.uint16) * (k + 1)).tobytes()
        ds.save_as(folder / f"{name}{k}.dcm", enforce_file_format=True)
    return series


def test_a_dicom_folder_of_two_series_gives_one_input_per_series(tmp_path):
    pytest.importorskip("pydicom")
    folder = tmp_path / "study"
    first, second = _dicom_slices(folder, 3, 2, "a"), _dicom_slices(folder, 2, 5, "b")
    inputs = expand_inputs([folder])
    assert [str(item) for item in inputs] == [f"{folder} (series2)", f"{folder} (series5)"]
    out = tmp_path / "out"
    results = list(predict_files(_predictor(), inputs, out, PredictOptions(modality="xray")))
    assert [(r.ok, r.frames, r.series) for r in results] == [(True, 3, first), (True, 2, second)]
    assert nib.load(out / "study_series2_mask.nii.gz").shape == (16, 12, 3)
    assert nib.load(out / "study_series5_mask.nii.gz").shape == (16, 12, 2)
    rows = _rows(out)
    assert [(r["file"], r["series"], r["frames"]) for r in rows] == [
        (str(folder), first, "3"),
        (str(folder), second, "2"),
    ]


def test_a_dicom_folder_of_one_series_is_one_volume_as_before(tmp_path):
    pytest.importorskip("pydicom")
    folder = tmp_path / "ct"
    series = _dicom_slices(folder, 3, 1, "s")
    assert expand_inputs([folder]) == [folder]
    [result] = predict_files(_predictor(), [folder], tmp_path / "out", PredictOptions(modality="xray"))
    assert result.ok and result.frames == 3 and result.series == series and result.source == folder
    assert nib.load(tmp_path / "out" / "ct_mask.nii.gz").shape == (16, 12, 3)


def _unknown_everywhere_predictor() -> Predictor:
    """A predictor whose classifier has statistics and a threshold of 0: every image is unknown."""
    import torch

    from espmedsam.config import ClassifierConfig
    from espmedsam.train.classifier_statistics import fit_statistics

    head = ClassifierConfig(enabled=True, input_size=32, hidden_dim=16, statistics=True, statistics_rank=4)
    model = build_model(dataclasses.replace(get_config("tiny"), classifier=head))
    features = torch.randn(60, model.classifier.fc1.in_features, generator=torch.Generator().manual_seed(0))
    fit_statistics(model.classifier, features, torch.arange(60) % len(model.modalities))
    model.classifier.unknown_threshold.fill_(0.0)
    return Predictor(model, size=64)


def test_an_unknown_image_is_flagged_and_segmented_or_with_skip_unknown_left_out(tmp_path):
    predictor = _unknown_everywhere_predictor()
    path = _png(tmp_path / "case.png")
    [result] = predict_files(predictor, [path], tmp_path / "out")
    assert result.ok and result.known is False and result.distance > 0 and not result.skipped
    assert (tmp_path / "out" / "case_mask.png").is_file()
    assert _rows(tmp_path / "out")[0]["known"] == "no"
    options = PredictOptions(skip_unknown=True)
    [result] = predict_files(predictor, [path], tmp_path / "skip", options)
    assert result.ok and result.skipped and result.outputs == () and result.chosen_by == "classifier"
    assert not (tmp_path / "skip" / "case_mask.png").exists()
    [row] = _rows(tmp_path / "skip")
    assert (row["known"], row["outputs"], row["error"]) == ("no", "", "")


def test_a_modality_given_by_option_or_file_name_is_never_checked(tmp_path):
    predictor = _unknown_everywhere_predictor()
    paths = [_png(tmp_path / "case.png"), _png(tmp_path / "xray_case.png", seed=1)]
    options = PredictOptions(modality="fundus", skip_unknown=True)
    chosen = list(predict_files(predictor, paths[:1], tmp_path / "out", options))
    named = list(predict_files(predictor, paths[1:], tmp_path / "named", PredictOptions(skip_unknown=True)))
    for result in chosen + named:
        assert result.ok and result.known is None and result.outputs and not result.skipped
    assert _rows(tmp_path / "out")[0]["known"] == ""


def test_the_cli_warns_about_unknown_images_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from espmedsam.cli import app

    checkpoint = save_model(_unknown_everywhere_predictor().model, tmp_path / "m.safetensors")
    path = _png(tmp_path / "case.png")
    base = ["predict", str(path), "-c", str(checkpoint), "--size", "64", "--device", "cpu"]
    result = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if "looks like none" in line]
    assert len(warnings) == 1 and "segmented as" in warnings[0]
    assert (tmp_path / "a" / "case_mask.png").is_file()
    result = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "b"), "--skip-unknown"])
    assert result.exit_code == 0, result.output
    assert "no mask written" in result.output and "skipped 1" in result.output
    assert not (tmp_path / "b" / "case_mask.png").exists()
