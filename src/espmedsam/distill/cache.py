"""Teacher-embedding cache: each (image content, input size, variant) is embedded once, kept on disk.

Layout: ``ROOT/<teacher fingerprint>/<size>/<digest[:2]>/<digest>_v<variant>.npy``, float16
(256 x S/16 x S/16: 128 KiB at 256², 2 MiB at 1024²). Every file is written atomically, so an interrupted
build leaves only complete entries and the next run computes just the missing ones. ``.npy`` rather than
safetensors shards: one small file per entry is what makes the build resumable without an index, and
``numpy.load`` reads it with no parsing beyond a 128-byte header.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from espmedsam.files import atomic_write, write_text


def weights_fingerprint(described: object, tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """16 hex digits of SHA-256 over ``repr(described)`` and the named ``tensors`` in the order given
    (names and float32 bytes): the key of a cache whose entries those weights made."""
    digest = hashlib.sha256(repr(described).encode())
    for name, tensor in tensors:
        digest.update(name.encode())
        digest.update(tensor.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class CacheKey:
    digest: str  # SHA-256 of the image file's bytes
    size: int  # model input side S
    variant: int  # flip/rotation variant (0: as is)


class EmbeddingCache:
    """The embeddings of one teacher (``fingerprint``) under ``root``; ``describe`` goes to teacher.json."""

    def __init__(self, root: str | Path, fingerprint: str, describe: dict | None = None) -> None:
        self.dir = Path(root) / fingerprint
        if describe is not None and not (self.dir / "teacher.json").is_file():
            write_text(self.dir / "teacher.json", json.dumps(describe, indent=2))

    suffix = ".npy"  # one entry's file type; subclasses storing more than an embedding change it

    def path(self, key: CacheKey) -> Path:
        return self.dir / str(key.size) / key.digest[:2] / f"{key.digest}_v{key.variant}{self.suffix}"

    def __contains__(self, key: CacheKey) -> bool:
        return self.path(key).is_file()

    def get(self, key: CacheKey) -> torch.Tensor:
        """The stored (C, h, w) embedding as float32. Raises FileNotFoundError when absent."""
        return torch.from_numpy(np.load(self.path(key)).astype(np.float32))

    def put(self, key: CacheKey, embedding: torch.Tensor) -> Path:
        """Store a (C, h, w) embedding as float16, atomically."""
        buffer = io.BytesIO()
        np.save(buffer, embedding.detach().to(torch.float16).cpu().numpy())
        return atomic_write(self.path(key), lambda file: file.write(buffer.getvalue()))

    def missing(self, keys: Sequence[CacheKey]) -> list[CacheKey]:
        return [key for key in keys if key not in self]

    def size_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.dir.rglob(f"*{self.suffix}"))


def fill(
    cache: EmbeddingCache,
    jobs: Sequence[tuple[CacheKey, Callable[[], torch.Tensor]]],
    embed: Callable[[torch.Tensor], torch.Tensor],
    *,
    batch_size: int,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Embed and store every job whose key is missing; returns how many were computed.

    Under torchrun every rank calls this with the same jobs and embeds every N-th batch of the missing
    ones (the batches of one process, so the same stored values); all return once every entry is written.

    Args:
        jobs: (key, function returning the (3, S, S) input) pairs; inputs are built only when missing.
        embed: the teacher, (B, 3, S, S) -> (B, C, h, w).
        progress: called with (done, total missing) after each batch (this rank's share under torchrun).
    """
    from espmedsam.train import distributed  # here: the training package imports this module

    todo = list({key: make for key, make in jobs if key not in cache}.items())  # each key once

    def chunks(items: list) -> list[list]:
        return [items[start : start + batch_size] for start in range(0, len(items), batch_size)]

    def missing() -> list[list]:
        return chunks([(key, make) for key, make in todo if key not in cache])

    distributed.fill_together(chunks(todo), lambda chunk: _store(cache, chunk, embed), missing, progress)
    return len(todo)


def _store(cache: EmbeddingCache, chunk: list, embed: Callable[[torch.Tensor], torch.Tensor]) -> int:
    """Embed one batch of (key, input function) jobs and store each entry; returns how many."""
    embeddings = embed(torch.stack([make() for _, make in chunk]))
    for (key, _), embedding in zip(chunk, embeddings, strict=True):
        cache.put(key, embedding)
    return len(chunk)
