"""Deciding which extractor handles a document: MIME type first, then the file extension."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath, PureWindowsPath
from typing import Literal

from domain.errors import UnparseableDocument

Kind = Literal["text", "markdown", "html", "pdf", "docx"]

DOCX_MIME = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"


@dataclass(frozen=True)
class Format:
    kind: Kind
    mime_type: str  # reported back in ExtractedText.mime_type
    charset: str | None = None  # charset parameter of a given MIME type, a decoding hint
    label: str = ""  # how error messages name the document: "a .txt file", "a text/plain document"


_BY_EXTENSION: dict[str, Format] = {
    ".txt": Format("text", "text/plain"),
    ".text": Format("text", "text/plain"),
    ".log": Format("text", "text/plain"),
    ".csv": Format("text", "text/csv"),
    ".tsv": Format("text", "text/tab-separated-values"),
    ".rst": Format("text", "text/x-rst"),
    ".json": Format("text", "application/json"),
    ".jsonl": Format("text", "application/x-ndjson"),
    ".yaml": Format("text", "application/yaml"),
    ".yml": Format("text", "application/yaml"),
    ".md": Format("markdown", "text/markdown"),
    ".markdown": Format("markdown", "text/markdown"),
    ".html": Format("html", "text/html"),
    ".htm": Format("html", "text/html"),
    ".xhtml": Format("html", "application/xhtml+xml"),
    ".pdf": Format("pdf", "application/pdf"),
    ".docx": Format("docx", DOCX_MIME),
}

SUPPORTED_EXTENSIONS: frozenset[str] = frozenset(_BY_EXTENSION)

_BY_MIME: dict[str, Kind] = {
    "text/markdown": "markdown",
    "text/x-markdown": "markdown",
    "text/html": "html",
    "application/xhtml+xml": "html",
    "application/pdf": "pdf",
    "application/x-pdf": "pdf",
    DOCX_MIME: "docx",
    "application/json": "text",
    "application/x-ndjson": "text",
    "application/jsonl": "text",
    "application/yaml": "text",
    "application/x-yaml": "text",
}

# Formats people commonly try; the generic message would not tell them what to do.
_HINTS: dict[str, str] = {
    ".doc": "legacy Word 97-2003 .doc files are not supported; save it as .docx",
    "application/msword": "legacy Word 97-2003 .doc files are not supported; save it as .docx",
}


def extension_of(filename: str) -> str:
    """Lower-cased extension of the last path component, whichever separator the client used."""
    name = PureWindowsPath(PurePosixPath(filename).name).name
    return PurePosixPath(name).suffix.lower()


def _parse_mime(mime_type: str) -> tuple[str, str | None]:
    essence, _, params = mime_type.partition(";")
    charset = None
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset" and value.strip():
            charset = value.strip().strip("\"'")
    return essence.strip().lower(), charset


def choose_format(filename: str, mime_type: str | None) -> Format:
    """MIME type wins when it names a format we handle; a generic or unknown one
    (application/octet-stream is what many uploaders send) falls back to the extension."""
    ext = extension_of(filename)
    essence, charset = _parse_mime(mime_type) if mime_type else ("", None)
    kind = _BY_MIME.get(essence)
    if kind is None and essence.startswith("text/"):
        # Any other text/* (text/plain, text/csv, text/x-python...) is readable as plain text.
        kind = "text"
    if kind is not None:
        return Format(kind, essence, charset, f"a {essence} document")
    by_ext = _BY_EXTENSION.get(ext)
    if by_ext is not None:
        return Format(by_ext.kind, by_ext.mime_type, charset, f"a {ext} file")

    supported = ", ".join(sorted(SUPPORTED_EXTENSIONS))
    hint = _HINTS.get(ext) or _HINTS.get(essence)
    if hint:
        raise UnparseableDocument(f"unsupported file type {ext or essence}: {hint}")
    if not ext:
        what = f"MIME type {essence}" if essence else "no MIME type"
        raise UnparseableDocument(
            f"cannot tell the format of {filename!r}: it has no extension and {what}; "
            f"rename it with one of: {supported}"
        )
    declared = f" ({essence})" if essence else ""
    raise UnparseableDocument(f"unsupported file type {ext}{declared}; supported: {supported}")
