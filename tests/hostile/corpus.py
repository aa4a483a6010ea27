"""A corpus of bad and unusual inputs for every ``espmedsam`` command, built offline in a few seconds.

Each :class:`Case` writes its input into an empty folder and gives the command line to run on it; its
:class:`Expect` says what must come out: the exit code, what the one ``error:`` line (or the report) must
say, the masks that must be written (with their sizes) and the partial outputs that must not be left
behind. :func:`run_cli` runs the command in this process, as ``espmedsam`` would from a shell (a traceback
included if one escapes), and :func:`check` lists what differs from the expectation.

Used by ``tests/hostile/test_hostile.py`` and ``benchmarks/hostile_inputs.py``.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import io
import json
import logging
import os
import shlex
import traceback
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from unittest import mock

import numpy as np
from PIL import Image

MODALITY = "fundus"
SIZE = "64"  # the tiny model's input side: every forward pass is a few milliseconds


@dataclass(frozen=True)
class Expect:
    """What a case must produce.

    ``code``: the exit code. ``says``: fragments the output must contain; for a failure with
    ``one_line``, all in the single ``error:`` line that is all of stderr. ``masks``: (path, (H, W)) of
    mask PNGs that must be written; ``exists``: other files that must be; ``absent``: outputs that must not
    be (no partial file). Paths are relative to the case's folder.
    """

    code: int
    says: tuple[str, ...] = ()
    one_line: bool = True
    masks: tuple[tuple[str, tuple[int, int]], ...] = ()
    exists: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.code == 0:
            sizes = ", ".join(f"{h}x{w}" for _, (h, w) in self.masks)
            text = f"exit 0, mask {sizes}" if sizes else "exit 0"
        else:
            text = f"exit {self.code}, " + ("one line" if self.one_line else "report")
        shown = [repr(fragment) for fragment in self.says[:4]]
        shown += [f"{len(self.says) - 4} more"] if len(self.says) > 4 else []
        return text + (f" saying {' / '.join(shown)}" if shown else "")


def fails(code: int, *says: str, absent: tuple[str, ...] = ()) -> Expect:
    """A single ``error: ...`` line on stderr naming ``says``, exit ``code``."""
    return Expect(code, says, one_line=True, absent=absent)


def reports(code: int, *says: str, masks=(), exists=(), absent=()) -> Expect:
    """Exit ``code``; ``says`` anywhere in the output (a batch's failure summary, a dataset report)."""
    return Expect(code, says, one_line=False, masks=tuple(masks), exists=tuple(exists), absent=tuple(absent))


def segments(height: int, width: int, name: str = "image", *says: str) -> Expect:
    """Exit 0 and ``out/<name>_mask.png`` of the image's own size."""
    return Expect(0, says, one_line=False, masks=((f"out/{name}_mask.png", (height, width)),))


class Shared:
    """Inputs every case may use, built once on first use under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    @cached_property
    def checkpoint(self) -> Path:
        from espmedsam.checkpoints.native import save_model
        from espmedsam.models.registry import build_model

        return save_model(build_model("tiny"), self.root / "tiny.safetensors")

    @cached_property
    def unet(self) -> Path:
        from espmedsam.checkpoints.native import save_unet
        from espmedsam.models.unet import UNetBaseline, UNetConfig

        model = UNetBaseline(UNetConfig(features=(4, 4, 8, 8, 16, 4)))
        return save_unet(model, self.root / "unet.safetensors")

    @cached_property
    def teacher(self) -> Path:
        from espmedsam.checkpoints.sam import save_sam_encoder
        from espmedsam.models.sam_vit import SamViTConfig, SamViTEncoder

        return save_sam_encoder(SamViTEncoder(SamViTConfig.tiny()), self.root / "teacher.safetensors")

    @cached_property
    def sam_pth(self) -> Path:
        """A tiny SAM checkpoint as ``torch.save`` writes it (another architecture than ESP-MedSAM)."""
        import torch

        from espmedsam.models.sam_vit import SamViTConfig, SamViTEncoder

        state = {f"image_encoder.{k}": v for k, v in SamViTEncoder(SamViTConfig.tiny()).state_dict().items()}
        torch.save(state, self.root / "sam.pth")
        return self.root / "sam.pth"


@dataclass(frozen=True)
class Case:
    """One kind of bad or unusual input: ``build(folder, shared)`` writes it and returns the arguments."""

    kind: str
    command: str
    build: Callable[[Path, Shared], list[str]]
    expect: Expect
    non_root: bool = False  # permissions mean nothing to root: skipped there
    patch: Callable[[], contextlib.AbstractContextManager] | None = None
    marker: str | None = None  # a file that code smuggled into the input would create


CASES: list[Case] = []


def case(kind: str, command: str, expect: Expect, **options) -> Callable:
    """Register the decorated builder as a case."""

    def register(build: Callable[[Path, Shared], list[str]]) -> Callable:
        CASES.append(Case(kind, command, build, expect, **options))
        return build

    return register


# ---------------------------------------------------------------------------------------------- running


@dataclass(frozen=True)
class Outcome:
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_cli(args: list[str]) -> Outcome:
    """Run ``espmedsam ARGS`` in this process; an exception that escapes is printed as the interpreter
    would (a traceback, exit code 1)."""
    from espmedsam.cli import app

    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers = []  # so the command's logging.basicConfig logs into this run's stderr
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                app(args=[str(a) for a in args], prog_name="espmedsam")
            except SystemExit as done:
                code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
                if isinstance(done.code, str):
                    print(done.code, file=err)
            except BaseException:  # noqa: BLE001  # what `python -m espmedsam` would show
                traceback.print_exc(file=err)
                code = 1
    finally:
        root.handlers, root.level = handlers, level
    return Outcome(code, out.getvalue(), err.getvalue())


def run_case(item: Case, folder: Path, shared: Shared) -> Outcome:
    """Build ``item`` in the empty ``folder`` and run it (under its patch, if any)."""
    args = item.build(folder, shared)
    with item.patch() if item.patch else contextlib.nullcontext():
        return run_cli(args)


def check(item: Case, outcome: Outcome, folder: Path) -> list[str]:
    """What the outcome of ``item`` gets wrong; empty when it is as expected."""
    expect, problems = item.expect, []
    if outcome.code != expect.code:
        problems.append(f"exit code {outcome.code}, expected {expect.code}")
    if "Traceback (most recent call last)" in outcome.output:
        problems.append("a traceback")
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    if expect.code and expect.one_line:
        if len(lines) != 1 or not lines[0].startswith("error: "):
            problems.append(f"stderr is not one 'error: ...' line but {len(lines)} lines")
        where = lines[-1] if lines else ""
    else:
        where = outcome.output
    problems += [f"does not say {fragment!r}" for fragment in expect.says if fragment not in where]
    for name, size in expect.masks:
        path = folder / name
        if not path.is_file():
            problems.append(f"no {name}")
        elif (shape := np.asarray(Image.open(path)).shape[:2]) != size:
            problems.append(f"{name} is {shape[0]}x{shape[1]}, expected {size[0]}x{size[1]}")
    problems += [f"no {name}" for name in expect.exists if not (folder / name).exists()]
    problems += [f"left {name} behind" for name in expect.absent if (folder / name).exists()]
    leftovers = sorted(p.name for p in folder.rglob("*.tmp"))
    if leftovers:
        problems.append(f"left temporary files {', '.join(leftovers)}")
    if item.marker and (folder / item.marker).exists():
        problems.append("ran code from the input")
    return problems


def observed(outcome: Outcome, folder: Path, says: tuple[str, ...] = ()) -> str:
    """The outcome in a few words: the exit code, the first line saying ``says[0]`` and the last line of
    output, paths made relative."""
    lines = [line.strip() for line in outcome.output.splitlines() if line.strip()]
    shown = lines[-1:]
    first = next((line for line in lines if says and says[0] in line), None)
    if first and first not in shown:
        shown.insert(0, first)
    text = " … ".join(shown)
    if "Traceback (most recent call last)" in outcome.output:
        text = "traceback: " + text
    for root in (folder, folder.parent):  # the case's folder, and the one beside it of shared inputs
        text = text.replace(str(root) + os.sep, "")
    return f"exit {outcome.code}: {text[:200]}"


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


# ------------------------------------------------------------------------------------------ the files


def rgb(height: int = 20, width: int = 30, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def png_bytes(array: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", **options)
    return buffer.getvalue()


def jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose IHDR claims ``width`` x ``height`` pixels (its CRC fixed, so only the size lies)."""
    data = bytearray(png_bytes(np.zeros((8, 8), np.uint8)))
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def with_bad_crc(data: bytes) -> bytes:
    """A PNG whose IHDR checksum is wrong."""
    broken = bytearray(data)
    broken[29] ^= 0xFF
    return bytes(broken)


def tiff_bytes(*pages: Image.Image) -> bytes:
    buffer = io.BytesIO()
    pages[0].save(buffer, format="TIFF", save_all=len(pages) > 1, append_images=list(pages[1:]))
    return buffer.getvalue()


def nifti_gz_bytes(volume: np.ndarray) -> bytes:
    import nibabel as nib

    return gzip.compress(nib.Nifti1Image(volume, np.eye(4)).to_bytes())


def dicom_bytes(pixels: np.ndarray | None) -> bytes:
    """A small CT DICOM file (uint16 pixels), or one without pixel data."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.Modality, ds.PatientID = CTImageStorage, "CT", "P1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    shape = (16, 16) if pixels is None else pixels.shape
    ds.Rows, ds.Columns = shape
    ds.PhotometricInterpretation, ds.SamplesPerPixel = "MONOCHROME2", 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if pixels is not None:
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class _Evil:
    """Unpickling this runs ``touch MARKER``: what a malicious .pth does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def evil_pth(path: Path, marker: Path) -> Path:
    """A torch checkpoint whose unpickling would run code (a tensor beside it, as a real one has)."""
    import torch

    torch.save({"model": {"weight": torch.zeros(2)}, "hook": _Evil(marker)}, path)
    return path


@contextlib.contextmanager
def failing_writes(code: int = errno.ENOSPC) -> Iterator[None]:
    """Every file opened for writing takes half of its first write, then raises OSError ``code``."""
    real_open = Path.open

    class Failing(io.FileIO):
        def write(self, data) -> int:
            super().write(bytes(data)[: len(data) // 2])
            raise OSError(code, os.strerror(code))

    def open_(self, mode="r", *args, **kwargs):
        if not any(flag in mode for flag in "wax"):
            return real_open(self, mode, *args, **kwargs)
        raw = Failing(self, mode.replace("b", "").replace("t", "").replace("+", ""))
        return raw if "b" in mode else io.TextIOWrapper(raw, write_through=True)

    with mock.patch.object(Path, "open", open_):
        yield


def disk_full() -> contextlib.AbstractContextManager:
    return failing_writes(errno.ENOSPC)


def read_only_disk() -> contextlib.AbstractContextManager:
    return failing_writes(errno.EROFS)


def write_denied() -> contextlib.AbstractContextManager:
    return failing_writes(errno.EACCES)


@contextlib.contextmanager
def read_denied(name: str) -> Iterator[None]:
    """Opening a file named ``name`` raises EACCES, as for a file without read permission (even as root)."""
    import builtins

    real_open = builtins.open

    def open_(file, *args, **kwargs):
        if str(file).endswith(name):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, *args, **kwargs)

    with mock.patch.object(builtins, "open", open_):
        yield


def write(path: Path, data: bytes | np.ndarray | Image.Image) -> Path:
    """Write bytes, an array (PNG or by suffix) or a PIL image (by suffix) to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, np.ndarray):
        data = Image.fromarray(data)
    if isinstance(data, Image.Image):
        data.save(path)
    else:
        path.write_bytes(data)
    return path


def predict(shared: Shared, folder: Path, *inputs: Path | str, extra: tuple[str, ...] = ()) -> list[str]:
    """``predict INPUTS`` with the tiny checkpoint at 64² (float32: CPU bfloat16 is slower), one modality,
    into ``folder/out``."""
    options = f"-m {MODALITY} --size {SIZE} --fp32".split()
    return [
        "predict",
        *map(str, inputs),
        *options,
        "-c",
        str(shared.checkpoint),
        "--out",
        str(folder / "out"),
        *extra,
    ]


def dataset(
    root: Path, stems=("a", "b", "c", "d"), *, size=(24, 32), split: object = "default", mask=None
) -> Path:
    """A dataset folder: images/, masks/ (a square of foreground) and split.json (half of the stems in
    train, one in val, the rest in test)."""
    for i, stem in enumerate(stems):
        write(root / "images" / f"{stem}.png", rgb(*size, seed=i))
        write(root / "masks" / f"{stem}.png", mask if mask is not None else _square(size))
    if split == "default":
        half = max(1, len(stems) // 2)
        split = {
            "train": list(stems[:half]),
            "val": list(stems[half : half + 1]),
            "test": list(stems[half + 1 :]),
        }
    if split is not None:
        (root / "split.json").write_text(split if isinstance(split, str) else json.dumps(split))
    return root


def _square(size: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(size, np.uint8)
    mask[size[0] // 4 : size[0] // 2, size[1] // 4 : size[1] // 2] = 255
    return mask


def evaluate(shared: Shared, folder: Path, data: str, *extra: str) -> list[str]:
    """``evaluate`` of every image of ``data`` (DIR:MODALITY) with the tiny checkpoint into ``folder/out``."""
    options = f"--size {SIZE} --fp32 --split all --overlays 1".split()
    return [
        "evaluate",
        "-d",
        data,
        "-c",
        str(shared.checkpoint),
        *options,
        "--out",
        str(folder / "out"),
        *extra,
    ]


def train(folder: Path, data: str, *overrides: str) -> list[str]:
    """``train`` of the tiny model for one step of two images at 64² on ``data``, into ``folder/run``."""
    sets = "model=tiny image_size=64 batch_size=2 epochs=1 steps_per_epoch=1 warmup_steps=0 bf16=false"
    sets = [*sets.split(), "device=cpu", f"data=[{data}]", f"out_dir={folder / 'run'}", *overrides]
    return ["train", *(item for override in sets for item in ("--set", override))]


def distill_common(shared: Shared, folder: Path, images: Path, *extra: str, teacher: Path | None = None):
    """``distill common`` of a fresh tiny student for one epoch at 64² on ``images``, into ``folder/run``."""
    sets = [
        *"image_size=64 epochs=1 batch_size=2 held_out=0 bf16=false".split(),
        f"cache_dir={folder / 'cache'}",
    ]
    options = ["-i", str(images), *"--model tiny --device cpu".split(), "--out", str(folder / "run")]
    settings = [item for setting in sets for item in ("--set", setting)]
    return ["distill", "common", "-t", str(teacher or shared.teacher), *options, *settings, *extra]


# ---------------------------------------------------------------------- files given to `predict`

_MASK = "out/{}_mask.png"

BAD_FILES: list[tuple[str, str, Callable[[], bytes | np.ndarray | Image.Image], tuple[str, ...]]] = [
    ("0-byte file", "empty.png", lambda: b"", ("empty file",)),
    ("truncated PNG", "cut.png", lambda: png_bytes(rgb(64, 64))[:400], ("cannot read image",)),
    ("truncated JPEG", "cut.jpg", lambda: jpeg_bytes(Image.fromarray(rgb(64, 64)))[:700], ("truncated",)),
    ("PNG with a broken CRC", "crc.png", lambda: with_bad_crc(png_bytes(rgb())), ("cannot read image",)),
    (
        "text file named .png",
        "notes.png",
        lambda: b"just some notes\n" * 4,
        ("a format Pillow does not know",),
    ),
    (
        "HTML file named .jpg",
        "page.jpg",
        lambda: b"<!DOCTYPE html><html><body>404</body></html>\n",
        ("a format Pillow does not know",),
    ),
    (
        "random bytes named .tif",
        "noise.tif",
        lambda: np.random.default_rng(0).bytes(4096),
        ("a format Pillow does not know",),
    ),
    (
        "TIFF header then garbage",
        "garbage.tif",
        lambda: b"II*\x00" + np.random.default_rng(1).bytes(2048),
        ("cannot read image",),
    ),
    (
        "float TIFF full of NaN",
        "nan.tif",
        lambda: Image.fromarray(np.full((16, 16), np.nan, np.float32)),
        ("no finite pixels",),
    ),
    (
        "float TIFF with some inf",
        "inf.tif",
        lambda: Image.fromarray(np.where(np.eye(16) > 0, np.inf, 1.0).astype(np.float32)),
        ("infinite",),
    ),
    (
        "decompression bomb (60000x60000 header)",
        "bomb.png",
        lambda: png_claiming(60000, 60000),
        ("pixels", "limit"),
    ),
    (
        "header over the pixel cap (12000x12000)",
        "huge.png",
        lambda: png_claiming(12000, 12000),
        ("12000x12000", "limit"),
    ),
    (
        "multi-page TIFF with pages of different sizes",
        "odd.tif",
        lambda: tiff_bytes(Image.fromarray(rgb()), Image.fromarray(rgb(24, 30))),
        ("pages of different sizes", "page 1 is 30x24", "--page"),
    ),
    ("non-image suffix", "notes.txt", lambda: b"hello\n", ("unsupported file type '.txt'",)),
    (
        "NIfTI truncated",
        "cut.nii.gz",
        lambda: nifti_gz_bytes(np.arange(4096, dtype=np.float32).reshape(16, 16, 16))[:300],
        ("cannot read NIfTI",),
    ),
    ("NIfTI named .nii.gz, not gzip", "plain.nii.gz", lambda: b"\x00" * 400, ("cannot read NIfTI",)),
    (
        "NIfTI full of NaN",
        "nan.nii.gz",
        lambda: nifti_gz_bytes(np.full((8, 8, 2), np.nan, np.float32)),
        ("NaN",),
    ),
    (
        "NIfTI header claiming 30000x30000x4 voxels",
        "huge.nii.gz",
        lambda: _nifti_claiming(30000, 30000, 4),
        ("30000x30000x4", "limit"),
    ),
    (
        "DICOM header claiming 60000x60000 pixels",
        "huge.dcm",
        lambda: _dicom_claiming(60000, 60000),
        ("DICOM",),
    ),
    ("DICOM without pixel data", "nopixels.dcm", lambda: dicom_bytes(None), ("no pixel data",)),
    ("DICOM truncated", "cut.dcm", lambda: dicom_bytes(np.arange(256).reshape(16, 16))[:-300], ("DICOM",)),
]


def _nifti_claiming(*shape: int) -> bytes:
    """A .nii.gz whose header claims ``shape`` voxels over a few bytes of data."""
    import nibabel as nib

    image = nib.Nifti1Image(np.zeros((2, 2, 1), np.float32), np.eye(4))
    image.header.set_data_shape(shape)
    return gzip.compress(image.header.binaryblock + b"\0" * 404)


def _dicom_claiming(rows: int, columns: int) -> bytes:
    """A DICOM file whose Rows and Columns claim far more pixels than its pixel data hold."""
    import pydicom

    dataset = pydicom.dcmread(io.BytesIO(dicom_bytes(np.zeros((4, 4)))))
    dataset.Rows, dataset.Columns = rows, columns
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _animation(fmt: str, count: int = 2) -> bytes:
    """An animated PNG or GIF of ``count`` 20 x 30 frames."""
    buffer = io.BytesIO()
    frames = [Image.fromarray(rgb(seed=i)) for i in range(count)]
    frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:])
    return buffer.getvalue()


def _series_dicom(uid: str, number: int, seed: int = 0) -> bytes:
    """A small CT DICOM file of series ``uid`` (SeriesNumber ``number``)."""
    import pydicom

    pixels = np.random.default_rng(seed).integers(0, 4000, (16, 16))
    dataset = pydicom.dcmread(io.BytesIO(dicom_bytes(pixels)))
    dataset.SeriesInstanceUID, dataset.SeriesNumber, dataset.InstanceNumber = uid, number, seed + 1
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _bad_file_case(kind: str, name: str, make: Callable, says: tuple[str, ...]) -> None:
    stem = name.split(".")[0]

    @case(kind, "predict", fails(3, name, *says, absent=(_MASK.format(stem), f"out/{stem}_overlay.png")))
    def build(folder: Path, shared: Shared) -> list[str]:
        return predict(shared, folder, write(folder / name, make()))


for _kind, _name, _make, _says in BAD_FILES:
    _bad_file_case(_kind, _name, _make, _says)


@case("a folder named like an image", "predict", fails(2, "x.png", "folder"))
def _folder_named_png(folder: Path, shared: Shared) -> list[str]:
    (folder / "x.png").mkdir()
    return predict(shared, folder, folder / "x.png")


@case("a dangling symlink", "predict", fails(2, "gone.png", "broken symbolic link"))
def _dangling(folder: Path, shared: Shared) -> list[str]:
    (folder / "gone.png").symlink_to(folder / "missing.png")
    return predict(shared, folder, folder / "gone.png")


@case("a file without read permission", "predict", fails(3, "secret.png", "Permission denied"), non_root=True)
def _unreadable(folder: Path, shared: Shared) -> list[str]:
    path = write(folder / "secret.png", rgb())
    path.chmod(0)
    return predict(shared, folder, path)


@case(
    "a file that cannot be read (EACCES, simulated)",
    "predict",
    fails(3, "secret.png", "Permission denied"),
    patch=lambda: read_denied("secret.png"),
)
def _read_denied(folder: Path, shared: Shared) -> list[str]:
    return predict(shared, folder, write(folder / "secret.png", rgb()))


@case("a missing input", "predict", fails(2, "nothere.png", "no such file"))
def _missing(folder: Path, shared: Shared) -> list[str]:
    return predict(shared, folder, folder / "nothere.png")


@case("an empty folder", "predict", fails(2, "empty", "no images"))
def _empty_folder(folder: Path, shared: Shared) -> list[str]:
    (folder / "empty").mkdir()
    return predict(shared, folder, folder / "empty")


_IN_FOLDERS = [(kind, name, make) for kind, name, make, _ in BAD_FILES if not name.endswith(".txt")]


@case(
    "a folder holding every bad file kind among good ones",
    "predict",
    reports(
        3,
        f"{len(_IN_FOLDERS) + 1} of {len(_IN_FOLDERS) + 3} inputs failed",
        "gone.png",
        *(name for _, name, _ in _IN_FOLDERS),
        masks=[("out/good1_mask.png", (20, 30)), ("out/good2_mask.png", (24, 16))],
        exists=["out/predictions.csv"],
    ),
)
def _batch(folder: Path, shared: Shared) -> list[str]:
    images = folder / "images"
    write(images / "good1.png", rgb())
    write(images / "good2.png", rgb(24, 16))
    for _, name, make in _IN_FOLDERS:
        write(images / name, make())
    write(images / "notes.txt", b"not an input: skipped by the folder scan\n")
    (images / "gone.png").symlink_to(images / "missing.png")
    return predict(shared, folder, images)


# ---------------------------------------------------------- unusual but valid images: segmented

VALID: list[tuple[str, str, Callable[[], np.ndarray | Image.Image], tuple[int, int]]] = [
    ("1x1 image", "dot.png", lambda: rgb(1, 1), (1, 1)),
    ("3x2000 image", "wide.png", lambda: rgb(3, 2000), (3, 2000)),
    ("2000x3 image", "tall.png", lambda: rgb(2000, 3), (2000, 3)),
    ("CMYK JPEG", "cmyk.jpg", lambda: Image.fromarray(rgb(20, 30)).convert("CMYK"), (20, 30)),
    (
        "16-bit grayscale PNG",
        "deep.png",
        lambda: Image.fromarray((np.arange(600).reshape(20, 30) * 100).astype(np.uint16)),
        (20, 30),
    ),
    ("palette PNG", "palette.png", lambda: Image.fromarray(rgb(20, 30)).convert("P"), (20, 30)),
    ("RGBA PNG", "rgba.png", lambda: Image.fromarray(rgb(20, 30)).convert("RGBA"), (20, 30)),
    ("grayscale + alpha (LA) PNG", "la.png", lambda: Image.fromarray(rgb(20, 30)).convert("LA"), (20, 30)),
    ("1-bit PNG", "bits.png", lambda: Image.fromarray(rgb(20, 30)).convert("1"), (20, 30)),
    ("constant black image", "black.png", lambda: np.zeros((20, 30), np.uint8), (20, 30)),
    (
        "float TIFF (finite)",
        "float.tif",
        lambda: Image.fromarray(np.linspace(-5, 5, 600, dtype=np.float32).reshape(20, 30)),
        (20, 30),
    ),
    ("BMP", "plain.bmp", lambda: rgb(20, 30), (20, 30)),
]


def _valid_case(kind: str, name: str, make: Callable, size: tuple[int, int]) -> None:
    stem = name.split(".")[0]

    @case(kind, "predict", segments(*size, stem))
    def build(folder: Path, shared: Shared) -> list[str]:
        return predict(shared, folder, write(folder / name, make()))


for _kind, _name, _make, _size in VALID:
    _valid_case(_kind, _name, _make, _size)


# ------------------------------------------------- multi-page images and DICOM folders: split up

_PAGES = "out/pages_mask.tif"


@case(
    "multi-page TIFF: a stack, one mask page per page",
    "predict",
    reports(0, "3 slices", masks=[(_PAGES, (20, 30))], exists=["out/pages_montage.png"]),
)
def _tiff_pages(folder: Path, shared: Shared) -> list[str]:
    pages = tiff_bytes(*(Image.fromarray(rgb(seed=i)) for i in range(3)))
    return predict(shared, folder, write(folder / "pages.tif", pages))


@case("animated PNG: a stack of its frames", "predict", reports(0, masks=[("out/anim_mask.tif", (20, 30))]))
def _apng(folder: Path, shared: Shared) -> list[str]:
    return predict(shared, folder, write(folder / "anim.png", _animation("PNG")))


@case("animated GIF: a stack of its frames", "predict", reports(0, masks=[("out/anim_mask.tif", (20, 30))]))
def _gif(folder: Path, shared: Shared) -> list[str]:
    return predict(shared, folder, write(folder / "anim.gif", _animation("GIF", 3)))


@case("--page of a multi-page TIFF", "predict", segments(20, 30, "pages_page1"))
def _one_page(folder: Path, shared: Shared) -> list[str]:
    pages = tiff_bytes(*(Image.fromarray(rgb(seed=i)) for i in range(3)))
    return predict(shared, folder, write(folder / "pages.tif", pages), extra=("--page", "1"))


@case("--page beyond the last page", "predict", fails(3, "pages.tif", "no page 5", "pages 0 to 2"))
def _page_beyond(folder: Path, shared: Shared) -> list[str]:
    pages = tiff_bytes(*(Image.fromarray(rgb(seed=i)) for i in range(3)))
    return predict(shared, folder, write(folder / "pages.tif", pages), extra=("--page", "5"))


@case("--page negative", "predict", fails(2, "--page"))
def _page_negative(folder: Path, shared: Shared) -> list[str]:
    return predict(shared, folder, write(folder / "a.png", rgb()), extra=("--page", "-1"))


@case("--page of a NIfTI volume", "predict", fails(3, "v.nii.gz", "multi-page images", "not NIfTI"))
def _page_of_volume(folder: Path, shared: Shared) -> list[str]:
    volume = write(folder / "v.nii.gz", nifti_gz_bytes(np.ones((8, 8, 3), np.float32)))
    return predict(shared, folder, volume, extra=("--page", "0"))


@case(
    "multi-page TIFF over the stack cap (frames x pixels)",
    "predict",
    fails(
        3, "pages.tif", "too large: 3 pages of 30x20", "over the limit of 1,000", "--page", absent=(_PAGES,)
    ),
    patch=lambda: mock.patch("espmedsam.data.io.MAX_STACK_PIXELS", 1000),
)
def _pages_over_cap(folder: Path, shared: Shared) -> list[str]:
    pages = tiff_bytes(*(Image.fromarray(rgb(seed=i)) for i in range(3)))
    return predict(shared, folder, write(folder / "pages.tif", pages))


@case(
    "a DICOM folder holding two series: one input each",
    "predict",
    reports(
        0,
        "wrote 2 of 2 inputs",
        exists=["out/study_series1_mask.nii.gz", "out/study_series1_montage.png", "out/c_mask.nii.gz"],
    ),
)
def _two_series(folder: Path, shared: Shared) -> list[str]:
    from pydicom.uid import generate_uid

    first = generate_uid()
    write(folder / "study" / "a.dcm", _series_dicom(first, 1, seed=0))
    write(folder / "study" / "b.dcm", _series_dicom(first, 1, seed=1))
    write(folder / "study" / "c.dcm", _series_dicom(generate_uid(), 2, seed=2))  # one file: a 2D image
    return predict(shared, folder, folder / "study")


# ---------------------------------------------------------------------------- predict's options


@case("--modality of no model", "predict", fails(2, "unknown modality 'mri'"))
def _bad_modality(folder: Path, shared: Shared) -> list[str]:
    args = predict(shared, folder, write(folder / "a.png", rgb()))
    args[args.index("-m") + 1] = "mri"
    return args


@case("--backend unknown", "predict", fails(2, "--backend", "tensorrt"))
def _bad_backend(folder: Path, shared: Shared) -> list[str]:
    return predict(shared, folder, write(folder / "a.png", rgb()), extra=("--backend", "tensorrt"))


@case("--batch-size not a number", "predict", reports(2, "--batch-size"))
def _batch_abc(folder: Path, shared: Shared) -> list[str]:
    return predict(shared, folder, write(folder / "a.png", rgb()), extra=("--batch-size", "abc"))


@case("--threads negative", "predict", fails(2, "--threads"))
def _threads(folder: Path, shared: Shared) -> list[str]:
    return predict(shared, folder, write(folder / "a.png", rgb()), extra=("--threads", "-2"))


@case("--out names an existing file", "predict", fails(6, "--out", "out", "not a folder"))
def _out_is_file(folder: Path, shared: Shared) -> list[str]:
    (folder / "out").write_text("taken\n")
    return predict(shared, folder, write(folder / "a.png", rgb()))


@case(
    "--out below a file (cannot be created)",
    "predict",
    fails(6, "blocker", "is a file"),
)
def _out_below_file(folder: Path, shared: Shared) -> list[str]:
    (folder / "blocker").write_text("taken\n")
    args = predict(shared, folder, write(folder / "a.png", rgb()))
    args[args.index("--out") + 1] = str(folder / "blocker" / "out")
    return args


@case("an output name taken by a folder", "predict", fails(3, "a_mask.png", "it is a folder"))
def _mask_name_taken(folder: Path, shared: Shared) -> list[str]:
    (folder / "out" / "a_mask.png").mkdir(parents=True)
    return predict(shared, folder, write(folder / "a.png", rgb()))


@case("--out an unwritable folder", "predict", fails(6, "locked", "Permission denied"), non_root=True)
def _out_unwritable(folder: Path, shared: Shared) -> list[str]:
    (folder / "locked").mkdir(mode=0o500)
    args = predict(shared, folder, write(folder / "a.png", rgb()))
    args[args.index("--out") + 1] = str(folder / "locked" / "out")
    return args


@case(
    "disk full while writing masks",
    "predict",
    fails(6, "cannot write", "No space left on device", absent=("out/a_mask.png", "out/predictions.csv")),
    patch=disk_full,
)
def _predict_disk_full(folder: Path, shared: Shared) -> list[str]:
    return predict(shared, folder, write(folder / "a.png", rgb()))


@case(
    "a read-only file system while writing masks",
    "predict",
    fails(6, "cannot write", "Read-only file system", absent=("out/a_mask.png",)),
    patch=read_only_disk,
)
def _predict_read_only(folder: Path, shared: Shared) -> list[str]:
    return predict(shared, folder, write(folder / "a.png", rgb()))


@case(
    "disk full in a batch: every file fails, each named",
    "predict",
    reports(
        6,
        "a_mask.png",
        "b_mask.png",
        "No space left on device",
        "predictions.csv",
        absent=("out/a_mask.png", "out/b_mask.png"),
    ),
    patch=disk_full,
)
def _predict_batch_disk_full(folder: Path, shared: Shared) -> list[str]:
    write(folder / "in" / "a.png", rgb())
    write(folder / "in" / "b.png", rgb(seed=1))
    return predict(shared, folder, folder / "in")


@case("--axis out of range", "predict", fails(2, "axis", "0, 1 or 2"))
def _axis(folder: Path, shared: Shared) -> list[str]:
    volume = write(folder / "v.nii.gz", nifti_gz_bytes(np.ones((8, 8, 3), np.float32)))
    return predict(shared, folder, volume, extra=("--axis", "5"))


@case("--dicom-output of no format", "predict", fails(2, "nifti or seg", "'pdf'"))
def _dicom_output(folder: Path, shared: Shared) -> list[str]:
    return predict(shared, folder, write(folder / "a.png", rgb()), extra=("--dicom-output", "pdf"))


@case(
    "disk full while writing a NIfTI mask",
    "predict",
    fails(6, "cannot write", "No space left on device", absent=("out/v_mask.nii.gz",)),
    patch=disk_full,
)
def _nifti_disk_full(folder: Path, shared: Shared) -> list[str]:
    volume = np.random.default_rng(0).random((12, 10, 3)).astype(np.float32)
    return predict(shared, folder, write(folder / "v.nii.gz", nifti_gz_bytes(volume)))


# ---------------------------------------------------------------------- checkpoints


def _bad_checkpoint_case(kind: str, name: str, make: Callable[[Path, Shared], bytes], says: tuple) -> None:
    @case(kind, "predict", fails(4, name, *says, absent=("out/a_mask.png",)))
    def build(folder: Path, shared: Shared) -> list[str]:
        args = predict(shared, folder, write(folder / "a.png", rgb()))
        args[args.index("-c") + 1] = str(write(folder / name, make(folder, shared)))
        return args


def _unrelated_tensors(folder: Path, shared: Shared) -> bytes:
    import torch
    from safetensors.torch import save

    from espmedsam.models.registry import build_model

    metadata = {"format": "espmedsam", "format_version": "1", "config": build_model("tiny").config.to_json()}
    return save({"conv.weight": torch.zeros(3, 3), "head.bias": torch.zeros(7)}, metadata=metadata)


def _foreign_safetensors(folder: Path, shared: Shared) -> bytes:
    import torch
    from safetensors.torch import save

    return save({"encoder.weight": torch.zeros(4, 4)})


def _torch_file(folder: Path, shared: Shared) -> bytes:
    return shared.sam_pth.read_bytes()


CHECKPOINTS = [
    ("0-byte checkpoint", "empty.safetensors", lambda f, s: b"", ("empty file",)),
    (
        "truncated safetensors",
        "cut.safetensors",
        lambda f, s: s.checkpoint.read_bytes()[:5000],
        ("truncated",),
    ),
    (
        "text file named .safetensors",
        "notes.safetensors",
        lambda f, s: b"these are not the weights\n",
        ("not a safetensors file",),
    ),
    (
        "safetensors with unrelated tensor names and shapes",
        "other.safetensors",
        _unrelated_tensors,
        ("does not fit",),
    ),
    (
        "safetensors of another program",
        "foreign.safetensors",
        _foreign_safetensors,
        ("not an espmedsam checkpoint",),
    ),
    ("a torch .pth given where a native checkpoint is needed", "model.pth", _torch_file, ("torch file",)),
]

for _kind, _name, _make, _says in CHECKPOINTS:
    _bad_checkpoint_case(_kind, _name, _make, _says)


@case("a folder given as the checkpoint", "predict", fails(4, "weights", "not a file"))
def _checkpoint_folder(folder: Path, shared: Shared) -> list[str]:
    args = predict(shared, folder, write(folder / "a.png", rgb()))
    (folder / "weights").mkdir()
    args[args.index("-c") + 1] = str(folder / "weights")
    return args


@case("--backend onnxruntime with a safetensors checkpoint", "predict", fails(2, "--backend onnxruntime"))
def _onnx_needs_onnx(folder: Path, shared: Shared) -> list[str]:
    return predict(shared, folder, write(folder / "a.png", rgb()), extra=("--backend", "onnxruntime"))


@case("an ONNX file that is not ONNX", "predict", fails(4, "fake.onnx"))
def _fake_onnx(folder: Path, shared: Shared) -> list[str]:
    args = predict(shared, folder, write(folder / "a.png", rgb()), extra=("--backend", "onnxruntime"))
    args[args.index("-c") + 1] = str(write(folder / "fake.onnx", b"not a graph\n"))
    return args


def _evil_case(kind: str, command: list[str]) -> None:
    @case(
        kind,
        command[0] + (f" {command[1]}" if len(command) > 1 else ""),
        fails(4, "evil.pth", "code"),
        marker="pwned",
    )
    def build(folder: Path, shared: Shared) -> list[str]:
        path = evil_pth(folder / "evil.pth", folder / "pwned")
        out = str(folder / "out.safetensors")
        args = {
            "sam": ["import", "sam", path, "--out", out],
            "official": ["import", "official", path, "--out", out],
            "mobilesam": ["import", "mobilesam", path, "--out", out],
            "litemedsam": ["import", "litemedsam", path, "--out", out],
        }
        if command[0] == "distill":
            return distill_common(shared, folder, dataset(folder / "d") / "images", teacher=path)
        return [str(a) for a in args[command[1]]]


for _command in (
    ["import", "sam"],
    ["import", "official"],
    ["import", "mobilesam"],
    ["import", "litemedsam"],
    ["distill", "common"],
):
    _evil_case(f"a .pth pickle that runs code ({' '.join(_command)})", _command)


@case("a text file named .pth", "import sam", fails(4, "notes.pth", "not a torch checkpoint"))
def _text_pth(folder: Path, shared: Shared) -> list[str]:
    path = write(folder / "notes.pth", b"hello\n")
    return ["import", "sam", str(path), "--out", str(folder / "t.safetensors")]


@case("a 0-byte .pth", "import official", fails(4, "empty.pth", "empty file"))
def _empty_pth(folder: Path, shared: Shared) -> list[str]:
    path = write(folder / "empty.pth", b"")
    return ["import", "official", str(path), "--out", str(folder / "t.safetensors")]


@case(
    "a SAM checkpoint given as an official ESP-MedSAM one",
    "import official",
    fails(4, "sam.pth", "not an official ESP-MedSAM checkpoint"),
)
def _sam_as_official(folder: Path, shared: Shared) -> list[str]:
    return ["import", "official", str(shared.sam_pth), "--out", str(folder / "t.safetensors")]


@case("a SAM checkpoint given as MobileSAM", "import mobilesam", fails(4, "sam.pth"))
def _sam_as_mobilesam(folder: Path, shared: Shared) -> list[str]:
    return ["import", "mobilesam", str(shared.sam_pth), "--out", str(folder / "t.safetensors")]


@case("a SAM checkpoint given as LiteMedSAM", "import litemedsam", fails(4, "sam.pth", "not a LiteMedSAM"))
def _sam_as_litemedsam(folder: Path, shared: Shared) -> list[str]:
    return ["import", "litemedsam", str(shared.sam_pth), "--out", str(folder / "t.safetensors")]


@case("import --out an existing folder", "import sam", fails(6, "taken", "folder"))
def _import_out_folder(folder: Path, shared: Shared) -> list[str]:
    (folder / "taken").mkdir()
    return ["import", "sam", str(shared.sam_pth), "--out", str(folder / "taken")]


@case("an ESP-MedSAM checkpoint given as the teacher", "distill common", fails(4, "not a teacher"))
def _student_as_teacher(folder: Path, shared: Shared) -> list[str]:
    return distill_common(shared, folder, dataset(folder / "d") / "images", teacher=shared.checkpoint)


@case(
    "a U-Net checkpoint given as the student",
    "distill modality",
    fails(4, "unet.safetensors", "not an espmedsam checkpoint"),
)
def _unet_student(folder: Path, shared: Shared) -> list[str]:
    data = f"{dataset(folder / 'd')}:{MODALITY}"
    return [
        "distill",
        "modality",
        "-t",
        str(shared.teacher),
        "-d",
        data,
        "--student",
        str(shared.unet),
        "--device",
        "cpu",
        "--out",
        str(folder / "run"),
    ]


@case("distill --out names an existing file", "distill common", fails(6, "run", "is a file"))
def _distill_out_file(folder: Path, shared: Shared) -> list[str]:
    (folder / "run").write_text("taken\n")
    return distill_common(shared, folder, dataset(folder / "d") / "images")


@case("distill on a folder without images", "distill common", fails(3, "nothing", "no images"))
def _distill_no_images(folder: Path, shared: Shared) -> list[str]:
    (folder / "nothing").mkdir()
    return distill_common(shared, folder, folder / "nothing")


@case("distill on a folder with a corrupt image", "distill common", fails(3, "cut.png", "cannot read image"))
def _distill_corrupt(folder: Path, shared: Shared) -> list[str]:
    images = folder / "images"
    write(images / "a.png", rgb(32, 32))
    write(images / "cut.png", png_bytes(rgb(64, 64))[:400])
    return distill_common(shared, folder, images)


@case("distill: malformed YAML recipe", "distill common", fails(2, "bad.yaml", "invalid YAML"))
def _distill_yaml(folder: Path, shared: Shared) -> list[str]:
    config = write(folder / "bad.yaml", b"common: {epochs: 1\n")
    return distill_common(shared, folder, dataset(folder / "d") / "images", "--config", str(config))


@case("distill: a wrong-typed --set", "distill common", fails(2, "held_out", "float"))
def _distill_set(folder: Path, shared: Shared) -> list[str]:
    return distill_common(shared, folder, dataset(folder / "d") / "images", "--set", "held_out=lots")


@case("distill: --student and --init-from together", "distill common", fails(2, "not both"))
def _distill_both(folder: Path, shared: Shared) -> list[str]:
    args = distill_common(shared, folder, dataset(folder / "d") / "images")
    return [*args, "--student", str(shared.checkpoint), "--init-from", str(shared.sam_pth)]


@case("import official into a modality of no model", "import official", fails(2, "unknown modality 'mri'"))
def _import_modality(folder: Path, shared: Shared) -> list[str]:
    return ["import", "official", str(shared.sam_pth), "-m", "mri", "--out", str(folder / "t.safetensors")]


# ----------------------------------------------------------------------------------- export


@case("export a 0-byte checkpoint", "export", fails(4, "empty.safetensors", "empty file"))
def _export_empty(folder: Path, shared: Shared) -> list[str]:
    path = write(folder / "empty.safetensors", b"")
    return ["export", str(path), "--out", str(folder / "ship.safetensors")]


@case("export a U-Net checkpoint to ONNX", "export", fails(2, "U-Net"))
def _export_unet_onnx(folder: Path, shared: Shared) -> list[str]:
    return ["export", str(shared.unet), "--format", "onnx", "--out", str(folder / "m.onnx")]


@case("export --out an existing folder", "export", fails(6, "taken", "folder"))
def _export_out_folder(folder: Path, shared: Shared) -> list[str]:
    (folder / "taken").mkdir()
    return ["export", str(shared.checkpoint), "--out", str(folder / "taken")]


@case("export to ONNX --out below a file", "export", fails(6, "blocker", "is a file"))
def _export_onnx_out(folder: Path, shared: Shared) -> list[str]:
    (folder / "blocker").write_text("taken\n")
    return ["export", str(shared.checkpoint), "--format", "onnx", "--out", str(folder / "blocker" / "m.onnx")]


@case("export --format of no kind", "export", fails(2, "--format", "tflite"))
def _export_format(folder: Path, shared: Shared) -> list[str]:
    return ["export", str(shared.checkpoint), "--format", "tflite", "--out", str(folder / "m.tflite")]


@case("export --input-size without =", "export", fails(2, "--input-size", "MODALITY=SIZE"))
def _export_input_size(folder: Path, shared: Shared) -> list[str]:
    out = str(folder / "s.safetensors")
    return ["export", str(shared.checkpoint), "--out", out, "--input-size", "fundus"]


@case("export --input-size of an unknown modality", "export", fails(2, "unknown modality", "mri"))
def _export_input_modality(folder: Path, shared: Shared) -> list[str]:
    out = str(folder / "s.safetensors")
    return ["export", str(shared.checkpoint), "--out", out, "--input-size", "mri=64"]


@case(
    "disk full while exporting",
    "export",
    fails(6, "cannot write", "ship.safetensors", "No space left on device", absent=("ship.safetensors",)),
    patch=disk_full,
)
def _export_disk_full(folder: Path, shared: Shared) -> list[str]:
    return ["export", str(shared.checkpoint), "--out", str(folder / "ship.safetensors")]


@case(
    "permission denied while exporting (EACCES)",
    "export",
    fails(6, "cannot write", "ship.safetensors", "Permission denied", absent=("ship.safetensors",)),
    patch=write_denied,
)
def _export_denied(folder: Path, shared: Shared) -> list[str]:
    return ["export", str(shared.checkpoint), "--out", str(folder / "ship.safetensors")]


@case(
    "disk full while importing",
    "import sam",
    fails(6, "cannot write", "t.safetensors", "No space left on device", absent=("t.safetensors",)),
    patch=disk_full,
)
def _import_disk_full(folder: Path, shared: Shared) -> list[str]:
    return ["import", "sam", str(shared.sam_pth), "--out", str(folder / "t.safetensors")]


# ------------------------------------------------------------------------------------ evaluate


@case(
    "evaluate: an unreadable image among good ones",
    "evaluate",
    reports(3, "cut.png", "1 of 4 images failed", exists=["out/summary.json", "out/per_image.csv"]),
)
def _evaluate_bad_image(folder: Path, shared: Shared) -> list[str]:
    root = dataset(folder / "set")
    (root / "images" / "c.png").unlink()
    write(root / "images" / "cut.png", png_bytes(rgb(64, 64))[:400])
    (root / "masks" / "c.png").rename(root / "masks" / "cut.png")
    (root / "split.json").write_text(json.dumps({"test": ["a", "b", "cut", "d"]}))
    return evaluate(shared, folder, f"{root}:{MODALITY}", "--split", "test")


@case(
    "evaluate: a mask of another size than its image",
    "evaluate",
    reports(3, "b.png", "mask size", "1 of 4 images failed", exists=["out/summary.json"]),
)
def _evaluate_mask_size(folder: Path, shared: Shared) -> list[str]:
    root = dataset(folder / "set")
    write(root / "masks" / "b.png", _square((10, 10)))
    return evaluate(shared, folder, f"{root}:{MODALITY}")


@case("evaluate: a missing mask", "evaluate", fails(3, "no mask of stem 'b'", absent=("out",)))
def _evaluate_missing_mask(folder: Path, shared: Shared) -> list[str]:
    root = dataset(folder / "set")
    (root / "masks" / "b.png").unlink()
    return evaluate(shared, folder, f"{root}:{MODALITY}")


@case("evaluate: split.json naming missing stems", "evaluate", fails(3, "'ghost'"))
def _evaluate_ghost(folder: Path, shared: Shared) -> list[str]:
    root = dataset(folder / "set", split={"test": ["a", "ghost"]})
    return evaluate(shared, folder, f"{root}:{MODALITY}", "--split", "test")


@case("evaluate: split.json that is not JSON", "evaluate", fails(3, "split.json", "invalid JSON"))
def _evaluate_bad_json(folder: Path, shared: Shared) -> list[str]:
    root = dataset(folder / "set", split='{"test": ["a", ')
    return evaluate(shared, folder, f"{root}:{MODALITY}", "--split", "test")


@case("evaluate: an empty images/ folder", "evaluate", fails(3, "no images"))
def _evaluate_empty(folder: Path, shared: Shared) -> list[str]:
    root = folder / "set"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    return evaluate(shared, folder, f"{root}:{MODALITY}", "--split", "all")


@case(
    "evaluate: DIR:MODALITY of a modality the model lacks",
    "evaluate",
    fails(2, "set", "modality 'mri' is not one of the model's"),
)
def _evaluate_modality(folder: Path, shared: Shared) -> list[str]:
    return evaluate(shared, folder, f"{dataset(folder / 'set')}:mri")


@case("evaluate: an unknown split", "evaluate", fails(3, "unknown split 'holdout'"))
def _evaluate_split(folder: Path, shared: Shared) -> list[str]:
    return evaluate(shared, folder, f"{dataset(folder / 'set')}:{MODALITY}", "--split", "holdout")


@case("evaluate: --out names an existing file", "evaluate", fails(6, "--out", "not a folder"))
def _evaluate_out_file(folder: Path, shared: Shared) -> list[str]:
    (folder / "out").write_text("taken\n")
    return evaluate(shared, folder, f"{dataset(folder / 'set')}:{MODALITY}")


@case(
    "evaluate: disk full while writing the report",
    "evaluate",
    fails(6, "cannot write", "No space left on device", absent=("out/summary.json", "out/per_image.csv")),
    patch=disk_full,
)
def _evaluate_disk_full(folder: Path, shared: Shared) -> list[str]:
    return evaluate(shared, folder, f"{dataset(folder / 'set')}:{MODALITY}")


@case("evaluate: an unknown --protocol", "evaluate", fails(2, "unknown protocol 'kaggle'"))
def _evaluate_protocol(folder: Path, shared: Shared) -> list[str]:
    return evaluate(shared, folder, f"{dataset(folder / 'set')}:{MODALITY}", "--protocol", "kaggle")


@case("evaluate: a dataset folder that does not exist", "evaluate", fails(3, "nowhere", "not found"))
def _evaluate_missing(folder: Path, shared: Shared) -> list[str]:
    return evaluate(shared, folder, f"{folder / 'nowhere'}:{MODALITY}")


# ------------------------------------------------------------------------------------ data check


def _check(*roots: Path) -> list[str]:
    return ["data", "check", *map(str, roots)]


@case("data check: a non-binary mask (a warning)", "data check", reports(0, "mask not binary"))
def _check_non_binary(folder: Path, shared: Shared) -> list[str]:
    labels = np.zeros((24, 32), np.uint8)
    labels[2:8, 2:8], labels[10:20, 10:20] = 1, 2
    return _check(dataset(folder / "set", mask=labels))


@case("data check: an image with no mask", "data check", reports(3, "e: image without mask"))
def _check_no_mask(folder: Path, shared: Shared) -> list[str]:
    root = dataset(folder / "set")
    write(root / "images" / "e.png", rgb(24, 32))
    return _check(root)


@case("data check: a mask of another size", "data check", reports(3, "b: image is 32x24 but mask is 10x10"))
def _check_mask_size(folder: Path, shared: Shared) -> list[str]:
    root = dataset(folder / "set")
    write(root / "masks" / "b.png", _square((10, 10)))
    return _check(root)


@case(
    "data check: an unreadable image among good ones",
    "data check",
    reports(3, "images/b.png", "images/c.png", "unreadable", "empty file", "limit", "2 errors"),
)
def _check_unreadable(folder: Path, shared: Shared) -> list[str]:
    root = dataset(folder / "set")
    write(root / "images" / "b.png", b"")
    write(root / "images" / "c.png", png_claiming(60000, 60000))
    return _check(root)


@case("data check: split.json naming missing stems", "data check", reports(3, "ghost", "has no files"))
def _check_ghost(folder: Path, shared: Shared) -> list[str]:
    return _check(dataset(folder / "set", split={"train": ["a", "b", "ghost"], "test": ["c", "d"]}))


@case("data check: split.json that is a list", "data check", reports(3, "split.json", "expected"))
def _check_split_list(folder: Path, shared: Shared) -> list[str]:
    return _check(dataset(folder / "set", split=["a", "b"]))


@case("data check: an empty images/ folder", "data check", reports(3, "no image/mask pairs"))
def _check_empty(folder: Path, shared: Shared) -> list[str]:
    root = folder / "set"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    return _check(root)


@case("data check: a file, not a folder", "data check", fails(3, "set.zip", "dataset folder not found"))
def _check_file(folder: Path, shared: Shared) -> list[str]:
    return _check(write(folder / "set.zip", b"PK\x03\x04"))


# ------------------------------------------------------------------------------------ data import


@case("data import: a source folder that does not exist", "data import", fails(3, "nowhere", "not found"))
def _import_missing(folder: Path, shared: Shared) -> list[str]:
    return ["data", "import", "--format", "kvasir", str(folder / "nowhere"), str(folder / "out")]


@case("data import: the output is a file", "data import", fails(6, "out.txt", "not a folder"))
def _import_dst_file(folder: Path, shared: Shared) -> list[str]:
    source = dataset(folder / "src", split=None)
    write(folder / "out.txt", b"taken\n")
    return ["data", "import", "--format", "kvasir", str(source), str(folder / "out.txt")]


@case("data import: an unknown --format", "data import", fails(2, "unknown dataset format 'coco'"))
def _import_format(folder: Path, shared: Shared) -> list[str]:
    return ["data", "import", "--format", "coco", str(dataset(folder / "src")), str(folder / "out")]


@case("data import: --max-side 0", "data import", fails(2, "--max-side", "positive"))
def _import_max_side(folder: Path, shared: Shared) -> list[str]:
    source = dataset(folder / "src", split=None)
    return ["data", "import", "--format", "kvasir", str(source), str(folder / "out"), "--max-side", "0"]


@case(
    "data import: a corrupt image among good ones (skipped, listed)",
    "data import",
    reports(0, "skipped 1 items", exists=["out/SOURCE.md", "out/masks/a.png"]),
)
def _import_corrupt(folder: Path, shared: Shared) -> list[str]:
    source = dataset(folder / "src", split=None)
    write(source / "images" / "b.png", b"")
    return ["data", "import", "--format", "kvasir", str(source), str(folder / "out")]


# ----------------------------------------------------------------------------------------- train


@case("train: malformed YAML", "train", fails(2, "bad.yaml", "line"))
def _train_yaml(folder: Path, shared: Shared) -> list[str]:
    config = write(folder / "bad.yaml", b"epochs: [1, 2\nlr: : 3\n")
    return ["train", "--config", str(config)]


@case("train: YAML that is a list", "train", fails(2, "list.yaml", "mapping"))
def _train_yaml_list(folder: Path, shared: Shared) -> list[str]:
    return ["train", "--config", str(write(folder / "list.yaml", b"- epochs\n- 3\n"))]


@case("train: an unknown config key", "train", fails(2, "unknown config key 'epoch'"))
def _train_unknown_key(folder: Path, shared: Shared) -> list[str]:
    return ["train", "--config", str(write(folder / "c.yaml", b"epoch: 3\n"))]


@case("train: a wrong-typed value (batch_size=abc)", "train", fails(2, "batch_size", "abc"))
def _train_wrong_type(folder: Path, shared: Shared) -> list[str]:
    return ["train", "--set", "batch_size=abc"]


@case("train: --set without '='", "train", fails(2, "'epochs'", "key=value"))
def _train_no_equals(folder: Path, shared: Shared) -> list[str]:
    return ["train", "--set", "epochs"]


@case("train: a missing config file", "train", fails(2, "missing.yaml", "neither a file"))
def _train_missing_config(folder: Path, shared: Shared) -> list[str]:
    return ["train", "--config", str(folder / "missing.yaml")]


@case(
    "train: data of a modality the model lacks", "train", fails(2, "modality 'mri' is not one of the model's")
)
def _train_modality(folder: Path, shared: Shared) -> list[str]:
    return train(folder, f"{dataset(folder / 'set')}:mri")


@case("train: split.json that is a list", "train", fails(3, "split.json", "expected"))
def _train_split_list(folder: Path, shared: Shared) -> list[str]:
    return train(folder, f"{dataset(folder / 'set', split=['a', 'b'])}:{MODALITY}")


@case("train: an empty images/ folder", "train", fails(3, "set", "no images"))
def _train_empty(folder: Path, shared: Shared) -> list[str]:
    root = folder / "set"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "split.json").write_text(json.dumps({"train": [], "val": []}))
    return train(folder, f"{root}:{MODALITY}")


@case("train: a mask of another size than its image", "train", fails(3, "a.png", "mask size"))
def _train_mask_size(folder: Path, shared: Shared) -> list[str]:
    root = dataset(folder / "set", stems=("a",))
    write(root / "masks" / "a.png", _square((10, 10)))
    return train(folder, f"{root}:{MODALITY}", "val_split=null")


@case("train: --init a text file", "train", fails(4, "init.safetensors", "not a safetensors file"))
def _train_init(folder: Path, shared: Shared) -> list[str]:
    init = write(folder / "init.safetensors", b"nope\n")
    return [*train(folder, f"{dataset(folder / 'set')}:{MODALITY}"), "--init", str(init)]


@case(
    "train: disk full when the run starts",
    "train",
    fails(6, "cannot write", "config.yaml", "No space left on device"),
    patch=disk_full,
)
def _train_disk_full(folder: Path, shared: Shared) -> list[str]:
    return train(folder, f"{dataset(folder / 'set')}:{MODALITY}")


@case(
    "data import: disk full while converting",
    "data import",
    fails(6, "cannot write", "out/images/a.png", "No space left on device", absent=("out",)),
    patch=disk_full,
)
def _import_full(folder: Path, shared: Shared) -> list[str]:
    source = dataset(folder / "src", split=None)
    return ["data", "import", "--format", "kvasir", str(source), str(folder / "out")]


@case("train: --resume without a previous run", "train", fails(4, "state.pt"))
def _train_resume(folder: Path, shared: Shared) -> list[str]:
    return [*train(folder, f"{dataset(folder / 'set')}:{MODALITY}"), "--resume"]


@case("train: no data", "train", fails(2, "no dataset folders"))
def _train_no_data(folder: Path, shared: Shared) -> list[str]:
    return ["train", "--set", "model=tiny"]


@case("train: out_dir is a file", "train", fails(6, "run", "is a file"))
def _train_out_file(folder: Path, shared: Shared) -> list[str]:
    (folder / "run").write_text("taken\n")
    return train(folder, f"{dataset(folder / 'set')}:{MODALITY}")
