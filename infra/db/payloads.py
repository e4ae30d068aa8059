"""Claim-check store: payloads too large to travel inline on the broker."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, func, insert, select
from sqlalchemy.engine import Connection

from infra.db.database import Database, chunks, table
from infra.db.models import PayloadRow

P = table(PayloadRow)


def _has_prefix(column: Any, prefix: str) -> Any:
    # exact and case-sensitive on every dialect, unlike LIKE ('_' and '%' are
    # wildcards, and SQLite's LIKE ignores case)
    return func.substr(column, 1, len(prefix)) == prefix


class PayloadStore:
    def __init__(self, database: Database, conn: Connection) -> None:
        self.db = database
        self.conn = conn

    def put(self, key: str, data: bytes, replace_prefix: str | None = None) -> None:
        """Store ``data`` under ``key``; with ``replace_prefix``, drop every
        other payload under that prefix (older versions of the same document)."""
        if replace_prefix:
            self.conn.execute(delete(P).where(_has_prefix(P.c.key, replace_prefix), P.c.key != key))
        self.conn.execute(delete(P).where(P.c.key == key))
        self.conn.execute(insert(P).values(key=key, data=data))

    def get(self, key: str) -> bytes | None:
        row = self.conn.execute(select(P.c.data).where(P.c.key == key)).first()
        return bytes(row[0]) if row else None

    def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        """The payloads stored under ``keys`` (absent ones left out), one query."""
        out: dict[str, bytes] = {}
        for chunk in chunks(sorted(set(keys))):
            for k, data in self.conn.execute(select(P.c.key, P.c.data).where(P.c.key.in_(chunk))):
                out[k] = bytes(data)
        return out

    def delete_many(self, keys: Sequence[str]) -> None:
        """Delete exactly these keys (no prefix), one statement."""
        for chunk in chunks(sorted(set(keys))):
            self.conn.execute(delete(P).where(P.c.key.in_(chunk)))

    def delete_prefix(self, prefix: str) -> None:
        self.conn.execute(delete(P).where(_has_prefix(P.c.key, prefix)))
