"""The DocumentReader adapter: a lifecycle event's body (inline content, a
file reference under the allowed roots, or uploaded bytes) to text, within
the extraction limits."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from domain.errors import DocumentError

from . import read_file_reference
from .isolated import extract_text_isolated
from .model import ExtractLimits


class FileReader:
    """Implements domain.ports.DocumentReader; raises DocumentError (mostly
    UnparseableDocument) with a reason a person can act on."""

    def __init__(self, allowed_roots: Sequence[Path], limits: ExtractLimits = ExtractLimits()):
        self.allowed_roots = list(allowed_roots)
        self.limits = limits

    def read(
        self, content: str | None, uri: str | None, mime_type: str | None
    ) -> tuple[str, str | None]:
        if content is not None:
            return self._inline(content, mime_type)
        if uri is None:
            raise DocumentError("the event carries neither content nor uri; send one of them")
        data, filename = read_file_reference(uri, self.allowed_roots, self.limits.max_bytes)
        return self.extract(data, filename, mime_type)

    def extract(self, data: bytes, filename: str, mime_type: str | None) -> tuple[str, str | None]:
        # untrusted bytes: a child process with CPU, memory and wall-clock limits
        extracted = extract_text_isolated(data, filename, mime_type, self.limits)
        return extracted.text, extracted.mime_type

    def _inline(self, content: str, mime_type: str | None) -> tuple[str, str | None]:
        if len(content) > self.limits.max_chars:
            raise DocumentError(
                f"inline content has {len(content)} characters, above the limit of "
                f"{self.limits.max_chars}; send large documents by uri"
            )
        if not content.strip():
            raise DocumentError("the document is empty")
        return content, mime_type or "text/plain"
