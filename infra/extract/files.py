"""Reading a claim-check file reference from local or mounted storage, safely."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote, urlsplit

from domain.errors import UnparseableDocument

from .model import brief, too_large


def _path_from_uri(uri: str) -> Path:
    if uri.startswith("/"):
        return Path(uri)
    parts = urlsplit(uri)
    if not parts.scheme:
        raise UnparseableDocument(
            f"cannot read document reference {uri!r}: it is a relative path; "
            "use an absolute path or a file:// URI"
        )
    if parts.scheme.lower() != "file":
        raise UnparseableDocument(
            f"cannot read document reference {uri!r}: scheme {parts.scheme} is not supported; "
            "use a file:// URI or an absolute path"
        )
    if parts.netloc not in ("", "localhost"):
        raise UnparseableDocument(
            f"cannot read document reference {uri!r}: host {parts.netloc} is not this machine; "
            "use file:///absolute/path"
        )
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise UnparseableDocument(
            f"cannot read document reference {uri!r}: the path is not absolute"
        )
    return Path(path)


def resolve_file_reference(uri: str, allowed_roots: Sequence[Path]) -> tuple[Path, Path]:
    """The path a file:// URI (or plain absolute path) names and where it resolves
    (symlinks and '..' followed); UnparseableDocument unless that is under one of
    ``allowed_roots``. Reads nothing: parse and `verify --repair` share this check."""
    requested = _path_from_uri(uri)
    if "\x00" in str(requested):
        raise UnparseableDocument(f"cannot read document reference {uri!r}: NUL in path")
    try:
        resolved = requested.resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: symlink loop
        raise UnparseableDocument(f"cannot resolve path {requested}: {brief(exc)}") from exc
    if not allowed_roots:
        raise UnparseableDocument(
            "no allowed roots are configured (KBSTREAM_ALLOWED_ROOTS), so file references "
            "cannot be read; ask the operator to set it"
        )
    roots = [Path(root).resolve() for root in allowed_roots]
    if not any(resolved.is_relative_to(root) for root in roots):
        via = f" (resolves to {resolved})" if resolved != requested else ""
        raise UnparseableDocument(
            f"path {requested}{via} is outside the allowed roots (KBSTREAM_ALLOWED_ROOTS); "
            "move the file under an allowed root or ask the operator to add its folder"
        )
    return requested, resolved


def read_file_reference(
    uri: str, allowed_roots: Sequence[Path], max_bytes: int
) -> tuple[bytes, str]:
    """Resolve a file:// URI (or plain absolute path), refuse paths outside allowed_roots
    (after resolving symlinks and '..'), refuse files larger than max_bytes BEFORE reading
    them, and return (bytes, filename).

    The filename is the last component as the reference names it, so a symlink named
    ``report.pdf`` pointing into content-addressed storage keeps its extension.
    """
    requested, resolved = resolve_file_reference(uri, allowed_roots)
    try:
        info = os.stat(resolved)
    except FileNotFoundError as exc:
        raise UnparseableDocument(
            f"file {requested} does not exist; was it moved or deleted before indexing?"
        ) from exc
    except OSError as exc:
        raise UnparseableDocument(
            f"cannot read {requested}: {exc.strerror}; check the indexer may read it"
        ) from exc
    if not stat.S_ISREG(info.st_mode):
        # Opening a FIFO would block the consumer; a device could stream forever.
        raise UnparseableDocument(f"{requested} is not a regular file")
    if info.st_size > max_bytes:
        raise too_large(info.st_size, max_bytes)

    # O_NOFOLLOW: the final component must not have been swapped for a symlink since
    # resolve(); O_NONBLOCK: never hang if it was swapped for a FIFO.
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(resolved, flags)
    except OSError as exc:
        raise UnparseableDocument(
            f"cannot read {requested}: {exc.strerror}; check the indexer may read it"
        ) from exc
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise UnparseableDocument(f"{requested} is not a regular file")
        # Read one byte past the limit: a file that grew after stat() is still refused
        # without holding more than max_bytes + 1 in memory.
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise too_large(max(len(data), info.st_size), max_bytes)

    name = requested.name if requested.name not in ("", ".", "..") else resolved.name
    return data, name
