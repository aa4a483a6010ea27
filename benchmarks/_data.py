"""The datasets the benchmarks read: ``data/<name>`` folders (a link to the shared datasets)."""

from __future__ import annotations

from pathlib import Path

from espmedsam.data.dataset import KNOWN_DATASETS, parse_dataset_arg, read_split

IN_DOMAIN = ("isic2017", "shenzhen_montgomery", "busi", "drive", "dsb2018", "cvc_clinicdb")
EXTRA = ("busbra", "monusac")


def split_images(names: tuple[str, ...], split: str, root: Path = Path("data")) -> list[tuple[Path, str]]:
    """(image path, modality) of every image of ``split`` in the named dataset folders."""
    found = []
    for name in names:
        source = parse_dataset_arg(str(root / name))
        images = {p.stem: p for p in (source.root / "images").iterdir()}
        found += [(images[stem], KNOWN_DATASETS[name]) for stem in read_split(source.root)[split]]
    return found
