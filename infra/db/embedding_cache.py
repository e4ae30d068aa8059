"""(provider, model, doc_hash) -> vector, stored as little-endian float32
bytes: exact, compact, and never pickled."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from sqlalchemy import select
from sqlalchemy.engine import Connection

from infra.db.database import Database, chunks, table
from infra.db.models import EmbeddingRow

E = table(EmbeddingRow)


class EmbeddingCache:
    def __init__(self, database: Database, conn: Connection) -> None:
        self.db = database
        self.conn = conn

    def get_many(
        self, provider: str, model: str, doc_hashes: Iterable[str]
    ) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for chunk in chunks(sorted(set(doc_hashes))):
            rows = self.conn.execute(
                select(E.c.doc_hash, E.c.vector).where(
                    E.c.provider == provider, E.c.model == model, E.c.doc_hash.in_(chunk)
                )
            )
            for h, blob in rows:
                out[h] = np.frombuffer(bytes(blob), dtype="<f4")
        return out

    def put_many(self, provider: str, model: str, vectors: Mapping[str, Sequence[float]]) -> None:
        """Insert, skipping keys already there: the first vector stored for a
        key wins, and concurrent writers of the same keys never fail."""
        rows = [
            {
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

    def count(self, provider: str | None = None, model: str | None = None) -> int:
        where = []
        if provider:
            where.append(E.c.provider == provider)
        if model:
            where.append(E.c.model == model)
        return self.db.count(E, *where, conn=self.conn)
