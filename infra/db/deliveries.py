"""The durable delivery counter (port: infra/kafka/redelivery.DeliveryLog):
one row per consumer group and partition saying how many times delivery has
begun at its offset. One upsert per counted delivery (the first batch after
an assignment, a batch at its first failure, and each message after a
death; never the happy path after that); a delivery starting at another
offset resets the row, so the table never holds more than a row per
partition and group."""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import and_, case, delete, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from infra.db.database import Database, table
from infra.db.models import DeliveryRow

D = table(DeliveryRow)
TopicPartition = tuple[str, int]


class SqlDeliveryLog:
    def __init__(self, database: Database) -> None:
        self.db = database
        if database.dialect not in ("postgresql", "sqlite"):
            raise NotImplementedError(f"no delivery log for {database.dialect}")

    def attempt(
        self, group: str, offsets: Mapping[TopicPartition, int]
    ) -> dict[TopicPartition, int]:
        if not offsets:
            return {}
        dialect = postgresql if self.db.dialect == "postgresql" else sqlite
        ins = dialect.insert(D).values(
            [
                {
                    "group_id": group,
                    "topic": topic,
                    "partition_id": partition,
                    "start_offset": offset,
                    "attempts": 1,
                }
                for (topic, partition), offset in sorted(offsets.items())
            ]
        )
        again = D.c.start_offset == ins.excluded.start_offset
        upsert = ins.on_conflict_do_update(
            index_elements=[D.c.group_id, D.c.topic, D.c.partition_id],
            set_={
                "attempts": case((again, D.c.attempts + 1), else_=1),
                "start_offset": ins.excluded.start_offset,
                "updated_at": func.now(),
            },
        ).returning(D.c.topic, D.c.partition_id, D.c.attempts)
        with self.db.begin() as conn:
            return {(t, p): int(n) for t, p, n in conn.execute(upsert)}

    def settled(self, group: str, offsets: Mapping[TopicPartition, int]) -> None:
        if not offsets:
            return
        where = (D.c.group_id == group, _at(offsets))
        with self.db.begin() as conn:
            conn.execute(update(D).where(*where).values(attempts=D.c.attempts - 1))
            conn.execute(delete(D).where(*where, D.c.attempts <= 0))

    def pending(self, group: str) -> dict[TopicPartition, tuple[int, int]]:
        """(start_offset, attempts) per partition, for tests and operators."""
        with self.db.connect() as conn:
            rows = conn.execute(
                select(D.c.topic, D.c.partition_id, D.c.start_offset, D.c.attempts).where(
                    D.c.group_id == group
                )
            )
            return {(t, p): (int(o), int(n)) for t, p, o, n in rows}


def _at(offsets: Mapping[TopicPartition, int]) -> object:
    return or_(
        *(
            and_(D.c.topic == t, D.c.partition_id == p, D.c.start_offset == o)
            for (t, p), o in sorted(offsets.items())
        )
    )
