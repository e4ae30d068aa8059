"""Uploading files into the payload store before publishing (producers/uploads.py)
and the kbstream-upload: scheme (domain/claim_check.py), over the in-memory unit of work."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from domain.claim_check import upload_key, upload_payload_key, upload_uri
from domain.documents import DocKey
from domain.errors import DocumentError
from producers import uploads
from producers.uploads import UploadError, existing_upload, upload_files
from tests.fakes import InMemoryUnitOfWorkFactory

A = DocKey("t", "ds", "a")
B = DocKey("t", "ds", "b")


def stored(uow: InMemoryUnitOfWorkFactory) -> dict[str, bytes]:
    return dict(uow.state.payloads)


def test_files_are_uploaded_under_their_hash_and_replace_the_earlier_upload(
    tmp_path: Path,
) -> None:
    uow = InMemoryUnitOfWorkFactory()
    a, b = tmp_path / "a.md", tmp_path / "b.txt"
    a.write_bytes(b"first")
    b.write_bytes(b"bee")
    done = upload_files(uow, [(A, a), (B, b)], max_bytes=100)
    first = hashlib.sha256(b"first").hexdigest()
    assert done[A].uri == f"kbstream-upload:{upload_key(A, first)}"
    assert (done[A].content_hash, done[A].size) == (first, 5)
    a.write_bytes(b"second")
    again = upload_files(uow, [(A, a)], max_bytes=100)
    second = hashlib.sha256(b"second").hexdigest()
    assert again[A].content_hash == second
    assert stored(uow) == {  # only the latest upload of a; b untouched
        upload_key(A, second): b"second",
        upload_key(B, hashlib.sha256(b"bee").hexdigest()): b"bee",
    }
    assert existing_upload(uow, A, second) == again[A].uri
    assert existing_upload(uow, A, first) is None
    assert existing_upload(uow, A, None) is None


def test_a_file_over_the_limit_fails_before_anything_is_uploaded(tmp_path: Path) -> None:
    uow = InMemoryUnitOfWorkFactory()
    small, big = tmp_path / "small.txt", tmp_path / "big.txt"
    small.write_bytes(b"ok")
    big.write_bytes(b"x" * 11)
    with pytest.raises(UploadError) as exc:
        upload_files(uow, [(A, small), (B, big)], max_bytes=10)
    assert str(exc.value).startswith(
        f"{big} is 11 bytes, above the limit of 10 (KBSTREAM_MAX_DOCUMENT_BYTES); "
        "nothing was published"
    )
    assert stored(uow) == {} and uow.commits == 0


def test_many_files_are_committed_in_bounded_units(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(uploads, "UNIT_BYTES", 8)
    uow = InMemoryUnitOfWorkFactory()
    items = []
    for i in range(5):
        path = tmp_path / f"{i}.txt"
        path.write_bytes(b"12345")
        items.append((DocKey("t", "ds", str(i)), path))
    assert len(upload_files(uow, items, max_bytes=100)) == 5
    assert uow.commits == 3 and len(stored(uow)) == 5  # 2 + 2 + 1 files


def test_the_scheme_names_only_the_events_own_document() -> None:
    key = upload_key(A, hashlib.sha256(b"abc").hexdigest())
    assert upload_payload_key(upload_uri(key), A) == key
    assert upload_payload_key("file:///tmp/a.md", A) is None
    assert upload_payload_key(None, A) is None
    with pytest.raises(DocumentError, match="is not an upload of document t/ds/b"):
        upload_payload_key(upload_uri(key), B)
