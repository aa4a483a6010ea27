from __future__ import annotations

import pytest

from espmedsam.files import atomic_write, write_text


def test_write_text_replaces_atomically(tmp_path):
    path = write_text(tmp_path / "sub" / "a.txt", "héllo")
    assert path.read_text(encoding="utf-8") == "héllo"
    write_text(path, "second")
    assert path.read_text() == "second"
    assert [p.name for p in path.parent.iterdir()] == ["a.txt"]


def test_failed_write_keeps_old_file_and_no_temporary(tmp_path):
    path = write_text(tmp_path / "a.txt", "old")

    def fail(file):
        file.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, fail)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
