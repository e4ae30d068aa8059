"""Document text extraction: bytes of a supported file in, plain text with paragraph
structure out, or ``UnparseableDocument`` with a reason a person can act on.

Formats: plain text family (charset detected), Markdown, HTML, PDF (text layer), DOCX.
Every limit is checked before the expensive step it protects. What no check can bound
(CPU time, memory, a parser crash) is contained by ``isolated.extract_text_isolated``,
which runs ``extract_text`` in a child process.
"""

from __future__ import annotations

from domain.errors import UnparseableDocument

from .files import read_file_reference, resolve_file_reference
from .formats import SUPPORTED_EXTENSIONS, choose_format
from .markup import declared_html_charset, html_to_text, markdown_to_text
from .model import ExtractedText, ExtractLimits, normalize_output, too_large
from .pdf import extract_pdf
from .textcodec import decode_text
from .wordprocessing import extract_docx

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "ExtractLimits",
    "ExtractedText",
    "extract_text",
    "read_file_reference",
    "resolve_file_reference",
]

_NOTHING_FOUND = {
    "text": "no text could be extracted: the file holds only whitespace",
    "markdown": "no text could be extracted: the Markdown holds no text",
    "html": "no text could be extracted: the page has no visible text outside navigation "
    "and scripts (is it rendered by JavaScript?)",
    "docx": "no text could be extracted: the DOCX has no text in its paragraphs or tables "
    "(text boxes, headers and images are not read)",
}


def extract_text(
    data: bytes,
    filename: str,
    mime_type: str | None = None,
    limits: ExtractLimits = ExtractLimits(),
) -> ExtractedText:
    """Extract the text of one document.

    The format is taken from ``mime_type`` when it names a supported format, else from the
    extension of ``filename`` (case-insensitive). Raises ``UnparseableDocument``.
    """
    if not data:
        raise UnparseableDocument("file is empty; upload it again with its content")
    if len(data) > limits.max_bytes:
        raise too_large(len(data), limits.max_bytes)
    fmt = choose_format(filename, mime_type)

    encoding: str | None = None
    pages: int | None = None
    if fmt.kind == "pdf":
        text, pages = extract_pdf(data, limits)
    elif fmt.kind == "docx":
        text = extract_docx(data, limits)
    else:
        declared = fmt.charset
        if fmt.kind == "html" and declared is None:
            declared = declared_html_charset(data)
        text, encoding = decode_text(data, fmt.label, declared)
        text = normalize_output(text)
        if fmt.kind == "markdown":
            text = markdown_to_text(text)
        elif fmt.kind == "html":
            text = html_to_text(text)

    text = normalize_output(text)
    if not text.strip():
        raise UnparseableDocument(_NOTHING_FOUND.get(fmt.kind, "no text could be extracted"))
    if len(text) > limits.max_chars:
        raise UnparseableDocument(
            f"extracted text is {len(text):,} characters, above the {limits.max_chars:,} "
            "character limit; split the document into smaller files"
        )
    return ExtractedText(text=text, mime_type=fmt.mime_type, encoding=encoding, pages=pages)
