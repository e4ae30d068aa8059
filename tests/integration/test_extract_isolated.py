"""extract_text_isolated: real child processes, real rlimits, a real decompression-bomb PDF.

Crashes are produced by swapping the function the child runs (``isolated._ENTRY``) for
one of the module-level functions below; the child imports it by name, so production
code holds no test hook.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import docx
import pytest
from pypdf import PdfWriter
from pypdf.generic import DictionaryObject, NameObject, StreamObject

from domain.errors import UnparseableDocument
from infra.extract import ExtractedText, ExtractLimits, extract_text, isolated
from infra.extract.isolated import IN_PROCESS_MAX_BYTES, extract_text_isolated
from tests.polling import poll
from tests.unit.test_extract import DOCX_MIME, text_pdf

MiB = 1024 * 1024


def bomb_pdf(pages: int, operations: int) -> bytes:
    """Every page draws the same FlateDecode content stream: a few KB on disk, but each
    page parses the whole inflated stream again (the 2,000-page, 70 MB case in small)."""
    writer = PdfWriter()
    font = writer._add_object(
        DictionaryObject(
            {
                NameObject("/Type"): NameObject("/Font"),
                NameObject("/Subtype"): NameObject("/Type1"),
                NameObject("/BaseFont"): NameObject("/Helvetica"),
            }
        )
    )
    stream = StreamObject()
    stream.set_data(b"BT /F1 12 Tf 72 720 Td ( ) Tj ET\n" * operations)
    content = writer._add_object(stream.flate_encode(level=9))
    for _ in range(pages):
        page = writer.add_blank_page(612, 792)
        fonts = DictionaryObject({NameObject("/F1"): font})
        page[NameObject("/Resources")] = DictionaryObject({NameObject("/Font"): fonts})
        page[NameObject("/Contents")] = content
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def docx_bytes(paragraphs: list[str]) -> bytes:
    document = docx.Document()
    for text in paragraphs:
        document.add_paragraph(text)
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def reason_of(data: bytes, filename: str, **limits: float) -> str:
    with pytest.raises(UnparseableDocument) as caught:
        extract_text_isolated(data, filename, None, ExtractLimits(**limits))  # type: ignore[arg-type]
    return caught.value.reason


# -- what the child runs instead of extract_text in the crash tests -----------------------


def segfault(*_: object) -> ExtractedText:
    os.kill(os.getpid(), signal.SIGSEGV)
    raise AssertionError("unreachable")


def killed(*_: object) -> ExtractedText:  # what the kernel's OOM killer does
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable")


def hangs(*_: object) -> ExtractedText:  # blocked, not computing: only the wall clock sees it
    time.sleep(60)
    raise AssertionError("unreachable")


def hangs_and_tells(*_: object) -> ExtractedText:
    Path(os.environ["KBSTREAM_TEST_CHILD_PID_FILE"]).write_text(str(os.getpid()))
    return hangs()


def allocates(*_: object) -> ExtractedText:
    blocks = [bytearray(64 * MiB) for _ in range(16)]
    raise AssertionError(f"allocated {len(blocks) * 64} MiB under the memory limit")


def buggy(*_: object) -> ExtractedText:
    raise ValueError("a bug in an extractor")


def reports_pid(*_: object) -> ExtractedText:
    return ExtractedText(text=str(os.getpid()), mime_type="text/plain", encoding=None, pages=None)


# -- limits ---------------------------------------------------------------------------------


def test_decompression_bomb_pdf_stops_at_the_cpu_limit() -> None:
    data = bomb_pdf(pages=200, operations=20_000)  # about two minutes of CPU in-process
    assert len(data) < 64 * 1024, "passes every size check"

    started = time.monotonic()
    reason = reason_of(data, "bomb.pdf", cpu_seconds=1, wall_seconds=60)
    elapsed = time.monotonic() - started

    assert "exceeded 1 s of CPU time" in reason
    assert "KBSTREAM_EXTRACT_CPU_SECONDS" in reason
    assert "decompression bomb" in reason
    assert elapsed < 15, f"took {elapsed:.1f} s"


def test_a_blocked_child_is_killed_at_the_wall_clock_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(isolated, "_ENTRY", hangs)
    started = time.monotonic()
    reason = reason_of(text_pdf(["x"]), "a.pdf", wall_seconds=1)
    assert time.monotonic() - started < 10
    assert "longer than 1 s" in reason and "KBSTREAM_EXTRACT_WALL_SECONDS" in reason


def test_memory_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(isolated, "_ENTRY", allocates)
    reason = reason_of(text_pdf(["x"]), "a.pdf", memory_bytes=512 * MiB)
    assert "exceeded 512.0 MiB of memory" in reason
    assert "KBSTREAM_EXTRACT_MEMORY_BYTES" in reason


# -- crashes ----------------------------------------------------------------------------------


def test_segfault_becomes_a_document_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(isolated, "_ENTRY", segfault)
    reason = reason_of(text_pdf(["x"]), "a.pdf")
    assert "crashed" in reason and "SIGSEGV" in reason
    assert not list(Path.cwd().glob("core*")), "a crash must not leave a core file"


def test_oom_kill_becomes_a_document_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(isolated, "_ENTRY", killed)
    reason = reason_of(docx_bytes(["x"]), "a.docx")
    assert "SIGKILL" in reason and "out of memory" in reason


def test_a_bug_in_the_child_is_raised_as_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(isolated, "_ENTRY", buggy)
    with pytest.raises(ValueError, match="a bug in an extractor"):
        extract_text_isolated(text_pdf(["x"]), "a.pdf")


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_killed_worker_leaves_no_child_behind(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    worker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from infra.extract import isolated; "
            "from tests.integration.test_extract_isolated import hangs_and_tells, text_pdf; "
            "isolated._ENTRY = hangs_and_tells; "
            "isolated.extract_text_isolated(text_pdf(['x']), 'a.pdf')",
        ],
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "KBSTREAM_TEST_CHILD_PID_FILE": str(pid_file)},
    )
    try:
        assert poll(lambda: pid_file.exists() and pid_file.read_text() != "", 30)
        child = int(pid_file.read_text())
        assert running(child)
    finally:
        worker.kill()
        worker.wait()
    assert poll(lambda: not running(child), 10), "the child outlived its worker"


# -- same results as extract_text ---------------------------------------------------------------


def big_html() -> bytes:
    rows = "".join(f"<p>Paragraph {i} with <b>bold</b> text.</p>" for i in range(3000))
    return f"<html><body><nav>menu</nav>{rows}</body></html>".encode()


@pytest.mark.parametrize(
    ("data", "filename", "mime_type"),
    [
        (text_pdf(["first page", "second page"]), "a.pdf", None),
        (docx_bytes(["Title", "Body paragraph"]), "a.bin", DOCX_MIME),
        (big_html(), "page.html", None),
        ("naïve café\n".encode("latin-1") * 10_000, "notes.txt", None),
        (b"# Title\n\nBody *text*.\n", "small.md", None),
    ],
    ids=["pdf", "docx", "html", "latin-1 text", "small markdown"],
)
def test_same_result_as_extract_text(data: bytes, filename: str, mime_type: str | None) -> None:
    assert extract_text_isolated(data, filename, mime_type) == extract_text(
        data, filename, mime_type
    )


def test_document_errors_keep_their_reason() -> None:
    corrupt = b"%PDF-1.4\n" + b"garbage" * 100
    with pytest.raises(UnparseableDocument) as in_process:
        extract_text(corrupt, "a.pdf")
    assert reason_of(corrupt, "a.pdf") == in_process.value.reason


def test_only_small_text_documents_skip_the_child(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(isolated, "_ENTRY", reports_pid)
    small = b"x" * IN_PROCESS_MAX_BYTES
    assert extract_text_isolated(small, "a.txt").text == small.decode()  # parsed right here
    for data, filename in [(small + b"x", "a.txt"), (text_pdf(["x"]), "a.pdf")]:
        child_pid = extract_text_isolated(data, filename).text
        assert child_pid.isdigit() and child_pid != str(os.getpid()), filename


def test_concurrent_callers_each_get_their_own_result() -> None:
    documents = [text_pdf([f"document {i}"]) for i in range(6)]
    results: dict[int, str] = {}

    def extract(i: int) -> None:
        results[i] = extract_text_isolated(documents[i], f"{i}.pdf").text

    threads = [threading.Thread(target=extract, args=(i,)) for i in range(len(documents))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == {i: f"document {i}" for i in range(len(documents))}
