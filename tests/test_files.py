from __future__ import annotations

import pytest

from espmedsam.files import atomic_write, remove_stale_temporaries, write_text


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


def test_stale_temporaries_of_a_killed_writer_are_removed(tmp_path):
    keep = write_text(tmp_path / "state.pt", "whole")
    stale = tmp_path / ".state.pt.0123456789ab.tmp"
    stale.write_text("half")
    other = tmp_path / ".hidden.tmp"  # not a name atomic_write makes
    other.write_text("mine")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden.tmp", "state.pt"]
    assert keep.read_text() == "whole"
    assert remove_stale_temporaries(tmp_path / "missing") == []
