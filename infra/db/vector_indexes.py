"""The registry of each dataset's vector indexes (domain/vector_indexes.py):
one row per (tenant, dataset, provider, model), with its collection, state
and rebuild progress."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.engine import Connection

from domain.vector_indexes import IndexState, IndexTarget, VectorIndexRecord
from infra.db.database import Database, chunks, table
from infra.db.models import VectorIndexRow

V = table(VectorIndexRow)


def _key(record: VectorIndexRecord) -> Any:
    t = record.target
    return and_(
        V.c.tenant_id == record.tenant_id,
        V.c.dataset_id == record.dataset_id,
        V.c.provider == t.provider,
        V.c.model == t.model,
    )


def _values(record: VectorIndexRecord) -> dict[str, Any]:
    t = record.target
    values: dict[str, Any] = {
        "tenant_id": record.tenant_id,
        "dataset_id": record.dataset_id,
        "provider": t.provider,
        "model": t.model,
        "model_spec": t.model_spec,
        "dim": t.dim,
        "collection": t.collection,
        "state": record.state.value,
        "progress_done": record.progress_done,
        "progress_total": record.progress_total,
        "switched_at": record.switched_at,
        "drop_after": record.drop_after,
    }
    if record.created_at is not None:
        values["created_at"] = record.created_at
    return values


def _record(row: Any) -> VectorIndexRecord:
    m = row._mapping
    return VectorIndexRecord(
        tenant_id=m["tenant_id"],
        dataset_id=m["dataset_id"],
        target=IndexTarget(m["provider"], m["model"], m["model_spec"], m["dim"], m["collection"]),
        state=IndexState(m["state"]),
        progress_done=int(m["progress_done"]),
        progress_total=int(m["progress_total"]),
        created_at=m["created_at"],
        switched_at=m["switched_at"],
        drop_after=m["drop_after"],
    )


class VectorIndexRegistry:
    def __init__(self, database: Database, conn: Connection) -> None:
        self.db = database
        self.conn = conn

    def for_dataset(self, tenant_id: str, dataset_id: str) -> list[VectorIndexRecord]:
        return self.for_datasets([(tenant_id, dataset_id)]).get((tenant_id, dataset_id), [])

    def for_datasets(
        self, keys: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], list[VectorIndexRecord]]:
        out: dict[tuple[str, str], list[VectorIndexRecord]] = {}
        for chunk in chunks(sorted(set(keys)), 200):
            where = or_(*(and_(V.c.tenant_id == t, V.c.dataset_id == d) for t, d in chunk))
            for row in self.conn.execute(select(V).where(where).order_by(V.c.id)):
                r = _record(row)
                out.setdefault((r.tenant_id, r.dataset_id), []).append(r)
        return out

    def add(self, record: VectorIndexRecord) -> bool:
        """Insert-ignore: a concurrent first registration (same model, or a second
        serving one) loses quietly."""
        res = self.conn.execute(self.db.insert_ignore(V), [_values(record)])
        return bool(res.rowcount)

    def save(self, record: VectorIndexRecord) -> None:
        values = _values(record)
        values.pop("created_at", None)
        if not self.conn.execute(update(V).where(_key(record)).values(values)).rowcount:
            self.conn.execute(V.insert(), [_values(record)])

    def remove(self, record: VectorIndexRecord) -> None:
        self.conn.execute(delete(V).where(_key(record)))
