"""Segment, the identities that make every stage idempotent (doc_hash,
index_node_id), and the diff an update applies. The Document aggregate and
its rules live in domain/documents.py."""

from __future__ import annotations

import hashlib
import re
import unicodedata
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

# Fixed namespace: index_node_ids must be identical across machines and replays.
INDEX_NODE_NAMESPACE = uuid.UUID("6f1c2d0e-8b7a-4c55-9a3e-2f6d1b9c4e71")


@dataclass(frozen=True)
class Segment:
    """One chunk of a document as it will be embedded and searched.

    For Q&A documents ``content`` is the question (embedded, searched) and
    ``answer`` is returned with it; for parent-child documents ``content`` is
    the child chunk and ``parent`` the context returned with it."""

    index_node_id: str
    doc_hash: str
    position: int
    content: str
    answer: str | None = None
    parent: str | None = None
    tokens: int = 0

    @property
    def word_count(self) -> int:
        return count_words(self.content) + (count_words(self.answer) if self.answer else 0)


def normalize_for_hash(text: str) -> str:
    """Content equality that ignores what cleaning may legitimately vary:
    Unicode form and runs of whitespace."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def compute_doc_hash(content: str, answer: str | None = None, parent: str | None = None) -> str:
    h = hashlib.sha256(normalize_for_hash(content).encode())
    if answer is not None:
        h.update(b"\x00answer\x00" + normalize_for_hash(answer).encode())
    if parent is not None:
        h.update(b"\x00parent\x00" + normalize_for_hash(parent).encode())
    return h.hexdigest()


def make_index_node_id(
    dataset_id: str,
    document_id: str,
    doc_hash: str,
    occurrence: int = 0,
    tenant_id: str = "default",
) -> str:
    """Deterministic id of a segment: the same document and content always give
    the same id (a replay overwrites, never duplicates), while identical content
    in two documents, twice in one, or in two tenants gets distinct ids."""
    name = f"{dataset_id}\x1f{document_id}\x1f{doc_hash}\x1f{occurrence}"
    if tenant_id != "default":  # ids of the default tenant stay what they were
        name = f"{tenant_id}\x1e{name}"
    return str(uuid.uuid5(INDEX_NODE_NAMESPACE, name))


@dataclass(frozen=True)
class ChunkText:
    content: str
    answer: str | None = None
    parent: str | None = None
    tokens: int = 0


def build_segments(
    dataset_id: str,
    document_id: str,
    chunks: Sequence[ChunkText],
    start_position: int = 0,
    tenant_id: str = "default",
) -> list[Segment]:
    """Give chunks their doc_hash, index_node_id and position."""
    seen: Counter[str] = Counter()
    out: list[Segment] = []
    for i, chunk in enumerate(chunks):
        doc_hash = compute_doc_hash(chunk.content, chunk.answer, chunk.parent)
        occurrence = seen[doc_hash]
        seen[doc_hash] += 1
        out.append(
            Segment(
                index_node_id=make_index_node_id(
                    dataset_id, document_id, doc_hash, occurrence, tenant_id
                ),
                doc_hash=doc_hash,
                position=start_position + i,
                content=chunk.content,
                answer=chunk.answer,
                parent=chunk.parent,
                tokens=chunk.tokens,
            )
        )
    return out


@dataclass(frozen=True)
class ExistingSegment:
    index_node_id: str
    doc_hash: str
    position: int
    indexed: bool  # both the vector and the keyword branch have it


@dataclass(frozen=True)
class StoredSegment:
    """A segment as the database holds it, with both branches' flags."""

    index_node_id: str
    document_id: str
    doc_hash: str
    position: int
    content: str
    answer: str | None = None
    parent: str | None = None
    tokens: int = 0
    word_count: int = 0
    vector_indexed: bool = False
    keywords_indexed: bool = False
    job_id: str | None = None
    source: str = ""
    # segment.disabled switched it off
    enabled: bool = True
    # it belongs in both indexes: enabled, of an enabled, unarchived document
    searchable: bool = True

    @property
    def searchable_text(self) -> str:
        """What the keyword index sees: the question and its answer."""
        return self.content if not self.answer else f"{self.content}\n{self.answer}"


@dataclass(frozen=True)
class SegmentDiff:
    """What an update does: ``to_index`` go through embed/load/keywords,
    ``kept`` stay as they are (maybe with a new position), ``removed`` go."""

    to_index: list[Segment] = field(default_factory=list)
    kept: list[Segment] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    added_count: int = 0

    @property
    def kept_count(self) -> int:
        return len(self.kept)


def diff_segments(existing: Iterable[ExistingSegment], new: Sequence[Segment]) -> SegmentDiff:
    """Keyed on index_node_id (document + doc_hash + occurrence). A kept segment
    that never finished indexing (a crash, a superseded version) is indexed
    again; that costs a cache hit, not an embedding."""
    by_id = {e.index_node_id: e for e in existing}
    new_ids = {s.index_node_id for s in new}
    to_index: list[Segment] = []
    kept: list[Segment] = []
    added = 0
    for seg in new:
        old = by_id.get(seg.index_node_id)
        if old is None:
            added += 1
            to_index.append(seg)
        elif not old.indexed:
            to_index.append(seg)
            kept.append(seg)
        else:
            kept.append(seg)
    removed = sorted(i for i in by_id if i not in new_ids)
    return SegmentDiff(to_index=to_index, kept=kept, removed=removed, added_count=added)


_CJK = "\u4e00-\u9fff\u3400-\u4dbf\U00020000-\U0002a6df\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af"
# a CJK character is a word; so is a run of letters/digits, with inner
# apostrophes (don't, it's); one regex instead of a Python loop per character
_WORD = re.compile(f"[{_CJK}]|(?:(?![{_CJK}])[^\\W_])+(?:['’](?:(?![{_CJK}])[^\\W_])+)*")


def count_words(text: str) -> int:
    """Words for Latin scripts, characters for CJK (which has no spaces)."""
    return len(_WORD.findall(text))


def _count_words_slow(text: str) -> int:
    """The reference definition count_words must agree with (tests check it)."""
    words = 0
    in_word = False
    for i, ch in enumerate(text):
        if _is_cjk(ch):
            words += 1
            in_word = False
        elif ch.isalnum():
            if not in_word:
                words += 1
                in_word = True
        elif in_word and ch in "'’" and i + 1 < len(text) and text[i + 1].isalnum():
            continue  # don't, it's: one word
        else:
            in_word = False
    return words


def _is_cjk(ch: str) -> bool:
    code = ord(ch)
    return (
        0x4E00 <= code <= 0x9FFF
        or 0x3400 <= code <= 0x4DBF
        or 0x20000 <= code <= 0x2A6DF
        or 0xF900 <= code <= 0xFAFF
        or 0x3040 <= code <= 0x30FF
        or 0xAC00 <= code <= 0xD7AF
    )
