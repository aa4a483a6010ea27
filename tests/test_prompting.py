"""Prompt parsing, checking, grouping and the mapping from original pixels to the model input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from espmedsam import build_model
from espmedsam.errors import InputError
from espmedsam.prompting import (
    Prompts,
    parse_box,
    parse_point,
    prompt_passes,
    prompts_from_options,
    read_prompt_file,
    to_model_input,
)


def test_options_parse_to_prompts():
    prompts = prompts_from_options(["1,2,30,40"], ["5,6", "7.5,8,0"])
    assert prompts.boxes == ((1.0, 2.0, 30.0, 40.0),)
    assert prompts.points == ((5.0, 6.0), (7.5, 8.0)) and prompts.labels == (1, 0)


@pytest.mark.parametrize(
    ("parse", "text", "message"),
    [
        (parse_box, "1,2,3", "expected x0,y0,x1,y1"),
        (parse_box, "a,b,c,d", "numbers separated by commas"),
        (parse_box, "1,2,inf,4", "finite"),
        (parse_point, "1", "expected x,y"),
        (parse_point, "1,2,3", r"1 \(foreground\) or 0 \(background\)"),
        (parse_point, "1;2", "numbers separated by commas"),
    ],
)
def test_malformed_options_are_one_line_errors(parse, text, message):
    with pytest.raises(InputError, match=message) as error:
        parse(text)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"boxes": [[10, 5, 2, 8]]}, "must not be left of x0"),
        ({"boxes": [[1, 2, 3]]}, r"\(K, 4\)"),
        ({"points": [[1, 2]], "labels": [2]}, "1 \\(foreground\\) or 0"),
        ({"points": [[1, 2]], "labels": [1, 0]}, "1 points but 2 labels"),
        ({"points": [[1, float("nan")]]}, "finite"),
    ],
)
def test_bad_prompt_arrays_are_refused(kwargs, message):
    with pytest.raises(InputError, match=message):
        Prompts.of(**kwargs)


def test_an_empty_list_is_no_prompt():
    assert not Prompts.of([], [], [])
    assert not Prompts.of(None, None, None)
    assert Prompts.of([[0, 0, 0, 0]])  # a one-pixel box is a prompt


@pytest.mark.parametrize(
    ("prompts", "message"),
    [
        (Prompts.of([[0, 0, 100, 10]]), "box .* is outside the 64x32 image"),
        (Prompts.of([[-1, 0, 10, 10]]), "outside"),
        (Prompts.of(points=[[64, 3]]), "point .* is outside the 64x32 image"),
        (Prompts.of(points=[[3, -0.5]]), "outside"),
    ],
)
def test_prompts_outside_the_image_are_refused(prompts, message):
    with pytest.raises(InputError, match=message):
        prompts.check_inside(32, 64)


def test_inside_prompts_pass_the_check():
    Prompts.of([[0, 0, 63, 31]], [[63, 31]]).check_inside(32, 64)


def test_points_join_the_box_they_are_in_and_the_rest_make_one_pass():
    prompts = Prompts.of([[0, 0, 10, 10], [20, 20, 30, 30]], [[5, 5], [25, 22], [50, 50]], [1, 0, 1])
    passes = prompt_passes(prompts)
    assert [p.box for p in passes] == [(0, 0, 10, 10), (20, 20, 30, 30), None]
    assert [p.points for p in passes] == [((5, 5),), ((25, 22),), ((50, 50),)]
    assert [p.labels for p in passes] == [(1,), (0,), (1,)]
    assert [p.box for p in prompt_passes(Prompts.of([[0, 0, 4, 4]]))] == [(0, 0, 4, 4)]


def test_prompt_files_csv_and_json(tmp_path):
    csv_file = tmp_path / "prompts.csv"
    csv_file.write_text(
        "image,kind,x0,y0,x1,y1,label\na.png,box,1,2,30,40,\na.png,point,5,6,,,0\nb.png,point,7,8,,,\n"
    )
    prompts = read_prompt_file(csv_file)
    assert prompts["a.png"] == Prompts.of([[1, 2, 30, 40]], [[5, 6]], [0])
    assert prompts["b.png"] == Prompts.of(points=[[7, 8]])
    json_file = tmp_path / "prompts.json"
    json_file.write_text('{"a.png": {"boxes": [[1, 2, 30, 40]], "points": [[5, 6]], "labels": [0]}}')
    assert read_prompt_file(json_file)["a.png"] == prompts["a.png"]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("p.csv", "image,kind,x0,y0,x1,y1,label\na.png,circle,1,2,3,4,\n", "kind must be box or point"),
        ("p.csv", "image,kind,x0,y0,x1,y1,label\na.png,box,1,2,,4,\n", "line 2: missing or non-numeric"),
        ("p.json", "{not json", "not valid JSON"),
        ("p.json", '{"a.png": {"circles": []}}', "expected"),
    ],
)
def test_malformed_prompt_files(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        read_prompt_file(path)


SHAPES = [(64, 64, 64), (40, 96, 64), (90, 30, 96), (33, 57, 128)]  # (height, width, model input side)


@pytest.mark.parametrize(("height", "width", "size"), SHAPES)
def test_a_box_lands_on_the_same_pixels_in_the_model_input(height, width, size):
    """A bright block at the box's pixels, preprocessed like the image, sits where the box is mapped to,
    within a pixel (half an enlarged pixel, where the image is enlarged: a corner is its pixel's centre),
    at any size and aspect ratio (the padding is right and below)."""
    model = build_model("tiny")
    x0, y0 = width // 4, height // 3
    x1, y1 = x0 + width // 3, y0 + height // 4
    image = np.zeros((height, width), dtype=np.uint8)
    image[y0 : y1 + 1, x0 : x1 + 1] = 255
    inputs, meta = model.preprocess(image, size)
    bright = inputs[0, 0] > inputs[0, 0].min() + 0.5 * (inputs[0, 0].max() - inputs[0, 0].min())
    rows, columns = torch.nonzero(bright, as_tuple=True)
    found = torch.tensor([columns.min(), rows.min(), columns.max(), rows.max()], dtype=torch.float32)
    [(box)] = prompt_passes(Prompts.of([[x0, y0, x1, y1]]))
    mapped = to_model_input(box, meta).boxes[0]
    tolerance = max(1.0, 0.5 * size / max(height, width) + 0.1)
    assert torch.allclose(mapped, found, atol=tolerance), (mapped, found)
    [(point)] = prompt_passes(Prompts.of(points=[[x0, y0]]))
    assert torch.allclose(to_model_input(point, meta).points[0, 0], found[:2], atol=tolerance)
