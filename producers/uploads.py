"""Uploading files into the shared database before their events are published,
so a parse worker on any machine can read them (the ``kbstream-upload:``
claim check of domain/claim_check.py). Only the latest upload of a document is
kept; split deletes it with the document."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from domain.claim_check import upload_key, upload_prefix, upload_uri
from domain.documents import DocKey
from domain.errors import KbstreamError
from domain.ports import UnitOfWorkFactory

# bytes per write unit of work: big enough to batch many small files into one
# commit, small enough to bound what the publisher holds in memory at once
UNIT_BYTES = 32 * 1024 * 1024


class UploadError(KbstreamError):
    """A file cannot be uploaded; the message says which one and what to do."""


@dataclass(frozen=True)
class Uploaded:
    uri: str  # kbstream-upload:<key>
    content_hash: str  # sha256 of the bytes uploaded (the file may have changed since)
    size: int


def _too_large(path: Path, size: int, max_bytes: int) -> UploadError:
    return UploadError(
        f"{path} is {size:,} bytes, above the limit of {max_bytes:,} "
        "(KBSTREAM_MAX_DOCUMENT_BYTES); nothing was published: split the file or "
        "ask the operator to raise the limit"
    )


def check_sizes(items: Sequence[tuple[DocKey, Path]], max_bytes: int) -> None:
    """Fail before anything is uploaded when a file is over the limit."""
    for _, path in items:
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise UploadError(f"cannot read {path}: {exc.strerror}") from exc
        if size > max_bytes:
            raise _too_large(path, size, max_bytes)


def read_bounded(path: Path, max_bytes: int) -> bytes:
    """The file's bytes; refused past ``max_bytes`` even if it grew since stat()."""
    try:
        with path.open("rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise UploadError(f"{path} is not a regular file")
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise UploadError(f"cannot read {path}: {exc.strerror}") from exc
    if len(data) > max_bytes:
        raise _too_large(path, len(data), max_bytes)
    return data


def upload_files(
    uow: UnitOfWorkFactory, items: Sequence[tuple[DocKey, Path]], max_bytes: int
) -> dict[DocKey, Uploaded]:
    """Store each document's file in the payload store, replacing its earlier
    upload, and commit before returning: the events naming the uploads may be
    published only after that."""
    check_sizes(items, max_bytes)
    out: dict[DocKey, Uploaded] = {}
    i = 0
    while i < len(items):
        held = 0
        with uow() as unit:
            while i < len(items) and held < UNIT_BYTES:
                key, path = items[i]
                i += 1
                data = read_bounded(path, max_bytes)
                digest = hashlib.sha256(data).hexdigest()
                payload_key = upload_key(key, digest)
                unit.payloads.put(payload_key, data, replace_prefix=upload_prefix(key))
                out[key] = Uploaded(upload_uri(payload_key), digest, len(data))
                held += len(data)
            unit.commit()
    return out


def existing_upload(uow: UnitOfWorkFactory, key: DocKey, content_hash: str | None) -> str | None:
    """The upload uri of this content of the document, if it is still stored."""
    if not content_hash:
        return None
    payload_key = upload_key(key, content_hash)
    with uow(readonly=True) as unit:
        found = unit.payloads.get(payload_key) is not None
    return upload_uri(payload_key) if found else None
