"""(tenant, provider, model, doc_hash) -> vector, stored as little-endian
float32 bytes: exact, compact, and never pickled.

Keyed by tenant so that whether a text hits the cache says nothing about what
other tenants hold; pruned when no segment of the tenant uses a text any more
(`prune`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from sqlalchemy import and_, delete, exists, not_, select
from sqlalchemy.engine import Connection

from infra.db.database import Database, chunks, table
from infra.db.models import EmbeddingRow, SegmentRow

E = table(EmbeddingRow)
S = table(SegmentRow)


class EmbeddingCache:
    def __init__(self, database: Database, conn: Connection) -> None:
        self.db = database
        self.conn = conn

    def get_many(
        self, tenant_id: str, provider: str, model: str, doc_hashes: Iterable[str]
    ) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for chunk in chunks(sorted(set(doc_hashes))):
            rows = self.conn.execute(
                select(E.c.doc_hash, E.c.vector).where(
                    E.c.tenant_id == tenant_id,
                    E.c.provider == provider,
                    E.c.model == model,
                    E.c.doc_hash.in_(chunk),
                )
            )
            for h, blob in rows:
                out[h] = np.frombuffer(bytes(blob), dtype="<f4")
        return out

    def put_many(
        self,
        tenant_id: str,
        provider: str,
        model: str,
        vectors: Mapping[str, Sequence[float]],
    ) -> None:
        """Insert, skipping keys already there: the first vector stored for a
        key wins, and concurrent writers of the same keys never fail."""
        rows = [
            {
                "tenant_id": tenant_id,
                "provider": provider,
                "model": model,
                "doc_hash": h,
                "dim": len(v),
                "vector": np.asarray(v, dtype="<f4").tobytes(),
            }
            for h, v in sorted(vectors.items())
        ]
        for chunk in chunks(rows):
            self.conn.execute(self.db.insert_ignore(E), list(chunk))

    def prune(
        self,
        tenant_id: str,
        dataset_id: str | None = None,
        document_ids: Sequence[str] | None = None,
    ) -> int:
        """One statement: remove the tenant's entries (every model) that no
        segment of the tenant uses outside the scope given, counting the
        scope's segments as gone. Scope: a dataset, or some of its documents;
        call it before deleting their segments. No scope: every entry no
        segment of the tenant uses. Returns the entries removed."""
        used = S.c.tenant_id == tenant_id
        scope = None
        if dataset_id is not None:
            scope = S.c.dataset_id == dataset_id
            if document_ids is not None:
                if not document_ids:
                    return 0
                scope = and_(scope, S.c.document_id.in_(sorted(set(document_ids))))
        still_used = exists().where(
            used, S.c.doc_hash == E.c.doc_hash, *([not_(scope)] if scope is not None else [])
        )
        query = delete(E).where(E.c.tenant_id == tenant_id, ~still_used)
        if scope is not None:
            query = query.where(E.c.doc_hash.in_(select(S.c.doc_hash).where(used, scope)))
        return int(self.conn.execute(query).rowcount or 0)

    def count(
        self, provider: str | None = None, model: str | None = None, tenant_id: str | None = None
    ) -> int:
        where = []
        if tenant_id:
            where.append(E.c.tenant_id == tenant_id)
        if provider:
            where.append(E.c.provider == provider)
        if model:
            where.append(E.c.model == model)
        return self.db.count(E, *where, conn=self.conn)
