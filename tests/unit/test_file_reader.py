"""FileReader, the DocumentReader adapter: inline content checks, and file
references read through infra.extract under the allowed roots."""

from __future__ import annotations

from pathlib import Path

import pytest

from domain.errors import DocumentError
from infra.extract import ExtractLimits
from infra.extract.reader import FileReader


def test_inline_content_passes_with_its_mime_type(tmp_path: Path) -> None:
    reader = FileReader([tmp_path])
    assert reader.read("hello", None, None) == ("hello", "text/plain")
    assert reader.read("# hi", None, "text/markdown") == ("# hi", "text/markdown")


@pytest.mark.parametrize(
    ("content", "reason"),
    [(" \n ", "the document is empty"), ("x" * 11, "above the limit of 10")],
)
def test_inline_content_is_refused(tmp_path: Path, content: str, reason: str) -> None:
    reader = FileReader([tmp_path], ExtractLimits(max_chars=10))
    with pytest.raises(DocumentError, match=reason):
        reader.read(content, None, None)


def test_a_file_under_an_allowed_root_is_extracted(tmp_path: Path) -> None:
    path = tmp_path / "a.md"
    path.write_text("# Title\n\nSome *text*.")
    text, mime = FileReader([tmp_path]).read(None, path.as_uri(), None)
    assert "Title" in text and "*" not in text
    assert mime == "text/markdown"


def test_a_file_outside_the_allowed_roots_is_refused(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    with pytest.raises(DocumentError, match="outside the allowed roots"):
        FileReader([tmp_path / "root"]).read(None, outside.as_uri(), None)


def test_neither_content_nor_uri_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DocumentError, match="neither content nor uri"):
        FileReader([tmp_path]).read(None, None, None)
