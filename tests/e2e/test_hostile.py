"""Hostile documents through the whole pipeline (real broker, PostgreSQL,
milvus-lite, the real model): each ends in status `error` with a reason a
person can act on, one dead letter saying the same, no segment, vector or
posting of its own, and the good documents published alongside complete
untouched."""

from __future__ import annotations

import io
import os
import random
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import docx
import pytest
from pypdf import PdfWriter
from sqlalchemy import text

from domain.documents import DocKey, IndexingStatus
from domain.events import DocumentCreated, ProcessRule
from kbstream.dlq import list_dead_letters
from tests.e2e.procs import fresh_database, wait_until
from tests.harness import Pipeline, make_settings

pytestmark = pytest.mark.e2e

KiB = 1024
MiB = 1024 * KiB
MAX_BYTES = 64 * KiB  # KBSTREAM_MAX_DOCUMENT_BYTES for these tests


def blank_pdf() -> bytes:
    """A valid PDF whose only page has no text layer (a scan without OCR)."""
    writer = PdfWriter()
    writer.add_blank_page(width=612, height=792)
    buf = io.BytesIO()
    writer.write(buf)
    return buf.getvalue()


def encrypted_pdf() -> bytes:
    writer = PdfWriter()
    writer.add_blank_page(width=612, height=792)
    writer.encrypt(user_password="secret", owner_password="owner", algorithm="RC4-128")
    buf = io.BytesIO()
    writer.write(buf)
    return buf.getvalue()


def zip_of(members: dict[str, bytes | int]) -> bytes:
    """A deflated zip; an int member is that many zero bytes, streamed in."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in members.items():
            if isinstance(content, bytes):
                archive.writestr(name, content)
                continue
            with archive.open(name, "w", force_zip64=True) as member:
                for _ in range(content // MiB):
                    member.write(bytes(MiB))
    return buf.getvalue()


def forged_size(archive: bytes, declared: int) -> bytes:
    """Rewrite a member's uncompressed size in the central directory, as a bomb would."""
    import struct

    at = archive.rindex(b"PK\x01\x02") + 24
    return archive[:at] + struct.pack("<I", declared) + archive[at + 4 :]


def good_docx(text: str) -> bytes:
    d = docx.Document()
    d.add_heading("Tide tables", level=1)
    d.add_paragraph(text)
    buf = io.BytesIO()
    d.save(buf)
    return buf.getvalue()


def invalid_utf8_soup() -> bytes:
    """Bytes that are neither valid UTF-8 nor one consistent legacy encoding:
    truncated and overlong UTF-8 sequences, lone continuation bytes, encoded
    surrogates, GBK and Latin-1 fragments, with a little readable text (no
    NUL or control bytes, so it passes the plain binary sniff)."""
    rng = random.Random(11)
    pieces = [
        b"\xe6\x96",
        b"\xc0\xaf",
        b"\x80\x81",
        b"\xed\xa0\x80",
        b"\xf8\x88\x80",
        "café".encode("latin-1"),
        "文档".encode("gbk"),
        "索引".encode(),
        b"ok ",
    ]
    return b"".join(rng.choice(pieces) for _ in range(400))


@pytest.fixture
def pipeline(tmp_path: Path, tansu: str, topic_prefix: str) -> Iterator[Pipeline]:
    with fresh_database() as (url, _):
        home = tmp_path / "home"
        settings = make_settings(
            home, tansu, topic_prefix, database_url=url, max_document_bytes=MAX_BYTES
        )
        with Pipeline(settings) as p:
            yield p


GOOD = {
    "tides.txt": b"High tide at the harbour arrives forty minutes later each day.",
    "moon.md": b"# Moon\n\nThe moon's pull on the oceans causes two tides a day.",
}


def publish_files(p: Pipeline, dataset: str, files: dict[str, bytes]) -> dict[str, str]:
    """Write the files under the allowed root and publish a created event per
    file; returns document_id -> file name."""
    root = p.settings.home / "docs"
    root.mkdir(parents=True, exist_ok=True)
    ids = {}
    events = []
    for i, (name, data) in enumerate(files.items()):
        path = root / name
        if not path.exists():  # a FIFO or symlink the test prepared stays as it is
            path.write_bytes(data)
        doc_id = f"h{i:02d}"
        ids[doc_id] = name
        events.append(
            DocumentCreated(
                dataset_id=dataset, document_id=doc_id, source=str(path), uri=path.as_uri()
            )
        )
    p.publish(*events)
    return ids


def test_hostile_documents_fail_alone_with_a_reason(pipeline: Pipeline) -> None:
    p = pipeline
    docs_dir = p.settings.home / "docs"
    docs_dir.mkdir(parents=True, exist_ok=True)
    (docs_dir / "fifo.txt").unlink(missing_ok=True)
    os.mkfifo(docs_dir / "fifo.txt")
    outside = p.settings.home.parent / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("a file outside the allowed roots")
    (docs_dir / "escape.txt").symlink_to(outside / "secret.txt")

    hostile: dict[str, tuple[bytes, str]] = {
        "empty.txt": (b"", "file is empty"),
        "junk.txt": (random.Random(7).randbytes(4096) + b"\x00", "binary content in a .txt file"),
        "noise.csv": (
            bytes(b for b in random.Random(8).randbytes(8192) if b),
            "binary content",
        ),
        "scan.pdf": (blank_pdf(), "no text layer"),
        "locked.pdf": (encrypted_pdf(), "password-protected"),
        "broken.pdf": (b"%PDF-1.7\n" + random.Random(3).randbytes(2048), "PDF is corrupted"),
        "broken.docx": (random.Random(5).randbytes(4096), "DOCX is corrupted"),
        "bomb.docx": (
            zip_of({"[Content_Types].xml": b"<Types/>", "word/media/pad.bin": 12 * MiB}),
            "decompression bomb",
        ),
        "forged.docx": (
            forged_size(zip_of({"word/document.xml": b"<w:document/>"}), 300_000_000),
            "decompression bomb",
        ),
        "huge.txt": (
            b"All work and no play makes a very large file. " * (2 * MAX_BYTES // 40),
            "KBSTREAM_MAX_DOCUMENT_BYTES",
        ),
        "fifo.txt": (b"", "not a regular file"),
        "escape.txt": (b"", "outside the allowed roots"),
    }
    files = {name: data for name, (data, _) in hostile.items()}
    files["minutes.docx"] = good_docx("The tide tables are printed every spring.")
    files.update(GOOD)
    ids = publish_files(p, "hostile", files)
    by_name = {name: doc_id for doc_id, name in ids.items()}
    # references that are not files under the allowed roots at all
    refs = {
        "passwd": ("file:///etc/passwd", "outside the allowed roots"),
        "dotdot": (
            (docs_dir / ".." / ".." / "outside" / "secret.txt").as_posix(),
            "outside the allowed roots",
        ),
        "missing": ((docs_dir / "gone.txt").as_uri(), "does not exist"),
        "remote": ("file://fileserver/share/x.txt", "not this machine"),
        "http": ("https://example.com/x.txt", "scheme https is not supported"),
    }
    p.publish(
        *[
            DocumentCreated(dataset_id="hostile", document_id=f"ref-{k}", source=k, uri=uri)
            for k, (uri, _) in refs.items()
        ]
    )
    every = [*ids, *(f"ref-{k}" for k in refs)]
    states = p.wait_for("hostile", every, timeout=240)

    expected = {by_name[n]: reason for n, (_, reason) in hostile.items()}
    expected.update({f"ref-{k}": reason for k, (_, reason) in refs.items()})
    for doc_id, reason in expected.items():
        st = states[doc_id]
        assert st.status is IndexingStatus.ERROR, (doc_id, ids.get(doc_id), st)
        assert st.error and reason in st.error, (doc_id, ids.get(doc_id), st.error)
        snap = p.snapshot("hostile", doc_id)
        assert not (snap.segments or snap.vectors or snap.texts), doc_id
    # the reason names the limit that was hit
    huge = states[by_name["huge.txt"]].error or ""
    assert "above the 64.0 KiB limit" in huge
    # and nothing else is affected
    for name in ("minutes.docx", *GOOD):
        doc_id = by_name[name]
        assert states[doc_id].status is IndexingStatus.COMPLETED, (name, states[doc_id])
        snap = p.snapshot("hostile", doc_id)
        assert snap.segments and snap.consistent and snap.texts == snap.segments, name
    assert p.pool is not None and p.pool.alive()
    # each broken document is dead-lettered once by parse, with its reason;
    # nothing else is
    letters = list_dead_letters(p.settings.brokers or "", p.container.topics)
    assert sorted(d.key or "" for d in letters) == sorted(expected)
    for d in letters:
        assert d.headers["kb-stage"] == "parse", d.to_dict()
        assert d.headers["kb-error-class"] == "UnparseableDocument", d.to_dict()
        assert expected[d.key or ""] in d.headers["kb-error"], d.to_dict()


def test_invalid_utf8_soup_fails_with_an_encoding_reason(pipeline: Pipeline) -> None:
    p = pipeline
    ids = publish_files(p, "soup", {"soup.txt": invalid_utf8_soup(), **GOOD})
    states = p.wait_for("soup", ids, timeout=180)
    for doc_id, name in ids.items():
        if name in GOOD:
            assert states[doc_id].status is IndexingStatus.COMPLETED
    soup = next(states[d] for d, n in ids.items() if n == "soup.txt")
    assert soup.status is IndexingStatus.ERROR, soup
    assert soup.error and any(w in soup.error.lower() for w in ("encoding", "utf-8", "decode"))


def test_another_tenant_cannot_overwrite_a_tenants_segments(pipeline: Pipeline) -> None:
    p = pipeline
    text = "The shared onboarding handbook explains how to request a badge."
    for tenant, timeout in (("acme", 120), ("globex", 45)):
        p.publish(
            DocumentCreated(
                tenant_id=tenant,
                dataset_id="kb",
                document_id="handbook",
                source="handbook.txt",
                content=text,
            )
        )
        key = DocKey(tenant, "kb", "handbook")
        wait_until(lambda key=key: _finished(p, key), timeout)
    for tenant in ("acme", "globex"):
        key = DocKey(tenant, "kb", "handbook")
        with p.container.uow(readonly=True) as uow:
            st = uow.documents.get(key)
            segments = uow.segments.ids_for_document(key)
        assert st is not None and st.status is IndexingStatus.COMPLETED, st
        vectors = set(p.container.vectors.ids_for_document(key))
        assert segments and segments == vectors, (tenant, segments, vectors)


def test_nul_in_an_event_field_is_dead_lettered_at_once(pipeline: Pipeline) -> None:
    p = pipeline
    p.publish(
        DocumentCreated(
            dataset_id="nul", document_id="evil", source="evil\x00name.txt", content="Some text."
        )
    )
    ids = publish_files(p, "nul", GOOD)
    p.wait_for("nul", ids, timeout=180)
    assert wait_until(
        lambda: any(
            d.key == "evil" for d in list_dead_letters(p.settings.brokers or "", p.container.topics)
        ),
        120,
        1,
    )
    (letter,) = [
        d
        for d in list_dead_letters(p.settings.brokers or "", p.container.topics)
        if d.key == "evil"
    ]
    assert letter.headers["kb-error-class"] == "InvalidEvent", letter.to_dict()
    assert letter.headers["kb-attempts"] == "1", letter.to_dict()


def test_schema_valid_poison_is_dead_lettered_at_once_with_its_reason(
    pipeline: Pipeline,
) -> None:
    """Issue 20 items 9 and 10: events the schema took that a stage then failed on
    every retry (a lone surrogate the database and tokenizer refuse, a separator
    whose escapes do not decode, a version no BIGINT holds, an overlap that
    multiplies the segments) were retried as transient for about 10 s, then
    dead-lettered raw. Each is now one dead letter with its reason, after one
    attempt, and the consumers go on."""
    import json

    p = pipeline
    created = {
        "type": "document.created",
        "dataset_id": "poison",
        "source": "p.txt",
        "content": "Some text about the tides.",
    }
    custom = {"mode": "custom"}
    lifecycle = {
        "surrogate": ({**created, "content": "half a pair \ud800 here"}, "surrogate"),
        "separator": (
            {**created, "process_rule": {**custom, "separator": "\\x"}},
            "does not decode",
        ),
        "version": ({**created, "version": 2**63}, "version"),
        "overlap": (
            {**created, "process_rule": {**custom, "max_tokens": 16, "chunk_overlap": 15}},
            "more than half of max_tokens 16",
        ),
    }
    parsed = {  # a stage topic: split, not parse, meets it
        "type": "document.parsed",
        "dataset_id": "poison",
        "document_id": "parsed-surrogate",
        "version": 1,
        "source": "p.txt",
        "text": "tail \udfff",
        "chars": 6,
    }
    topics = p.container.topics
    for doc_id, (obj, _) in lifecycle.items():
        p.publish_raw(
            topics.lifecycle, json.dumps({**obj, "document_id": doc_id}).encode(), doc_id.encode()
        )
    p.publish_raw(topics.parsed, json.dumps(parsed).encode(), b"parsed-surrogate")
    ids = publish_files(p, "poison", GOOD)
    states = p.wait_for("poison", ids, timeout=180)
    assert all(st.status is IndexingStatus.COMPLETED for st in states.values()), states

    brokers = p.settings.brokers or ""
    wanted = {
        **{d: ("parse", r) for d, (_, r) in lifecycle.items()},
        "parsed-surrogate": ("split", "surrogate"),
    }
    assert wait_until(
        lambda: {d.key for d in list_dead_letters(brokers, topics)} >= set(wanted), 120, 1
    )
    letters = [d for d in list_dead_letters(brokers, topics) if d.key in wanted]
    assert sorted(d.key or "" for d in letters) == sorted(wanted)  # one each
    for d in letters:
        stage, reason = wanted[d.key or ""]
        assert d.headers["kb-stage"] == stage, d.to_dict()
        assert d.headers["kb-error-class"] == "InvalidEvent", d.to_dict()
        assert d.headers["kb-attempts"] == "1", d.to_dict()  # no retries as transient
        assert reason in d.headers["kb-error"], d.to_dict()
        assert p.state("poison", d.key or "") is None  # nothing was written for it


def test_a_document_over_the_segment_cap_ends_in_error(
    tmp_path: Path, tansu: str, topic_prefix: str
) -> None:
    """Issue 20 item 10: the segment cap is a document error with the count and what
    to change, dead-lettered once; a document under it completes."""
    many = "\n\n".join(f"Paragraph {i} about the harbour tides and the moon." for i in range(12))
    with fresh_database() as (url, _):
        settings = make_settings(
            tmp_path / "home", tansu, topic_prefix, database_url=url, max_segments_per_document=5
        )
        with Pipeline(settings) as p:
            rule = ProcessRule(mode="custom", separator="\n\n", max_tokens=32, chunk_overlap=0)
            p.publish(
                DocumentCreated(
                    dataset_id="cap",
                    document_id="big",
                    source="big.txt",
                    content=many,
                    process_rule=rule,
                ),
                DocumentCreated(
                    dataset_id="cap",
                    document_id="small",
                    source="small.txt",
                    content=GOOD["tides.txt"].decode(),
                    process_rule=rule,
                ),
            )
            states = p.wait_for("cap", ["big", "small"], timeout=180)
            assert states["small"].status is IndexingStatus.COMPLETED
            big = states["big"]
            assert big.status is IndexingStatus.ERROR and big.error, big
            assert "would make 12 segments" in big.error
            assert "above the limit of 5 per document" in big.error
            assert not p.snapshot("cap", "big").segments
            brokers = p.settings.brokers or ""
            assert wait_until(
                lambda: any(d.key == "big" for d in list_dead_letters(brokers, p.container.topics)),
                60,
                1,
            )
            (letter,) = [
                d for d in list_dead_letters(brokers, p.container.topics) if d.key == "big"
            ]
            assert letter.headers["kb-stage"] == "split" and letter.headers["kb-attempts"] == "1"


def test_a_fixed_document_replayed_from_the_dlq_completes(pipeline: Pipeline) -> None:
    """The operator's loop: a broken file fails and is dead-lettered; the file
    is fixed; `kbstream dlq replay --stage parse` sends the same event again and
    the document completes, without a second dead letter."""
    import json
    import subprocess
    import sys

    p = pipeline
    ids = publish_files(p, "fixme", {"draft.txt": b"", **GOOD})
    draft = next(d for d, n in ids.items() if n == "draft.txt")
    states = p.wait_for("fixme", ids, timeout=180)
    assert states[draft].status is IndexingStatus.ERROR
    brokers = p.settings.brokers or ""
    assert wait_until(lambda: len(list_dead_letters(brokers, p.container.topics)) == 1, 60, 1)

    (p.settings.home / "docs" / "draft.txt").write_text("The draft now has its text.")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KBSTREAM_")}
    env.update(
        KBSTREAM_BROKERS=brokers,
        KBSTREAM_TOPIC_PREFIX=p.settings.topic_prefix,
        KBSTREAM_HOME=str(p.settings.home / "cli"),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "kbstream.cli", "dlq", "replay", "--stage", "parse", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["replayed"] == 1

    assert wait_until(
        lambda: (
            (st := p.state("fixme", draft)) is not None and st.status is IndexingStatus.COMPLETED
        ),
        120,
    ), p.state("fixme", draft)
    snap = p.snapshot("fixme", draft)
    assert snap.segments and snap.consistent and snap.texts == snap.segments
    assert len(list_dead_letters(brokers, p.container.topics)) == 1


def test_repair_never_reads_the_file_an_events_source_names(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    """Issue 20, item 1: a document published inline whose ``source`` names a
    real file outside the allowed roots, stuck mid-pipeline, then
    `verify --repair`: the file is not read (its text is nowhere: not in the
    database, not searchable) and the report says why and what to do. A stuck
    document with a file reference under the allowed roots is repaired."""
    from kbstream.search import search
    from kbstream.verify import repair

    p = pipeline
    secret = tmp_path / "private" / "payroll.txt"  # the allowed root is the home
    secret.parent.mkdir()
    secret.write_text("The quokkaberry salary table lists every executive bonus.")
    ids = publish_files(p, "rep", {"fine.txt": b"High tide at the harbour comes at noon."})
    p.publish(
        DocumentCreated(
            dataset_id="rep",
            document_id="inline",
            source=str(secret),
            content="A harmless note about the harbour pilots.",
        )
    )
    p.wait_for("rep", ["inline", *ids], timeout=180)
    an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
    for doc_id in ["inline", *ids]:  # stuck: as if a stage had lost them
        with p.container.uow() as uow:
            doc = uow.documents.get(DocKey(p.tenant, "rep", doc_id), for_update=True)
            assert doc is not None
            doc.status, doc.updated_at = IndexingStatus.SPLITTING, an_hour_ago
            uow.documents.save(doc)
            uow.commit()

    report = repair(p.container, "rep", stuck_after=60, timeout=180).to_dict()

    hits = search(p.container, "rep", "quokkaberry salary table executive bonus", "hybrid", 10)
    assert hits and all("quokkaberry" not in h.content for h in hits), hits
    with p.container.database.engine.connect() as conn:
        contents = conn.execute(text("SELECT content FROM segments")).scalars()
        assert not any("quokkaberry" in v for v in contents)
        payloads = conn.execute(text("SELECT data FROM payloads")).scalars()
        assert not any(b"quokkaberry" in bytes(v) for v in payloads)
    (left,) = report["not_repaired"]
    assert (left["problem"], left["document_id"]) == ("stuck", "inline"), report
    assert "inline content" in left["reason"] and "publish the document again" in left["reason"]
    assert [(d["problem"], d["document_id"]) for d in report["repaired"]] == [("stuck", "h00")]
    fine = p.state("rep", "h00")
    assert fine is not None and (fine.version, fine.status) == (2, IndexingStatus.COMPLETED)


def _finished(p: Pipeline, key: DocKey) -> bool:
    with p.container.uow(readonly=True) as uow:
        st = uow.documents.get(key)
    return st is not None and st.status.finished


@pytest.fixture
def claim_checked(tmp_path: Path, tansu: str, topic_prefix: str) -> Iterator[Pipeline]:
    """A pipeline whose parsed texts above 1 KiB travel by claim check."""
    with fresh_database() as (url, _):
        settings = make_settings(
            tmp_path / "home", tansu, topic_prefix, database_url=url, inline_text_bytes=1024
        )
        with Pipeline(settings) as p:
            yield p


def test_forged_internal_events_cannot_touch_another_tenants_document(
    claim_checked: Pipeline,
) -> None:
    """Issue 20 item 2: the publisher of internal topics names another
    tenant's claim-check key and segment ids for its own document. Every
    forged event is dead-lettered, and the victim's text, vectors and keyword
    entities stay exactly as they were; search never resolves a foreign id."""
    from domain.claim_check import parsed_key
    from domain.events import (
        DocumentParsed,
        EmbeddedRef,
        Event,
        SegmentPayload,
        SegmentsEmbedded,
        SegmentsRemoved,
        SegmentsSplit,
    )
    from domain.ports import KeywordRow, VectorRow
    from domain.segments import compute_doc_hash
    from kbstream.search import search

    p, c = claim_checked, claim_checked.container
    victim = DocKey("acme", "kb", "handbook")  # ids may contain '/'
    mine = DocKey(p.tenant, "kb", "mine")  # the publisher's own document
    secret = " ".join(
        f"Badge request {i}: the vault code for the east wing is zebra{i}." for i in range(40)
    )
    p.publish(
        DocumentCreated(
            tenant_id="acme",
            dataset_id="kb",
            document_id="handbook",
            source="h.txt",
            content=secret,
        ),
        DocumentCreated(dataset_id="kb", document_id="mine", source="m.txt", content="My notes."),
    )
    for key in (victim, mine):
        wait_until(lambda key=key: _finished(p, key), 240)

    def victim_state() -> tuple[object, ...]:
        with c.uow(readonly=True) as uow:
            doc = uow.documents.get(victim)
            rows = uow.segments.by_ids(sorted(uow.segments.ids_for_document(victim)))
        ids = sorted(rows)
        texts = set(c.keyword_index.ids_for_document(victim))
        return (
            doc.status if doc else None,
            {i: r.content for i, r in rows.items()},
            c.vectors.vectors(ids),
            set(c.vectors.ids_for_document(victim)),
            texts,
        )

    before = victim_state()
    assert before[0] is IndexingStatus.COMPLETED and before[1]
    with c.uow(readonly=True) as uow:
        assert uow.payloads.get(parsed_key(victim, 1)) is not None  # by claim check
        attacker_doc = uow.documents.get(mine)
        own = next(iter(uow.segments.by_ids(sorted(uow.segments.ids_for_document(mine))).values()))
    assert attacker_doc is not None
    version = attacker_doc.version
    victim_ids = sorted(before[1])  # type: ignore[arg-type]
    provider, model, _ = c.model_identity
    envelope = {"dataset_id": "kb", "document_id": "mine", "version": version}
    forged: list[tuple[str, Event]] = [
        (
            c.topics.parsed,
            DocumentParsed(
                **envelope, source="m.txt", text_ref=parsed_key(victim, 1), chars=len(secret)
            ),
        ),
        (
            c.topics.segments,
            SegmentsSplit(
                **envelope,
                segments=[
                    SegmentPayload(
                        index_node_id=victim_ids[0],
                        doc_hash=compute_doc_hash("planted"),
                        position=0,
                        content="planted",
                    )
                ],
            ),
        ),
        (c.topics.segments, SegmentsRemoved(**envelope, index_node_ids=victim_ids)),
        (
            c.topics.embedded,
            SegmentsEmbedded(
                **envelope,
                provider=provider,
                model=model,
                segments=[EmbeddedRef(index_node_id=victim_ids[-1], doc_hash=own.doc_hash)],
            ),
        ),
    ]
    for topic, event in forged:
        p.publish(event, topic=topic)
    # split 1, embed and index_keywords 2, index_keywords and load_vectors 2
    # (embed passes the removal on), load_vectors 1
    brokers = p.settings.brokers or ""

    def letters() -> list[dict[str, object]]:
        return [d.to_dict() for d in list_dead_letters(brokers, c.topics) if d.key == "mine"]

    assert wait_until(lambda: len(letters()) >= 6, 120, 1), letters()
    p.drain()
    got = letters()
    assert len(got) == 6, got
    for letter in got:
        error = str(letter["error"])
        assert "another document" in error or "is not the text of document" in error, letter
    assert victim_state() == before
    with c.uow(readonly=True) as uow:
        assert not any(
            "zebra" in r.content for r in uow.segments.by_ids([own.index_node_id]).values()
        )

    # an entity carrying the victim's id in the publisher's dataset (a write by
    # id before this fix) resolves to nothing: search checks tenant and dataset
    c.keyword_index.upsert([KeywordRow(victim_ids[0], mine, "vault code zebra0")])
    c.vectors.upsert([VectorRow(victim_ids[0], c.provider.embed(["vault code zebra0"])[0], mine)])
    for mode in ("keyword", "vector", "hybrid"):
        hits = search(c, "kb", "vault code zebra0", mode, 10)  # type: ignore[arg-type]
        assert victim_ids[0] not in {h.index_node_id for h in hits}, (mode, hits)
        assert not any("zebra" in h.content for h in hits), (mode, hits)
