"""DOCX extraction: zip sanity checks first, then python-docx."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator

import docx
from docx.oxml.ns import qn
from docx.oxml.xmlchemy import BaseOxmlElement

from domain.errors import UnparseableDocument

from .model import ExtractLimits, MiB, brief, human_size

_MC_NS = "http://schemas.openxmlformats.org/markup-compatibility/2006"
_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
# A real DOCX compresses its XML about 5-20x; zeros or repeated padding compress ~1000x.
_MAX_RATIO = 100
_RATIO_APPLIES_ABOVE = 10 * MiB
_RESAVE = "open and re-save it in Word or LibreOffice, then upload it again"


def _check_zip(data: bytes, limits: ExtractLimits) -> None:
    """Judge the archive from its central directory alone, before anything is inflated.

    The declared sizes are binding: zipfile stops inflating a member at its declared
    file_size (and then fails the CRC check), so a lying header cannot exceed them.
    """
    if data.startswith(_OLE_MAGIC):
        # Word stores password-protected .docx files in an OLE container.
        raise UnparseableDocument(
            "DOCX is password-protected or is really a legacy .doc file; "
            "remove the password or save it as .docx"
        )
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = archive.infolist()
    except zipfile.BadZipFile as exc:
        raise UnparseableDocument(
            f"DOCX is corrupted: not a valid zip archive ({brief(exc)}); {_RESAVE}"
        ) from exc
    except MemoryError:  # the memory limit, not a broken file
        raise
    except Exception as exc:  # zipfile reports some truncations as ValueError or OSError
        raise UnparseableDocument(
            f"DOCX is corrupted: damaged or truncated zip archive ({brief(exc)}); {_RESAVE}"
        ) from exc

    expanded = sum(m.file_size for m in members)
    compressed = sum(m.compress_size for m in members)
    if expanded > limits.max_uncompressed_bytes:
        raise UnparseableDocument(
            f"DOCX expands to {human_size(expanded)}, above the "
            f"{human_size(limits.max_uncompressed_bytes)} limit (possible decompression bomb)"
        )
    if expanded > _RATIO_APPLIES_ABOVE and expanded > _MAX_RATIO * max(compressed, 1):
        ratio = expanded / max(compressed, 1)
        raise UnparseableDocument(
            f"DOCX expands {ratio:,.0f}x to {human_size(expanded)}, above the "
            f"{_MAX_RATIO}x compression ratio limit (possible decompression bomb)"
        )


def _w(tag: str) -> str:
    return qn(f"w:{tag}")


_P, _TBL, _TR, _TC = _w("p"), _w("tbl"), _w("tr"), _w("tc")
_SDT, _SDT_CONTENT, _CUSTOM_XML = _w("sdt"), _w("sdtContent"), _w("customXml")
_T = _w("t")
_SYMBOLS = {_w("tab"): "\t", _w("ptab"): "\t", _w("br"): "\n", _w("cr"): "\n"}
_SYMBOLS[_w("noBreakHyphen")] = "-"
# Subtrees whose text is not part of the paragraph: properties (a w:tab in pPr is a tab
# stop, not a tab), text boxes (their own story, duplicated in mc:Fallback), and
# moved-away text (it reappears at w:moveTo).
_SKIPPED = {
    _w("pPr"),
    _w("rPr"),
    _w("sdtPr"),
    _w("txbxContent"),
    _w("moveFrom"),
    f"{{{_MC_NS}}}Fallback",
}


def _children(container: BaseOxmlElement, wanted: tuple[str, ...]) -> Iterator[BaseOxmlElement]:
    """Children with a wanted tag, in document order, looking through content controls
    (templates wrap cover pages and whole sections in them) and custom XML wrappers."""
    for child in container:
        if child.tag in wanted:
            yield child
        elif child.tag == _SDT:
            content = child.find(_SDT_CONTENT)
            if content is not None:
                yield from _children(content, wanted)
        elif child.tag == _CUSTOM_XML:
            yield from _children(child, wanted)


def _paragraph_text(paragraph: BaseOxmlElement) -> str:
    """All visible text of a w:p, read from the XML rather than python-docx's
    Paragraph.text, which skips runs inside tracked insertions, fields and content controls."""
    parts: list[str] = []
    stack = [paragraph]
    while stack:
        element = stack.pop()
        tag = element.tag
        if tag in _SKIPPED:
            continue
        elif tag == _T:
            parts.append(element.text or "")
        elif tag in _SYMBOLS:
            parts.append(_SYMBOLS[tag])
        else:
            stack.extend(reversed(element))
    return "".join(parts).strip()


def _cell_text(cell: BaseOxmlElement) -> str:
    parts: list[str] = []
    for block in _children(cell, (_P, _TBL)):
        if block.tag == _P:
            parts.append(_paragraph_text(block))
        else:  # a table nested in a cell: flatten its rows
            parts.append("; ".join(_table_lines(block)))
    return " ".join(" ".join(parts).split())


def _table_lines(table: BaseOxmlElement) -> list[str]:
    """One line per row, cells joined by " | ". Walking w:tc directly lists a merged cell
    once; a vertically merged continuation cell is empty."""
    lines: list[str] = []
    for row in _children(table, (_TR,)):
        cells = [_cell_text(cell) for cell in _children(row, (_TC,))]
        if any(cells):
            lines.append(" | ".join(cells))
    return lines


def extract_docx(data: bytes, limits: ExtractLimits) -> str:
    """Paragraphs (headings included) and tables in document order, one block each."""
    _check_zip(data, limits)
    blocks: list[str] = []
    total = 0
    # python-docx surfaces damage as KeyError, ValueError, lxml or zip errors alike.
    try:
        # python-docx finds the main document part and checks the content type.
        body = docx.Document(io.BytesIO(data)).element.body
        for element in _children(body, (_P, _TBL)):
            if element.tag == _P:
                block = _paragraph_text(element)
            else:
                block = "\n".join(_table_lines(element))
            if block:
                total += len(block) + (2 if blocks else 0)
                blocks.append(block)
                if total > limits.max_chars:
                    break  # extract_text reports the limit; no need to read further
    except MemoryError:  # the memory limit, not a broken file
        raise
    except Exception as exc:
        raise UnparseableDocument(f"DOCX is corrupted: {brief(exc)}; {_RESAVE}") from exc
    return "\n\n".join(blocks)
