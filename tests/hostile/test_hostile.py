"""Bad and unusual inputs for every command (``corpus.CASES``): bad input gives one ``error:`` line and
its exit code, never a traceback nor a partial output; unusual but valid images are segmented at their
own size."""

from __future__ import annotations

import errno
import re
from pathlib import Path

import corpus
import pytest

import espmedsam


def _id(item: corpus.Case) -> str:
    return re.sub(r"[^a-z0-9]+", "-", item.kind.lower()).strip("-")


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> corpus.Shared:
    return corpus.Shared(tmp_path_factory.mktemp("hostile-shared"))


@pytest.mark.parametrize("item", corpus.CASES, ids=[_id(item) for item in corpus.CASES])
def test_hostile_input(item: corpus.Case, shared: corpus.Shared, tmp_path: Path) -> None:
    if item.non_root and corpus.is_root():
        pytest.skip("file permissions do not bind root (the EACCES cases simulate them)")
    outcome = corpus.run_case(item, tmp_path, shared)
    problems = corpus.check(item, outcome, tmp_path)
    assert not problems, f"{'; '.join(problems)}\n--- stdout\n{outcome.stdout}--- stderr\n{outcome.stderr}"


def test_the_corpus_has_forty_distinct_kinds_over_every_command() -> None:
    kinds = [item.kind for item in corpus.CASES]
    assert len(set(kinds)) == len(kinds) >= 40
    commands = {item.command.split()[0] for item in corpus.CASES}
    assert commands >= {"predict", "evaluate", "train", "data", "import", "distill", "export"}


@pytest.mark.parametrize(
    "code, message, exit_code",
    [
        (errno.ENOSPC, "error: cannot write {root}: No space left on device", 6),
        (errno.EROFS, "error: cannot write {root}: Read-only file system", 6),
        (errno.EACCES, "error: {root}: Permission denied", 1),
    ],
)
def test_an_os_error_no_library_code_named_is_one_line(tmp_path, monkeypatch, code, message, exit_code):
    import espmedsam.data.check as check

    def fail(root):
        raise OSError(code, __import__("os").strerror(code), str(root))

    monkeypatch.setattr(check, "check_dataset", fail)
    outcome = corpus.run_cli(["data", "check", str(tmp_path)])
    assert outcome.code == exit_code
    assert outcome.stderr == message.format(root=tmp_path) + "\n"
    debug = corpus.run_cli(["--debug", "data", "check", str(tmp_path)])
    assert "Traceback (most recent call last)" in debug.stderr  # --debug still shows where it came from


def test_checkpoints_are_never_unpickled_with_code() -> None:
    """Every torch.load in the package passes weights_only=True; nothing calls pickle.load(s)."""
    for path in Path(espmedsam.__file__).parent.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"\bpickle\.loads?\(", text), path
        for call in re.finditer(r"torch\.load\(", text):
            arguments = text[call.end() : text.index(")", call.end())]
            assert "weights_only=True" in arguments, f"{path}: torch.load({arguments})"


def test_a_failed_write_is_an_output_error_that_is_still_an_os_error(tmp_path) -> None:
    from espmedsam.errors import OutputError
    from espmedsam.files import write_text

    with corpus.disk_full(), pytest.raises(OutputError, match="cannot write .*a.txt: No space left") as info:
        write_text(tmp_path / "a.txt", "some text")
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary
