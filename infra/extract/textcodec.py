"""Bytes to str for text formats: BOMs, UTF-8, legacy encodings, and refusing binary junk."""

from __future__ import annotations

import codecs
import re

import charset_normalizer

from domain.errors import UnparseableDocument

# UTF-32 LE must be tested before UTF-16 LE: its BOM starts with the UTF-16 LE one.
_BOMS: tuple[tuple[bytes, str, str], ...] = (
    (codecs.BOM_UTF32_LE, "utf-32-le", "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be", "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8", "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16-le", "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be", "utf-16-be"),
)

# C0 controls that never occur in text (tab, LF, VT, FF, CR and ESC do: ESC colours logs).
_CONTROL_BYTES = bytes(b for b in range(1, 32) if b not in (9, 10, 11, 12, 13, 27)) + b"\x7f"
_HIGH_BYTES = bytes(range(128, 256))
# Same set for decoded text, plus C1 controls, which a correct decoding does not produce.
_CONTROL_CHARS = re.compile(r"[\x01-\x08\x0e-\x1a\x1c-\x1f\x7f-\x9f]")

# git's rule: a NUL in the first 8000 bytes means binary. Later NULs are tolerated
# (a crashed logger pads files with them) unless they are a large share of the file.
_NUL_HEAD = 8000
_MAX_NUL_RATIO = 0.10
_MAX_CONTROL_RATIO = 0.01
_CONTROL_SAMPLE = 65536

# When charset-normalizer scores several encodings equally (common for short texts), it
# picks one arbitrarily: cp949 for short GBK Chinese, cp1250 for French. Prefer the
# encodings documents in this system are actually written in.
_PREFERRED = (
    "utf_8",
    "gb18030",
    "cp1252",
    "big5",
    "cp932",
    "shift_jis",
    "euc_jp",
    "cp949",
    "euc_kr",
    "cp1251",
    "latin_1",
)

_MAGIC_HINTS: tuple[tuple[bytes, str], ...] = (
    (b"%PDF-", "it looks like a PDF"),
    (b"PK\x03\x04", "it looks like a zip archive (DOCX, XLSX, ...)"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "it looks like a legacy Office file (.doc, .xls)"),
    (b"\x89PNG", "it looks like a PNG image"),
    (b"\xff\xd8\xff", "it looks like a JPEG image"),
    (b"GIF8", "it looks like a GIF image"),
    (b"\x7fELF", "it looks like an executable"),
    (b"\x1f\x8b", "it looks like a gzip archive"),
)


def _binary_error(data: bytes, what: str, evidence: str) -> UnparseableDocument:
    hint = next((f"; {h}" for magic, h in _MAGIC_HINTS if data.startswith(magic)), "")
    return UnparseableDocument(
        f"binary content in {what} ({evidence}{hint}); is the extension or MIME type wrong?"
    )


def _reject_binary_bytes(data: bytes, what: str) -> None:
    if b"\x00" in data[:_NUL_HEAD] or data.count(b"\x00") > _MAX_NUL_RATIO * len(data):
        raise _binary_error(data, what, "NUL bytes")
    controls = len(data) - len(data.translate(None, _CONTROL_BYTES))
    if controls > max(2, _MAX_CONTROL_RATIO * len(data)):
        raise _binary_error(data, what, "control characters")


def _reject_binary_text(text: str, data: bytes, what: str) -> None:
    """The same test after decoding, for encodings (UTF-16/32) where the byte test cannot apply."""
    if "\x00" in text[: _NUL_HEAD // 2] or text.count("\x00") > _MAX_NUL_RATIO * len(text):
        raise _binary_error(data, what, "NUL characters")
    sample = text[:_CONTROL_SAMPLE]
    if len(_CONTROL_CHARS.findall(sample)) > max(2, _MAX_CONTROL_RATIO * len(sample)):
        raise _binary_error(data, what, "control characters")


def _sniff_bomless_utf16(data: bytes) -> str | None:
    """UTF-16 without a BOM (some Windows tools write it): mostly-Latin text then has a
    zero in every other byte, which would otherwise look like binary."""
    head = data[:_NUL_HEAD]
    half = len(head) // 2
    if half < 2 or len(data) % 2:
        return None
    even_zeros, odd_zeros = head[0::2].count(0), head[1::2].count(0)
    if odd_zeros > 0.4 * half and even_zeros < 0.05 * half:
        return "utf-16-le"
    if even_zeros > 0.4 * half and odd_zeros < 0.05 * half:
        return "utf-16-be"
    return None


def _mostly_utf8(data: bytes, replaced: str) -> bool:
    """UTF-8 with a few stray legacy bytes (concatenated or hand-edited files): keep it
    UTF-8 with replacement characters rather than re-decode everything as a legacy code page."""
    high = len(data) - len(data.translate(None, _HIGH_BYTES))
    bad = replaced.count("\ufffd")
    # a few stray bytes, not a soup: at most 1 in 200 characters replaced
    return bad * 10 <= high and bad <= max(1, len(replaced) // 200)


# Labels documents declare, mapped the way browsers do (WHATWG Encoding): "iso-8859-1"
# pages are really cp1252, "gb2312" pages use the whole of GB18030.
_DECLARED_ALIASES = {
    "iso8859-1": "cp1252",
    "ascii": "cp1252",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
}


def _lookup(name: str) -> str | None:
    try:
        return codecs.lookup(name).name
    except LookupError:
        return None


def _declared_codec(label: str) -> str | None:
    label = label.strip().lower()
    codec = _DECLARED_ALIASES.get(label) or _lookup(label)
    return _DECLARED_ALIASES.get(codec or "", codec)


_EBCDIC = ("cp037", "cp273", "cp424", "cp500", "cp875", "cp1026", "cp1140")


def _detect(data: bytes) -> tuple[str, str] | None:
    # EBCDIC code pages "decode" almost any bytes; nobody sends them undeclared
    matches = [m for m in charset_normalizer.from_bytes(data) if not m.encoding.startswith(_EBCDIC)]
    if not matches:
        return None
    best = matches[0]
    tied = [
        m for m in matches if m.chaos <= best.chaos + 0.01 and m.coherence >= best.coherence - 0.01
    ]
    tied.sort(
        key=lambda m: _PREFERRED.index(m.encoding) if m.encoding in _PREFERRED else len(_PREFERRED)
    )
    choice = tied[0] if tied else best
    return str(choice), _lookup(choice.encoding) or choice.encoding


def decode_text(data: bytes, what: str, declared: str | None = None) -> tuple[str, str]:
    """Decode ``data`` and return (text, codec name).

    Order: BOM, strict UTF-8 (valid UTF-8 is almost never anything else), the declared
    charset, UTF-8 with a few bad bytes, then statistical detection. ``what`` names the
    document in error messages, e.g. "a .txt file".
    """
    for bom, codec, reported in _BOMS:
        if data.startswith(bom):
            text = data[len(bom) :].decode(codec, errors="replace")
            _reject_binary_text(text, data, what)
            return text, reported

    utf16 = _sniff_bomless_utf16(data)
    if utf16 is not None:
        try:
            text = data.decode(utf16)
        except UnicodeDecodeError:
            pass
        else:
            _reject_binary_text(text, data, what)
            return text, utf16

    _reject_binary_bytes(data, what)

    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass

    declared_codec = _declared_codec(declared) if declared else None
    if declared_codec is not None:
        try:
            text = data.decode(declared_codec)
        except UnicodeDecodeError:
            pass  # the declaration is wrong; detect instead
        else:
            _reject_binary_text(text, data, what)
            return text, declared_codec

    replaced = data.decode("utf-8", errors="replace")
    if _mostly_utf8(data, replaced):
        return replaced, "utf-8"

    detected = _detect(data)
    if detected is None:
        raise UnparseableDocument(
            f"{what} is not valid UTF-8 and no single text encoding fits it "
            "(mixed or corrupted encodings?); re-save it as UTF-8"
        )
    text, detected_codec = detected
    _reject_binary_text(text, data, what)
    return text, detected_codec
