"""In-memory adapters beside the unit of work: a hashing double of the
embedding model, the vector index, the keyword (full-text) index and the
document reader."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from domain.documents import DocKey
from domain.errors import DocumentError
from domain.ports import KeywordRow, VectorRow
from domain.vector_indexes import IndexTarget

MAX_ERROR_CHARS = 4000


class HashingEmbeddingDouble:
    """Test double for the embedding model: deterministic unit vectors from a
    hash of the text, and whitespace token counting. Records every text it is
    asked to embed, so tests can assert what reached 'the model'."""

    provider = "test-double"
    model = "hashing-embedding-double"
    dim = 16
    max_input_tokens = 64

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        self.calls.append(list(texts))
        out = []
        for t in texts:
            seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little")
            v = np.random.default_rng(seed).standard_normal(self.dim).astype("float32")
            out.append((v / np.linalg.norm(v)).tolist())
        return out

    @property
    def embedded_texts(self) -> list[str]:
        return [t for call in self.calls for t in call]


# -- the indexes beside the database -------------------------------------------------


class InMemoryVectorIndex:
    """VectorIndex in a dict: index_node_id -> (vector, document)."""

    def __init__(self, target: IndexTarget | None = None) -> None:
        self.rows: dict[str, tuple[list[float], DocKey]] = {}
        self._target = target or IndexTarget(
            HashingEmbeddingDouble.provider,
            HashingEmbeddingDouble.model,
            "hashing-double",
            HashingEmbeddingDouble.dim,
            "kb_memory",
        )
        self.aliases: dict[tuple[str, str], str] = {}  # (tenant, dataset) -> collection

    @property
    def target(self) -> IndexTarget:
        return self._target

    def ensure_alias(self, tenant_id: str, dataset_id: str) -> None:
        self.aliases.setdefault((tenant_id, dataset_id), self._target.collection)

    def upsert(self, rows: Sequence[VectorRow]) -> int:
        for r in rows:
            self.rows[r.index_node_id] = ([float(x) for x in r.vector], r.key)
        return len(rows)

    def delete(self, index_node_ids: Sequence[str]) -> None:
        for i in index_node_ids:
            self.rows.pop(i, None)

    def delete_document(self, key: DocKey) -> None:
        for i in self.ids_for_document(key):
            del self.rows[i]

    def ids_for_document(self, key: DocKey) -> list[str]:
        return sorted(i for i, (_, k) in self.rows.items() if k == key)

    def ids_for_documents(self, keys: Iterable[DocKey]) -> dict[DocKey, set[str]]:
        wanted = set(keys)
        out: dict[DocKey, set[str]] = {k: set() for k in wanted}
        for i, (_, k) in self.rows.items():
            if k in wanted:
                out[k].add(i)
        return out


class InMemoryKeywordIndex:
    """KeywordIndex in a dict: index_node_id -> (text, document). Search scores
    a text by how many of the query's words (lower-cased) it holds."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[str, DocKey]] = {}
        self.upserts = 0  # upsert calls, for tests

    def upsert(self, rows: Sequence[KeywordRow]) -> int:
        self.upserts += bool(rows)
        for r in rows:
            self.rows[r.index_node_id] = (r.text, r.key)
        return len(rows)

    def delete(self, index_node_ids: Sequence[str]) -> None:
        for i in index_node_ids:
            self.rows.pop(i, None)

    def delete_document(self, key: DocKey) -> None:
        for i in self.ids_for_document(key):
            del self.rows[i]

    def ids_for_document(self, key: DocKey) -> list[str]:
        return sorted(i for i, (_, k) in self.rows.items() if k == key)

    def ids_for_documents(self, keys: Iterable[DocKey]) -> dict[DocKey, set[str]]:
        wanted = set(keys)
        out: dict[DocKey, set[str]] = {k: set() for k in wanted}
        for i, (_, k) in self.rows.items():
            if k in wanted:
                out[k].add(i)
        return out

    def search(
        self, query: str, tenant_id: str, dataset_id: str, limit: int
    ) -> list[tuple[str, float]]:
        words = set(re.findall(r"\w+", query.lower()))
        scores = {
            i: float(len(words & set(re.findall(r"\w+", text.lower()))))
            for i, (text, k) in self.rows.items()
            if (k.tenant_id, k.dataset_id) == (tenant_id, dataset_id)
        }
        hits = [(i, s) for i, s in scores.items() if s > 0]
        return sorted(hits, key=lambda h: (-h[1], h[0]))[:limit]

    def count(self, tenant_id: str, dataset_id: str) -> int:
        return sum(
            1
            for _, k in self.rows.values()
            if (k.tenant_id, k.dataset_id) == (tenant_id, dataset_id)
        )


class InMemoryDocumentReader:
    """Test double for the document reader: inline content passes through
    (empty content is refused, as the real reader does); a uri is looked up
    in ``files``, where a DocumentError stands for a broken file; uploaded
    bytes are decoded as UTF-8. Calls ``on_read`` first, so a test can
    observe the world during extraction."""

    def __init__(self, files: Mapping[str, str | DocumentError] | None = None) -> None:
        self.files: dict[str, str | DocumentError] = dict(files or {})
        self.reads: list[str] = []
        self.on_read: Callable[[], None] | None = None

    def read(
        self, content: str | None, uri: str | None, mime_type: str | None
    ) -> tuple[str, str | None]:
        if self.on_read is not None:
            self.on_read()
        if content is not None:
            self.reads.append("<inline>")
            if not content.strip():
                raise DocumentError("the document is empty")
            return content, mime_type or "text/plain"
        assert uri is not None
        self.reads.append(uri)
        found = self.files.get(uri)
        if found is None:
            raise DocumentError(f"file {uri} does not exist")
        if isinstance(found, DocumentError):
            raise found
        return found, mime_type or "text/plain"

    def extract(self, data: bytes, filename: str, mime_type: str | None) -> tuple[str, str | None]:
        """Uploaded bytes are UTF-8 text here; recorded as ``bytes:<filename>``."""
        if self.on_read is not None:
            self.on_read()
        self.reads.append(f"bytes:{filename}")
        text = data.decode()
        if not text.strip():
            raise DocumentError("the document is empty")
        return text, mime_type or "text/plain"
