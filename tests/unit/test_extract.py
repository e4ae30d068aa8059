"""infra.extract against real libraries and real files built in tmp_path (no network)."""

from __future__ import annotations

import io
import os
import random
import struct
import zipfile
from pathlib import Path

import docx
import pytest
from docx.oxml import parse_xml
from docx.oxml.ns import nsdecls
from docx.shared import Inches
from pypdf import PdfReader, PdfWriter

from domain.errors import UnparseableDocument
from infra.extract import (
    SUPPORTED_EXTENSIONS,
    ExtractedText,
    ExtractLimits,
    extract_text,
    read_file_reference,
)

MiB = 1024 * 1024
DOCX_MIME = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"


def extract_file(path: Path, mime_type: str | None = None, **limits: int) -> ExtractedText:
    return extract_text(path.read_bytes(), path.name, mime_type, ExtractLimits(**limits))


def reason_of(data: bytes, filename: str, mime_type: str | None = None, **limits: int) -> str:
    with pytest.raises(UnparseableDocument) as caught:
        extract_text(data, filename, mime_type, ExtractLimits(**limits))
    return caught.value.reason


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# --- fixtures: documents built by hand or by the real libraries -------------------------


def text_pdf(pages: list[str]) -> bytes:
    """A minimal valid PDF: one Helvetica text line per page, with a correct xref table."""
    objects: dict[int, bytes] = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        3: b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    }
    kids = []
    for i, line in enumerate(pages):
        page_id, content_id = 4 + 2 * i, 5 + 2 * i
        kids.append(f"{page_id} 0 R")
        stream = f"BT /F1 18 Tf 72 720 Td ({line}) Tj ET".encode("latin-1")
        objects[page_id] = (
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            b"/Resources << /Font << /F1 3 0 R >> >> /Contents %d 0 R >>" % content_id
        )
        objects[content_id] = b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream"
    objects[2] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(pages)} >>".encode()

    out = bytearray(b"%PDF-1.4\n")
    offsets: dict[int, int] = {}
    for number in sorted(objects):
        offsets[number] = len(out)
        out += b"%d 0 obj\n" % number + objects[number] + b"\nendobj\n"
    xref_at = len(out)
    size = max(objects) + 1
    out += b"xref\n0 %d\n0000000000 65535 f \n" % size
    for number in range(1, size):
        out += b"%010d 00000 n \n" % offsets[number]
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (size, xref_at)
    return bytes(out)


def encrypted_pdf(user_password: str) -> bytes:
    writer = PdfWriter()
    for page in PdfReader(io.BytesIO(text_pdf(["Secret quarterly numbers"]))).pages:
        writer.add_page(page)
    # RC4 needs no optional crypto dependency, so the test runs everywhere.
    writer.encrypt(user_password=user_password, owner_password="owner", algorithm="RC4-128")
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()


def sample_docx() -> bytes:
    document = docx.Document()
    document.add_heading("Quarterly report", level=1)
    document.add_paragraph("Revenue grew in every region.")
    table = document.add_table(rows=3, cols=3)
    for r, row in enumerate([["Region", "Q1", "Q2"], ["North", "10", "12"], ["South", "7", "9"]]):
        for c, value in enumerate(row):
            table.cell(r, c).text = value
    merged = document.add_table(rows=1, cols=3)
    merged.cell(0, 0).merge(merged.cell(0, 1)).text = "Merged total"
    merged.cell(0, 2).text = "19"
    document.add_paragraph("Closing remarks after the table.")
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


def zip_bytes(members: dict[str, bytes | int]) -> bytes:
    """A deflated zip; an int member is that many zero bytes, written in chunks."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in members.items():
            if isinstance(content, bytes):
                archive.writestr(name, content)
                continue
            with archive.open(name, "w", force_zip64=True) as member:
                chunk = bytes(MiB)
                for _ in range(content // MiB):
                    member.write(chunk)
    return buffer.getvalue()


def forge_declared_size(archive: bytes, declared: int) -> bytes:
    """Rewrite the uncompressed size in the central directory, as a zip bomb would."""
    at = archive.rindex(b"PK\x01\x02") + 24
    return archive[:at] + struct.pack("<I", declared) + archive[at + 4 :]


# --- plain text ---------------------------------------------------------------------------


def test_utf8_text_normalizes_newlines(tmp_path: Path) -> None:
    path = write(tmp_path, "notes.txt", "Première ligne\r\nSecond line\rThird 知识库\n".encode())
    result = extract_file(path)
    assert result.text == "Première ligne\nSecond line\nThird 知识库\n"
    assert (result.mime_type, result.encoding, result.pages) == ("text/plain", "utf-8", None)


def test_gbk_chinese_text(tmp_path: Path) -> None:
    chinese = "知识库流式索引：文档解析、分段、向量化，然后写入向量库和关键词索引。"
    result = extract_file(write(tmp_path, "中文.txt", chinese.encode("gbk")))
    assert result.text == chinese
    assert result.encoding == "gb18030"


def test_short_gbk_text_is_not_mistaken_for_korean(tmp_path: Path) -> None:
    result = extract_file(write(tmp_path, "short.txt", "中文测试".encode("gbk")))
    assert result.text == "中文测试"


def test_utf16_with_bom(tmp_path: Path) -> None:
    path = write(tmp_path, "win.txt", "Grüße aus Köln\r\n第二行".encode("utf-16"))
    result = extract_file(path)
    assert result.text == "Grüße aus Köln\n第二行"
    assert result.encoding is not None and result.encoding.startswith("utf-16")


def test_utf16_without_bom(tmp_path: Path) -> None:
    result = extract_file(write(tmp_path, "export.csv", "id,name\r\n1,Zoë\r\n".encode("utf-16-le")))
    assert (result.text, result.encoding) == ("id,name\n1,Zoë\n", "utf-16-le")


def test_utf8_bom_is_not_part_of_the_text(tmp_path: Path) -> None:
    result = extract_file(write(tmp_path, "bom.csv", "name,city\nZoë,Zürich\n".encode("utf-8-sig")))
    assert result.text.startswith("name,city")
    assert result.mime_type == "text/csv"


def test_cp1252_french(tmp_path: Path) -> None:
    french = "Café crème brûlée — naïve façade. Les élèves étudient à l'école."
    result = extract_file(write(tmp_path, "fr.txt", french.encode("cp1252")))
    assert result.text == french
    assert result.encoding == "cp1252"


def test_mixed_encodings_decode_best_effort(tmp_path: Path) -> None:
    data = "文档索引 ok. ".encode() * 40 + b"caf\xe9 " + "结束".encode()
    result = extract_file(write(tmp_path, "mixed.log", data))
    assert result.encoding == "utf-8"
    assert "文档索引 ok." in result.text and result.text.endswith("caf\ufffd 结束")


def test_nul_padding_late_in_a_log_is_stripped(tmp_path: Path) -> None:
    data = b"boot ok\n" * 2000 + b"\x00" * 512 + b"restarted\n"
    result = extract_file(write(tmp_path, "app.log", data))
    assert "\x00" not in result.text and result.text.endswith("restarted\n")


def test_binary_junk_in_txt_is_refused() -> None:
    junk = random.Random(7).randbytes(4096)
    reason = reason_of(junk, "photo.txt")
    assert "binary content in a .txt file" in reason and "NUL" in reason


def test_binary_without_nul_bytes_is_refused() -> None:
    junk = bytes(b for b in random.Random(8).randbytes(8192) if b)
    assert "control characters" in reason_of(junk, "data.csv")


def test_binary_error_names_the_real_format() -> None:
    assert "looks like a PNG" in reason_of(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "x.txt")
    reason = reason_of(text_pdf(["x"]) + bytes(16), "upload", "text/plain")
    assert "binary content in a text/plain document" in reason and "looks like a PDF" in reason


def test_empty_file() -> None:
    assert "empty" in reason_of(b"", "empty.txt")


def test_whitespace_only() -> None:
    assert "no text could be extracted" in reason_of(b" \n\t\r\n ", "blank.md")


def test_oversized_file() -> None:
    reason = reason_of(b"a" * (3 * MiB // 2), "big.txt", max_bytes=MiB)
    assert "1.5 MiB, above the 1.0 MiB limit" in reason
    assert "KBSTREAM_MAX_DOCUMENT_BYTES" in reason


def test_too_much_extracted_text() -> None:
    assert "character limit" in reason_of(b"word " * 100, "long.txt", max_chars=100)


def test_unsupported_extension() -> None:
    reason = reason_of(b"whatever", "archive.xyz")
    assert "unsupported file type .xyz" in reason and ".pdf" in reason and ".docx" in reason


def test_legacy_doc_gets_a_specific_hint() -> None:
    assert "save it as .docx" in reason_of(b"\xd0\xcf\x11\xe0", "old.DOC")


def test_supported_extensions() -> None:
    assert {".txt", ".md", ".markdown", ".html", ".htm", ".pdf", ".docx", ".csv"} <= (
        SUPPORTED_EXTENSIONS
    )
    assert all(ext.startswith(".") and ext == ext.lower() for ext in SUPPORTED_EXTENSIONS)


def test_extension_is_case_insensitive() -> None:
    assert extract_text(b"# Hi\n\nthere", "README.MD").mime_type == "text/markdown"


def test_mime_type_wins_over_extension() -> None:
    result = extract_text(b"<p>Hello <b>web</b></p>", "upload.txt", "text/html; charset=utf-8")
    assert (result.text, result.mime_type) == ("Hello web", "text/html")


def test_generic_mime_type_falls_back_to_extension() -> None:
    result = extract_text(b"# Title", "doc.md", "application/octet-stream")
    assert (result.text, result.mime_type) == ("Title", "text/markdown")


def test_declared_charset_is_used() -> None:
    result = extract_text("中文".encode("gbk"), "x", "text/plain; charset=GB2312")
    assert result.text == "中文"


# --- markdown -----------------------------------------------------------------------------

MARKDOWN = """\
# Install guide

Run the **installer** and read [the manual](https://example.com/manual) first.

## Steps

- Download the package
- Verify the checksum

```sh
tar xf kbstream.tar.gz
./configure --prefix=/opt
```

| Option | Default |
|--------|---------|
| port   | 9092    |
"""


def test_markdown_keeps_blocks_and_link_text(tmp_path: Path) -> None:
    result = extract_file(write(tmp_path, "guide.md", MARKDOWN.encode()))
    blocks = result.text.split("\n\n")
    assert blocks == [
        "Install guide",
        "Run the installer and read the manual first.",
        "Steps",
        "Download the package",
        "Verify the checksum",
        "tar xf kbstream.tar.gz\n./configure --prefix=/opt",
        "Option | Default\nport | 9092",
    ]
    assert "https://" not in result.text
    assert result.mime_type == "text/markdown"


# --- HTML ---------------------------------------------------------------------------------

HTML_PAGE = """\
<!DOCTYPE html>
<html><head><meta charset="gbk"><title>Site title</title>
<style>p { color: red }</style><script>var tracking = "SECRET";</script></head>
<body>
<header><a href="/">Company site</a></header>
<nav><ul><li>Home</li><li>Products</li></ul></nav>
<main>
  <article>
    <header><h1>Release notes 中文</h1></header>
    <p>The first   paragraph
       spans lines and has <a href="/x">a link</a>.</p>
    <p>Address line one<br>Address line two</p>
    <ul><li>Faster parsing</li><li>Smaller index</li></ul>
    <pre>def main():
    return 0</pre>
    <table><tr><th>Version</th><th>Date</th></tr><tr><td>2.0</td><td>2024-05-01</td></tr></table>
    <noscript>Enable JavaScript</noscript>
    <!-- an HTML comment -->
  </article>
</main>
<aside>Related posts</aside>
<form><input name="q"><button>Search</button></form>
<footer>Copyright 2024</footer>
</body></html>
"""


def test_html_main_region_without_furniture(tmp_path: Path) -> None:
    result = extract_file(write(tmp_path, "page.html", HTML_PAGE.encode("gbk")))
    assert result.text.split("\n\n") == [
        "Release notes 中文",
        "The first paragraph spans lines and has a link.",
        "Address line one\nAddress line two",
        "Faster parsing",
        "Smaller index",
        "def main():\n    return 0",
        "Version | Date\n2.0 | 2024-05-01",
    ]
    assert result.encoding == "gb18030"
    assert result.mime_type == "text/html"


def test_html_without_main_uses_body(tmp_path: Path) -> None:
    page = (
        b"<html><body><nav>Menu</nav><div><h2>Plain page</h2><div>Body text here.</div></div>"
        b"<script>alert(1)</script><footer>Footer</footer></body></html>"
    )
    result = extract_file(write(tmp_path, "plain.HTM", page))
    assert result.text == "Plain page\n\nBody text here."


SPHINX_PAGE = """\
<html><head><meta http-equiv="Content-Type" content="text/html; charset=utf-8" /></head>
<body>
<div class="related" role="navigation"><ul><li><a href="index.html">index</a></li></ul></div>
<div class="document">
  <div class="documentwrapper"><div class="bodywrapper">
    <div class="body" role="main">
      <section id="json">
        <h1>json — JSON encoder and decoder<a class="headerlink" href="#json">¶</a></h1>
        <p><strong>Source code:</strong> Lib/json/__init__.py</p>
        <dl><dt>json.dumps(obj)</dt><dd><p>Serialize obj to a JSON formatted str.</p></dd></dl>
      </section>
    </div>
  </div></div>
  <div class="sphinxsidebar" role="navigation"><h3>Table of Contents</h3></div>
</div>
<div class="footer">© Copyright 2001-2023, Python Software Foundation.</div>
</body></html>
"""


def test_sphinx_documentation_page(tmp_path: Path) -> None:
    result = extract_file(write(tmp_path, "json.html", SPHINX_PAGE.encode()))
    assert result.text.split("\n\n") == [
        "json — JSON encoder and decoder",
        "Source code: Lib/json/__init__.py",
        "json.dumps(obj)",
        "Serialize obj to a JSON formatted str.",
    ]


def test_deeply_nested_html_does_not_recurse() -> None:
    page = b"<html><body>" + b"<div>" * 3000 + b"deep text" + b"</div>" * 3000 + b"</body></html>"
    assert extract_text(page, "deep.html").text == "deep text"


def test_text_after_the_end_of_the_page_is_kept() -> None:
    # browsers show it: after </body> or </html>, content is still body content
    page = b"<html><head><title>t</title></head></html><p>late paragraph</p>"
    assert extract_text(page, "late.html").text == "late paragraph"
    page = b"<html><body><p>a</p></body></html><p>after the end</p>"
    assert extract_text(page, "after.html").text == "a\n\nafter the end"


def test_comments_and_removed_elements_keep_the_text_after_them() -> None:
    page = (
        b"<html><body><p>one <!-- a note --> two<script>track()</script> three"
        b"<span hidden>secret</span> four</p></body></html>"
    )
    assert extract_text(page, "tails.html").text == "one two three four"


def test_html_with_no_visible_text() -> None:
    page = b"<html><body><div id='app'></div><script>render()</script></body></html>"
    assert "JavaScript" in reason_of(page, "spa.html")


# --- PDF ----------------------------------------------------------------------------------


def test_pdf_text_layer(tmp_path: Path) -> None:
    path = write(tmp_path, "report.pdf", text_pdf(["Hello kbstream PDF", "Second page text"]))
    result = extract_file(path)
    assert result.text == "Hello kbstream PDF\n\nSecond page text"
    assert (result.mime_type, result.encoding, result.pages) == ("application/pdf", None, 2)


def test_pdf_without_text_layer(tmp_path: Path) -> None:
    writer = PdfWriter()
    writer.add_blank_page(width=612, height=792)
    path = tmp_path / "scan.pdf"
    with path.open("wb") as handle:
        writer.write(handle)
    reason = reason_of(path.read_bytes(), "scan.pdf")
    assert "no text layer" in reason and "OCR" in reason


def test_corrupted_pdf() -> None:
    data = b"%PDF-1.7\n" + random.Random(3).randbytes(2048)
    assert "PDF is corrupted" in reason_of(data, "broken.pdf")


def test_pdf_without_header() -> None:
    assert "no %PDF- header" in reason_of(b"this is plain text, not a PDF", "fake.pdf")


def test_password_protected_pdf() -> None:
    assert "password-protected" in reason_of(encrypted_pdf("secret"), "locked.pdf")


def test_pdf_with_owner_password_only_opens() -> None:
    assert extract_text(encrypted_pdf(""), "restricted.pdf").text == "Secret quarterly numbers"


# --- DOCX ---------------------------------------------------------------------------------


def test_docx_heading_paragraphs_and_tables(tmp_path: Path) -> None:
    result = extract_file(write(tmp_path, "report.docx", sample_docx()))
    assert result.text.split("\n\n") == [
        "Quarterly report",
        "Revenue grew in every region.",
        "Region | Q1 | Q2\nNorth | 10 | 12\nSouth | 7 | 9",
        "Merged total | 19",
        "Closing remarks after the table.",
    ]
    assert (result.mime_type, result.encoding, result.pages) == (DOCX_MIME, None, None)


def test_docx_text_python_docx_would_miss() -> None:
    document = docx.Document()
    w = nsdecls("w")
    paragraph = document.add_paragraph("Kept ")
    paragraph.paragraph_format.tab_stops.add_tab_stop(Inches(1))  # a w:tab that is no tab
    for xml in (
        f'<w:ins {w} w:id="1" w:author="a"><w:r><w:t>inserted</w:t></w:r></w:ins>',
        f'<w:del {w} w:id="2" w:author="a"><w:r><w:delText>deleted</w:delText></w:r></w:del>',
        f'<w:fldSimple {w} w:instr="PAGE"><w:r><w:t> page 7</w:t></w:r></w:fldSimple>',
        f"<w:r {w}><w:tab/><w:t>after tab</w:t></w:r>",
    ):
        paragraph._p.append(parse_xml(xml))
    cover = (
        f'<w:sdt {w}><w:sdtPr><w:alias w:val="Cover"/></w:sdtPr><w:sdtContent>'
        "<w:p><w:r><w:t>Inside a content control</w:t></w:r></w:p></w:sdtContent></w:sdt>"
    )
    document.element.body.insert(0, parse_xml(cover))
    buffer = io.BytesIO()
    document.save(buffer)
    result = extract_text(buffer.getvalue(), "tracked.docx")
    assert result.text == "Inside a content control\n\nKept inserted page 7\tafter tab"


def test_corrupted_docx() -> None:
    reason = reason_of(random.Random(5).randbytes(4096), "broken.docx")
    assert "DOCX is corrupted: not a valid zip archive" in reason


def test_zip_that_is_not_a_word_document() -> None:
    assert "DOCX is corrupted" in reason_of(zip_bytes({"hello.txt": b"hi"}), "x.docx")


def test_password_protected_docx() -> None:
    ole = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(512)
    assert "password-protected" in reason_of(ole, "locked.docx", DOCX_MIME)


def test_docx_decompression_bomb_is_refused_without_inflating(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bomb = zip_bytes({"[Content_Types].xml": b"<Types/>", "word/media/zeros.bin": 20 * MiB})
    assert len(bomb) < MiB

    def no_inflating(*args: object, **kwargs: object) -> None:
        raise AssertionError("a zip member was opened before the size check")

    monkeypatch.setattr(zipfile.ZipFile, "open", no_inflating)
    reason = reason_of(bomb, "bomb.docx", max_uncompressed_bytes=MiB)
    assert "DOCX expands to 20.0 MiB, above the 1.0 MiB limit" in reason
    assert "decompression bomb" in reason


def test_docx_absurd_compression_ratio() -> None:
    bomb = zip_bytes({"[Content_Types].xml": b"<Types/>", "word/media/pad.bin": 12 * MiB})
    reason = reason_of(bomb, "ratio.docx")
    assert "compression ratio" in reason and "decompression bomb" in reason


def test_docx_lying_about_sizes_is_judged_by_its_declared_size() -> None:
    archive = zip_bytes({"word/document.xml": b"<w:document/>"})
    reason = reason_of(forge_declared_size(archive, 300_000_000), "forged.docx")
    assert "DOCX expands to 286.1 MiB, above the 200.0 MiB limit" in reason


# --- file references ----------------------------------------------------------------------


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "kb"
    (root / "docs").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"top secret")
    return root, outside


def test_reference_inside_root(roots: tuple[Path, Path]) -> None:
    root, _ = roots
    (root / "docs" / "a b.txt").write_bytes(b"hello")
    uri = (root / "docs" / "a b.txt").as_uri()
    assert "%20" in uri
    assert read_file_reference(uri, [root], 100) == (b"hello", "a b.txt")
    assert read_file_reference(str(root / "docs" / "a b.txt"), [root], 100)[0] == b"hello"


def test_reference_outside_root(roots: tuple[Path, Path]) -> None:
    root, outside = roots
    with pytest.raises(UnparseableDocument) as caught:
        read_file_reference(str(outside / "secret.txt"), [root], 100)
    assert "outside the allowed roots" in caught.value.reason
    assert "KBSTREAM_ALLOWED_ROOTS" in caught.value.reason


def test_reference_escaping_with_dotdot(roots: tuple[Path, Path]) -> None:
    root, _ = roots
    with pytest.raises(UnparseableDocument, match="outside the allowed roots"):
        read_file_reference(f"file://{root}/docs/../../outside/secret.txt", [root], 100)


def test_reference_escaping_with_symlink(roots: tuple[Path, Path]) -> None:
    root, outside = roots
    link = root / "docs" / "innocent.txt"
    link.symlink_to(outside / "secret.txt")
    with pytest.raises(UnparseableDocument) as caught:
        read_file_reference(link.as_uri(), [root], 100)
    assert "outside the allowed roots" in caught.value.reason
    assert str(outside / "secret.txt") in caught.value.reason


def test_symlink_within_root_keeps_its_name(roots: tuple[Path, Path]) -> None:
    root, _ = roots
    (root / "blob-3f2a").write_bytes(b"%PDF-1.4 ...")
    (root / "docs" / "report.pdf").symlink_to(root / "blob-3f2a")
    assert read_file_reference(str(root / "docs" / "report.pdf"), [root], 100) == (
        b"%PDF-1.4 ...",
        "report.pdf",
    )


def test_root_given_through_a_symlink(roots: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = roots
    (root / "docs" / "a.md").write_bytes(b"# A")
    alias = tmp_path / "kb-alias"
    alias.symlink_to(root)
    assert read_file_reference(str(alias / "docs" / "a.md"), [alias], 100)[0] == b"# A"


def test_reference_too_large_is_refused_before_reading(
    roots: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _ = roots
    big = root / "docs" / "huge.pdf"
    with big.open("wb") as handle:
        handle.truncate(64 * MiB)  # sparse: costs no disk

    def no_open(*args: object, **kwargs: object) -> int:
        raise AssertionError("the file was opened")

    monkeypatch.setattr(os, "open", no_open)
    with pytest.raises(UnparseableDocument) as caught:
        read_file_reference(str(big), [root], 50 * MiB)
    assert "64.0 MiB, above the 50.0 MiB limit" in caught.value.reason


def test_reference_to_missing_file(roots: tuple[Path, Path]) -> None:
    root, _ = roots
    with pytest.raises(UnparseableDocument, match="does not exist"):
        read_file_reference(str(root / "docs" / "gone.txt"), [root], 100)


def test_reference_to_fifo_does_not_block(roots: tuple[Path, Path]) -> None:
    root, _ = roots
    fifo = root / "docs" / "pipe.txt"
    os.mkfifo(fifo)
    with pytest.raises(UnparseableDocument, match="not a regular file"):
        read_file_reference(str(fifo), [root], 100)


def test_reference_with_other_scheme_or_relative_path(roots: tuple[Path, Path]) -> None:
    root, _ = roots
    with pytest.raises(UnparseableDocument, match="scheme s3"):
        read_file_reference("s3://bucket/key.pdf", [root], 100)
    with pytest.raises(UnparseableDocument, match="relative path"):
        read_file_reference("docs/relative.txt", [root], 100)


def test_reference_without_configured_roots(roots: tuple[Path, Path]) -> None:
    root, _ = roots
    with pytest.raises(UnparseableDocument, match="KBSTREAM_ALLOWED_ROOTS"):
        read_file_reference(str(root / "docs" / "x.txt"), [], 100)


def test_lone_surrogates_from_a_format_are_replaced() -> None:
    """A format's own UTF-16 with half a pair (a PDF string, say) must not reach the
    database, the tokenizer or the JSON encoder, which all refuse it on every retry
    (issue 20 item 9); a real pair stays."""
    from infra.extract.model import normalize_output

    assert normalize_output("a\ud800b \udfff c \U0001f600") == "a\ufffdb \ufffd c \U0001f600"
    assert normalize_output("plain\r\ntext") == "plain\ntext"
