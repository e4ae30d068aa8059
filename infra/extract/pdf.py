"""PDF text layer extraction with pypdf."""

from __future__ import annotations

import io

from pypdf import PasswordType, PdfReader
from pypdf.errors import DependencyError, LimitReachedError

from domain.errors import UnparseableDocument

from .model import ExtractLimits, brief, normalize_output

_RESAVE = "re-save or re-export it as PDF and upload it again"


def _corrupted(detail: BaseException | str) -> UnparseableDocument:
    if isinstance(detail, BaseException):
        detail = brief(detail)
    return UnparseableDocument(f"PDF is corrupted ({detail}); {_RESAVE}")


def _bomb(exc: BaseException) -> UnparseableDocument:
    # pypdf raises LimitReachedError for oversized streams and for reference loops alike.
    return UnparseableDocument(
        f"PDF exceeds a parser safety limit ({brief(exc)}): possible decompression bomb "
        f"or malformed file; {_RESAVE}"
    )


def _too_much_text(limits: ExtractLimits) -> UnparseableDocument:
    return UnparseableDocument(
        f"PDF yields more than {limits.max_chars:,} characters of text, above the limit; "
        "split it into smaller files"
    )


def _open(data: bytes) -> PdfReader:
    # The spec lets the header sit anywhere in the first 1024 bytes.
    if b"%PDF-" not in data[:1024]:
        raise UnparseableDocument(
            "PDF is corrupted: no %PDF- header; is it really a PDF (check the extension)?"
        )
    # pypdf raises many exception types on malformed input (its own, ValueError,
    # KeyError, zlib.error...): any failure to parse is a corrupted file.
    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        encrypted = reader.is_encrypted
    except LimitReachedError as exc:
        raise _bomb(exc) from exc
    except MemoryError:  # the memory limit, not a broken file
        raise
    except Exception as exc:
        raise _corrupted(exc) from exc
    if encrypted:
        # Owner-password-only PDFs (print/copy restrictions) open with an empty password.
        try:
            opened = reader.decrypt("")
        except DependencyError as exc:
            raise UnparseableDocument(
                "PDF is encrypted with AES and this installation lacks the 'cryptography' "
                "package to decrypt it; remove the encryption, or ask the operator to install it"
            ) from exc
        except MemoryError:  # the memory limit, not a broken file
            raise
        except Exception as exc:
            raise _corrupted(f"unreadable encryption dictionary: {brief(exc)}") from exc
        if opened == PasswordType.NOT_DECRYPTED:
            raise UnparseableDocument(
                "PDF is password-protected; upload a copy without the password"
            )
    return reader


def extract_pdf(data: bytes, limits: ExtractLimits) -> tuple[str, int]:
    """Return (text, page count); pages are joined by a blank line."""
    reader = _open(data)
    try:
        pages = list(reader.pages)
    except LimitReachedError as exc:
        raise _bomb(exc) from exc
    except MemoryError:  # the memory limit, not a broken file
        raise
    except Exception as exc:
        raise _corrupted(f"unreadable page tree: {brief(exc)}") from exc
    if not pages:
        raise UnparseableDocument(f"PDF has no pages; {_RESAVE}")

    texts: list[str] = []
    total = 0
    failed = 0
    for page in pages:
        try:
            text = page.extract_text()
        except LimitReachedError as exc:
            raise _bomb(exc) from exc
        except MemoryError:  # the memory limit, not a broken file
            raise
        except Exception:
            # One damaged page should not cost the rest of a long document.
            failed += 1
            continue
        text = normalize_output(text).strip()
        if text:
            total += len(text) + (2 if texts else 0)
            texts.append(text)
            if total > limits.max_chars:
                raise _too_much_text(limits)

    if not texts:
        if failed == len(pages):
            raise _corrupted("no page could be read")
        raise UnparseableDocument("PDF has no text layer (scanned images?); run OCR on it first")
    return "\n\n".join(texts), len(pages)
