"""What `verify --repair` may read to republish a stuck document
(kbstream/verify.py ``_republish_source``), against a real SQLite database:
the document's own upload, or its file reference under the allowed roots;
never the file its ``source`` names, which the publisher chose freely."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from domain.claim_check import upload_prefix
from domain.documents import DocKey, Document
from domain.events import DocumentUpdated
from kbstream.bootstrap import Container
from kbstream.settings import Settings
from kbstream.verify import _republish_source
from producers.uploads import upload_files

pytestmark = pytest.mark.integration

KEY = DocKey("default", "ds", "doc")


@pytest.fixture
def allowed(tmp_path: Path) -> Path:
    root = tmp_path / "allowed"
    root.mkdir()
    return root


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A real file outside the allowed roots."""
    path = tmp_path / "private" / "payroll.txt"
    path.parent.mkdir()
    path.write_text("the zanzibar salary table")
    return path


@pytest.fixture
def c(tmp_path: Path, allowed: Path) -> Iterator[Container]:
    container = Container(Settings(home=tmp_path / "home", allowed_roots=str(allowed)))
    yield container
    container.close()


def stuck(
    c: Container,
    source: str,
    uri: str | None = None,
    content_hash: str | None = None,
    legacy: bool = False,
) -> Document:
    """A document claimed by parse at v1 (as if stuck there)."""
    with c.uow() as w:
        doc = Document.new(KEY, source=source)
        w.documents.add(doc)
        assert doc.start_parsing(1, source, content_hash=content_hash, uri=uri)
        if legacy:  # claimed before migration 0007 recorded the reference
            doc.uri, doc.inline_content = None, None
        w.documents.save(doc)
        w.commit()
    with c.uow(readonly=True) as r:
        stored = r.documents.get(KEY)
    assert stored is not None
    return stored


def payload_keys(c: Container) -> list[str]:
    from sqlalchemy import select

    from infra.db.models import PayloadRow

    with c.database.engine.connect() as conn:
        return list(conn.execute(select(PayloadRow.key)).scalars())


def test_inline_content_is_not_read_again_from_the_file_its_source_names(
    c: Container, secret: Path
) -> None:
    why = _republish_source(c, stuck(c, source=str(secret)))
    assert isinstance(why, str)
    assert "inline content" in why and "publish the document again" in why
    assert payload_keys(c) == []  # nothing was uploaded from the secret file


def test_a_file_reference_outside_the_allowed_roots_is_refused(c: Container, secret: Path) -> None:
    why = _republish_source(c, stuck(c, source="payroll.txt", uri=secret.as_uri()))
    assert isinstance(why, str) and "outside the allowed roots" in why, why
    assert payload_keys(c) == []


def test_a_file_reference_under_the_allowed_roots_is_republished(
    c: Container, allowed: Path
) -> None:
    path = allowed / "a.txt"
    path.write_text("fine")
    event = _republish_source(c, stuck(c, source="shown name", uri=path.as_uri()))
    assert isinstance(event, DocumentUpdated)
    assert (event.uri, event.version, event.source) == (path.as_uri(), 2, "shown name")
    path.unlink()
    why = _republish_source(c, stuck_again(c))
    assert isinstance(why, str) and "is gone" in why, why


def stuck_again(c: Container) -> Document:
    with c.uow(readonly=True) as r:
        doc = r.documents.get(KEY)
    assert doc is not None
    return doc


def test_an_upload_is_republished_while_it_is_stored(
    c: Container, allowed: Path, secret: Path
) -> None:
    path = allowed / "b.txt"
    path.write_text("uploaded text")
    done = upload_files(c.uow, [(KEY, path)], 1000)[KEY]
    # source names the secret file: it plays no part
    event = _republish_source(c, stuck(c, str(secret), done.uri, done.content_hash))
    assert isinstance(event, DocumentUpdated)
    assert (event.uri, event.content_hash) == (done.uri, done.content_hash)
    with c.uow() as w:
        w.payloads.delete_prefix(upload_prefix(KEY))
        w.commit()
    why = _republish_source(c, stuck_again(c))
    assert isinstance(why, str) and "index the file again" in why, why


def test_an_upload_of_another_document_is_refused(c: Container, allowed: Path) -> None:
    path = allowed / "c.txt"
    path.write_text("someone else's text")
    other = upload_files(c.uow, [(DocKey("default", "ds", "other"), path)], 1000)
    forged = other[DocKey("default", "ds", "other")].uri
    why = _republish_source(c, stuck(c, "c.txt", forged))
    assert isinstance(why, str) and "not an upload of document" in why, why


def test_a_document_from_before_the_reference_was_recorded(
    c: Container, allowed: Path, secret: Path
) -> None:
    why = _republish_source(c, stuck(c, str(secret), content_hash="h", legacy=True))
    assert isinstance(why, str) and "publish the document again" in why, why
    assert payload_keys(c) == []
    # its own upload of the content hash it recorded is still the document
    path = allowed / "d.txt"
    path.write_text("old upload")
    done = upload_files(c.uow, [(KEY, path)], 1000)[KEY]
    doc = stuck_again(c)
    doc.content_hash = done.content_hash
    event = _republish_source(c, doc)
    assert isinstance(event, DocumentUpdated) and event.uri == done.uri
