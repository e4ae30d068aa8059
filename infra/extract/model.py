"""Value types and shared helpers of the extraction adapter."""

from __future__ import annotations

import re
from dataclasses import dataclass

from domain.errors import UnparseableDocument

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


@dataclass(frozen=True)
class ExtractLimits:
    """Resource limits applied to one document; every one protects a consumer pod's memory."""

    max_bytes: int = 50 * MiB  # raw input size limit
    max_uncompressed_bytes: int = 200 * MiB  # zip-based formats (DOCX): sum of member sizes
    max_chars: int = 20_000_000  # extracted text size limit
    # Enforced only by extract_text_isolated, on the child process that parses: a small
    # file can still cost hours (a shared content stream inflating to 70 MB on every page).
    cpu_seconds: int = 60  # RLIMIT_CPU of the child
    memory_bytes: int = 2 * GiB  # RLIMIT_AS (address space) of the child
    wall_seconds: float = 120.0  # the child is killed after this long, whatever it is doing


@dataclass(frozen=True)
class ExtractedText:
    """The text of one document and what was learned about its format on the way."""

    text: str
    mime_type: str  # the format we decided on, e.g. "text/plain", "application/pdf"
    encoding: str | None  # detected text encoding for text formats, else None
    pages: int | None  # PDF page count, else None


def human_size(n: int) -> str:
    """Format a byte count the way people read it in a status table."""
    if n >= GiB:
        return f"{n / GiB:.1f} GiB"
    if n >= MiB:
        return f"{n / MiB:.1f} MiB"
    if n >= KiB:
        return f"{n / KiB:.1f} KiB"
    return f"{n} bytes"


def brief(exc: BaseException, limit: int = 120) -> str:
    """A parser's exception text, shortened: some quote raw bytes of the broken file."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def too_large(size: int, limit: int) -> UnparseableDocument:
    return UnparseableDocument(
        f"file is {human_size(size)}, above the {human_size(limit)} limit "
        "(KBSTREAM_MAX_DOCUMENT_BYTES); split it into smaller files or raise the limit"
    )


def normalize_output(text: str) -> str:
    """One newline convention, no NULs and no lone surrogates, whatever the source
    format produced.

    NULs are stripped because PostgreSQL text columns reject them and they carry no meaning.
    """
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if "\x00" in text:
        text = text.replace("\x00", "")
    if _LONE_SURROGATE.search(text):
        # a format's own UTF-16 (a PDF string, say) with half a pair: replaced as
        # invalid UTF-8 is, since no database, tokenizer or JSON encoder takes it
        text = _LONE_SURROGATE.sub("\ufffd", text)
    return text.removeprefix("\ufeff")
