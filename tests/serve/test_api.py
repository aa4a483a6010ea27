"""The JSON API: good files, bad files, limits, sniffing, volumes, concurrency, and what touches the disk."""

from __future__ import annotations

import base64
import io
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from espmedsam.data.io import read_image
from espmedsam.predict import EXAMPLES_DIR
from espmedsam.serve.app import STATIC_DIR
from espmedsam.serve.uploads import display_name, sniff_format


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as client:
        yield client


def post(client, data: bytes, name: str = "image.png", **form):
    return client.post("/api/segment", files={"file": (name, data)}, data=form)


def decode_png(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_health_and_info_describe_the_model(client, predictor):
    health = client.get("/api/health").json()
    assert health["status"] == "ok" and health["modalities"] == list(predictor.modalities)
    info = client.get("/api/info").json()
    assert info["modalities"] == list(predictor.modalities) and info["classifier"] and info["patch_maps"]
    total = sum(p.numel() for p in predictor.model.parameters())
    assert info["total_parameters"] == total == info["parameters"][-1]["parameters"]
    parts = [row["parameters"] for row in info["parameters"][:-1]]
    assert sum(parts) == total
    assert info["config"]["modalities"] == list(predictor.modalities)
    assert info["input_sizes"] == {m: predictor.input_size(m) for m in predictor.modalities}
    assert info["limits"]["max_bytes"] == 2 * 2**20


def test_openapi_documents_the_api(client):
    schema = client.get("/openapi.json").json()
    assert {"/api/segment", "/api/health", "/api/info"} <= set(schema["paths"])
    assert {"413", "415", "422"} <= set(schema["paths"]["/api/segment"]["post"]["responses"])
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger-ui-bundle.js" in docs.text
    assert not re.search(r"https?://", docs.text.split("<script>")[0])  # its scripts and styles are ours
    bundle = re.search(r'src="([^"]+swagger-ui-bundle\.js)"', docs.text).group(1)
    assert client.get(bundle).status_code == 200


def test_a_good_file_gives_the_predictors_mask(client, predictor, example):
    response = post(client, example.read_bytes(), example.name, details="true")
    assert response.status_code == 200, response.text
    body = response.json()
    image = read_image(example)
    expected = predictor.predict(image, body["modality"])
    mask = decode_png(body["mask_png"])
    assert mask.shape == image.shape[:2] and set(np.unique(mask)) <= {0, 255}
    np.testing.assert_array_equal(mask > 0, expected)
    assert body["chosen_by"] == "classifier" and body["modality"] == "dermoscopy"
    assert 0.5 < body["probability"] <= 1 and body["probabilities"]["dermoscopy"] == body["probability"]
    assert (body["width"], body["height"], body["frames"]) == (image.shape[1], image.shape[0], 1)
    assert body["foreground_pixels"] == expected.sum() > 0
    assert body["foreground_fraction"] == pytest.approx(expected.mean())
    assert body["mask_file"]["filename"] == f"{example.stem}_mask.png"
    np.testing.assert_array_equal(decode_png(body["mask_file"]["data"]), expected.astype(np.uint8) * 255)
    (frame,) = body["slices"]
    np.testing.assert_array_equal(decode_png(frame["image_png"]), image)
    patch = decode_png(frame["patch_map_png"])
    assert patch.shape == image.shape[:2] and patch.max() > patch.min()
    assert set(body["seconds"]) == {"read", "classify", "segment", "encode", "total"}
    # the quality score: the predictor's own, with the review flag its threshold gives
    _, score = predictor.predict_logits_with_quality(image, body["modality"])
    if score is None:
        assert body["predicted_dice"] is None and body["review"] is None
    else:
        assert body["predicted_dice"] == pytest.approx(score, abs=1e-4)
        assert body["review"] == (score < predictor.review_below) and body["review_below"] > 0


def test_a_chosen_modality_is_used_and_details_are_optional(client, example):
    body = post(client, example.read_bytes(), example.name, modality="ultrasound").json()
    assert (body["modality"], body["chosen_by"], body["probability"]) == ("ultrasound", "option", None)
    assert "image_png" not in body["slices"][0] or body["slices"][0]["image_png"] is None


def test_the_content_decides_the_format_not_the_name(client, example):
    as_png = png_bytes(read_image(example))
    body = post(client, as_png, "photo.jpg").json()
    assert body["format"] == "png"
    response = post(client, b"just some text, not an image", "notes.png")
    assert response.status_code == 415 and "PNG, JPEG, TIFF" in response.json()["detail"]


def test_a_broken_image_is_a_400_that_names_the_upload_not_a_server_path(client, workspace, example):
    truncated = png_bytes(read_image(example))[:200]
    response = post(client, truncated, "scan.png")
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert (
        detail.startswith("scan.png") and str(workspace) not in detail and "upload" not in detail.split()[0]
    )


def test_an_oversized_upload_is_a_413(client):
    response = post(client, b"\x89PNG\r\n\x1a\n" + bytes(3 * 2**20), "big.png")
    assert response.status_code == 413 and "limit of 2 MB" in response.json()["detail"]


def test_a_body_without_a_length_is_cut_off_at_the_cap(live_url):
    def chunks():  # a well-formed form whose file part goes on past the cap
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n\x89PNG'
        for _ in range(3):
            yield bytes(2**20)

    headers = {"Content-Type": "multipart/form-data; boundary=b"}
    response = httpx.post(f"{live_url}/api/segment", content=chunks(), headers=headers, timeout=60)
    assert response.status_code == 413 and "limit" in response.json()["detail"]


def test_an_image_over_the_pixel_cap_is_refused_from_its_header(client):
    data = png_bytes(np.zeros((2100, 2100), np.uint8))  # a few kB, but 4.4 M pixels
    assert len(data) < 2**20
    response = post(client, data, "wide.png")
    assert response.status_code == 413 and "2100 x 2100" in response.json()["detail"]


def test_unknown_modality_and_missing_file_are_422_in_one_line(client, example):
    response = post(client, example.read_bytes(), example.name, modality="dental")
    assert response.status_code == 422 and "unknown modality 'dental'" in response.json()["detail"]
    response = client.post("/api/segment", data={"modality": "xray"})
    assert response.status_code == 422 and response.json()["detail"] == "file: Field required"


def test_a_volume_gives_one_mask_per_slice_and_a_nifti_file(client, tmp_path):
    volume = np.zeros((64, 48, 5), np.uint8)
    yy, xx = np.mgrid[:64, :48]
    volume[(yy - 32) ** 2 + (xx - 24) ** 2 < 200] = 200
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.diag([0.5, 0.5, 2.0, 1.0])), path)
    body = post(client, path.read_bytes(), "scan.nii.gz", modality="xray", details="true").json()
    assert (body["format"], body["frames"], body["mask_png"]) == ("nifti", 5, None)
    assert body["spacing_mm"] == [0.5, 0.5]
    assert body["foreground_mm2"] == pytest.approx(body["foreground_pixels"] * 0.25)
    assert len(body["slices"]) == 5 and all("image_png" in s for s in body["slices"])
    mask_path = tmp_path / body["mask_file"]["filename"]
    assert mask_path.name == "scan_mask.nii.gz"
    mask_path.write_bytes(base64.b64decode(body["mask_file"]["data"]))
    mask = np.asarray(nib.load(mask_path).dataobj)
    assert mask.shape == volume.shape
    assert sum(s["foreground_pixels"] for s in body["slices"]) == mask.sum() == body["foreground_pixels"]


@pytest.mark.parametrize("fmt, name", [("TIFF", "pages.tif"), ("GIF", "pages.gif")])
def test_a_multi_page_image_gives_one_mask_per_page_and_a_multi_page_tiff(client, tmp_path, fmt, name):
    yy, xx = np.mgrid[:40, :48]
    pages = [
        Image.fromarray(((yy - 20) ** 2 + (xx - 8 - 12 * i) ** 2 < 60).astype(np.uint8) * 200)
        for i in range(3)
    ]
    buffer = io.BytesIO()
    pages[0].save(buffer, format=fmt, save_all=True, append_images=pages[1:])
    body = post(client, buffer.getvalue(), name, modality="xray").json()
    assert (body["format"], body["frames"], body["mask_png"]) == (fmt.lower(), 3, None)
    assert len(body["slices"]) == 3 and (body["width"], body["height"]) == (48, 40)
    assert (
        body["mask_file"]["filename"] == "pages_mask.tif" and body["mask_file"]["media_type"] == "image/tiff"
    )
    with Image.open(io.BytesIO(base64.b64decode(body["mask_file"]["data"]))) as mask:
        assert mask.n_frames == 3
        for i, page in enumerate(body["slices"]):
            mask.seek(i)
            np.testing.assert_array_equal(np.asarray(mask), decode_png(page["mask_png"]))


def test_pages_over_the_frame_cap_are_refused_from_the_header(client):
    pages = [Image.new("L", (4, 4)) for _ in range(65)]  # TEST_LIMITS: 64 frames
    buffer = io.BytesIO()
    pages[0].save(buffer, format="TIFF", save_all=True, append_images=pages[1:])
    response = post(client, buffer.getvalue(), "many.tif", modality="xray")
    assert response.status_code == 413 and "65 slices" in response.json()["detail"]


def test_a_dicom_file_is_read_by_its_content(client):
    from pydicom.data import get_testdata_file

    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    body = post(client, data, "ct", modality="xray").json()
    assert (body["format"], body["width"], body["height"]) == ("dicom", 128, 128)
    assert body["mask_file"]["filename"] == "ct_mask.nii.gz"


def test_concurrent_requests_agree_with_sequential_ones(live_url):
    examples = sorted(EXAMPLES_DIR.glob("*.jpg"))
    with httpx.Client(timeout=120) as one:
        sequential = [_segment(one, live_url, path) for path in examples]
    jobs = examples * 2
    with httpx.Client(timeout=120) as shared, ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda path: _segment(shared, live_url, path), jobs))
    assert together == sequential * 2


def _segment(client: httpx.Client, url: str, path: Path) -> tuple[int, str, str]:
    response = client.post(f"{url}/api/segment", files={"file": (path.name, path.read_bytes())})
    body = response.json()
    return response.status_code, body["modality"], body["mask_png"]


def test_nothing_is_left_on_disk_and_request_names_are_never_paths(client, workspace, example, tmp_path):
    body = post(client, example.read_bytes(), "../../../../tmp/evil name?.jpg").json()
    assert body["filename"] == "evil name_.jpg" and body["mask_file"]["filename"] == "evil name__mask.png"
    assert list(workspace.iterdir()) == []
    assert not Path("/tmp/evil name?.jpg").exists()


def test_display_names_keep_only_safe_characters():
    assert display_name("C:\\scans\\a.png") == "a.png"
    assert display_name("../x/<script>.png") == "_script_.png"
    assert display_name("") == display_name(None) == display_name("..") == "upload"


@pytest.mark.parametrize(
    ("head", "name"),
    [
        (b"\x89PNG\r\n\x1a\n", "png"),
        (b"\xff\xd8\xff\xe0", "jpeg"),
        (b"II*\x00", "tiff"),
        (b"MM\x00*", "tiff"),
        (b"BM", "bmp"),
        (b"GIF89a", "gif"),
        (b"GIF87a", "gif"),
        (bytes(128) + b"DICM", "dicom"),
        (bytes(344) + b"n+1\x00", "nifti"),
    ],
)
def test_formats_are_sniffed_from_their_magic(head, name):
    assert sniff_format(head + bytes(600)).name == name


def test_gzip_is_nifti_only_with_a_nifti_header_inside():
    import gzip

    assert sniff_format(gzip.compress(bytes(344) + b"n+1\x00" + bytes(200))).suffix == ".nii.gz"
    with pytest.raises(Exception, match="not a supported file"):
        sniff_format(gzip.compress(b"plain text"))


def test_the_page_loads_no_asset_from_elsewhere(client):
    page = client.get("/")
    assert page.status_code == 200 and "<html" in page.text.lower()
    for path in STATIC_DIR.iterdir():
        text = path.read_text()
        external = re.findall(
            r"""(?:src|href)\s*=\s*["']\s*(?:https?:)?//|url\(\s*["']?(?:https?:)?//""", text
        )
        assert not external, f"{path.name} loads {external}"
        assert client.get(f"/static/{path.name}").status_code == 200 or path.name == "index.html"


def test_the_answer_says_when_an_image_looks_like_no_modality(tmp_path):
    import dataclasses

    import torch

    from espmedsam import Predictor, build_model
    from espmedsam.config import ClassifierConfig
    from espmedsam.models.registry import get_config
    from espmedsam.serve.app import create_app
    from espmedsam.train.classifier_statistics import fit_statistics

    head = ClassifierConfig(enabled=True, input_size=32, hidden_dim=16, statistics=True, statistics_rank=4)
    model = build_model(dataclasses.replace(get_config("tiny"), classifier=head))
    features = torch.randn(60, model.classifier.fc1.in_features, generator=torch.Generator().manual_seed(0))
    fit_statistics(model.classifier, features, torch.arange(60) % len(model.modalities))
    model.classifier.unknown_threshold.fill_(0.0)  # every image is unknown
    app = create_app(Predictor(model, size=64), checkpoint_name="tiny", workspace=tmp_path)
    image = png_bytes(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8))
    with TestClient(app) as tiny:
        body = post(tiny, image).json()
        assert body["chosen_by"] == "classifier" and body["known"] is False
        assert body["distance"] > body["unknown_threshold"] == 0.0 and body["mask_png"]  # still segmented
        chosen = post(tiny, image, modality="xray").json()
        assert chosen["known"] is None and chosen["distance"] is None  # a chosen modality is not checked


def test_a_box_and_clicks_correct_a_kept_image(client, predictor, example):
    body = post(client, example.read_bytes(), example.name).json()
    assert body["image_id"] and client.get("/api/info").json()["prompts"] is True
    image = read_image(example)
    h, w = image.shape[:2]
    box = [w * 0.25, h * 0.25, w * 0.75, h * 0.75]
    answer = client.post("/api/prompt", json={"image_id": body["image_id"], "boxes": [box]})
    assert answer.status_code == 200, answer.text
    corrected = answer.json()
    expected = predictor.predict(image, body["modality"], boxes=[box])
    np.testing.assert_array_equal(decode_png(corrected["mask_png"]) > 0, expected)
    np.testing.assert_array_equal(decode_png(corrected["mask_file"]["data"]) > 0, expected)
    assert corrected["foreground_pixels"] == expected.sum() and len(corrected["predicted_iou"]) == 1
    # a background click inside the box, with it: the same call predict makes
    point = [w * 0.5, h * 0.5]
    answer = client.post(
        "/api/prompt", json={"image_id": body["image_id"], "boxes": [box], "points": [point], "labels": [0]}
    )
    expected = predictor.predict(image, body["modality"], boxes=[box], points=[point], labels=[0])
    np.testing.assert_array_equal(decode_png(answer.json()["mask_png"]) > 0, expected)


def test_a_quality_score_left_for_later_is_the_same_score(client, predictor, example):
    now = post(client, example.read_bytes(), example.name).json()
    calls = predictor.prompter.encoder_calls
    later = post(client, example.read_bytes(), "other.jpg", quality_later="true").json()
    assert later["quality_pending"] and later["predicted_dice"] is None and not now["quality_pending"]
    assert now["predicted_dice"] is not None  # the bundled model has a calibrated score
    assert later["mask_png"] == now["mask_png"]
    answer = client.post("/api/quality", json={"image_id": later["image_id"]})
    assert answer.status_code == 200, answer.text
    score = answer.json()
    assert score["image_id"] == later["image_id"] and score["predicted_dice"] == now["predicted_dice"]
    assert (score["review"], score["review_below"]) == (now["review"], now["review_below"])
    # the same image: its kept embedding served the mask and the score
    assert predictor.prompter.encoder_calls == calls
    unknown = client.post("/api/quality", json={"image_id": "nope"})
    assert unknown.status_code == 422 and "upload it again" in unknown.json()["detail"]


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ({"boxes": [[0, 0, 1e6, 10]]}, "outside"),
        ({"points": [[5, 5]], "labels": [3]}, "labels"),
        ({"boxes": [[1, 2, 3]]}, "boxes must be"),
        ({}, "no prompt"),
        ({"image_id": "nope", "points": [[1, 1]]}, "upload it again"),
    ],
)
def test_bad_prompts_are_422_in_one_line(client, example, prompt, message):
    image_id = post(client, example.read_bytes(), example.name).json()["image_id"]
    answer = client.post("/api/prompt", json={"image_id": image_id, **prompt})
    assert answer.status_code == 422 and message in answer.json()["detail"]
    assert "\n" not in answer.json()["detail"]
