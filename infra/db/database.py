"""The database handle: the write engine, SQLite's read engine, and the one
place SQLAlchemy errors become domain errors (infra.errors.classify_db), so a
stage retries a lost database instead of dead-lettering its events."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

from sqlalchemy import Engine, Table, and_, event, func, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from domain.documents import DocKey
from domain.errors import TransientError
from infra.db.engine import create_read_engine
from infra.errors import classify_db

IN_CHUNK = 500  # keep IN (...) lists and bulk inserts well under driver limits

T = TypeVar("T")


def chunks(items: Sequence[T], n: int = IN_CHUNK) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def table(model: Any) -> Table:
    """A model's table, typed as the Table it is."""
    return cast(Table, model.__table__)


def of_document(rows: Any, key: DocKey) -> Any:
    """Rows of one document in a table keyed by tenant, dataset and document."""
    return and_(
        rows.c.tenant_id == key.tenant_id,
        rows.c.dataset_id == key.dataset_id,
        rows.c.document_id == key.document_id,
    )


def utcnow() -> datetime:
    return datetime.now(UTC)


def translated(exc: BaseException) -> BaseException:
    """A SQLAlchemy error as the domain error stages understand; anything
    else as it is."""
    if isinstance(exc, SQLAlchemyError):
        return classify_db(exc)
    return exc


@contextlib.contextmanager
def db_errors() -> Iterator[None]:
    try:
        yield
    except SQLAlchemyError as exc:
        raise translated(exc) from exc


class Database:
    """The engine, plus on SQLite a second engine for read-only work whose
    transactions never take the write lock."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.read_engine = create_read_engine(engine)
        if self.read_engine is not engine:
            _deferred_snapshots(self.read_engine)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextlib.contextmanager
    def begin(self) -> Iterator[Connection]:
        """One write transaction, committed when the block ends without error.
        A failed commit is transient: its outcome is unknown and every write
        kbstream does is safe to repeat."""
        with db_errors():
            conn = self.engine.connect()
        try:
            with db_errors():
                conn.begin()
            try:
                yield conn
            except SQLAlchemyError as exc:
                raise translated(exc) from exc
            try:
                conn.commit()
            except SQLAlchemyError as exc:
                raise TransientError(f"database commit failed: {translated(exc)}") from exc
        finally:
            quiet_close(conn)

    @contextlib.contextmanager
    def connect(self) -> Iterator[Connection]:
        """A read-only connection (the read engine on SQLite)."""
        with db_errors():
            conn = self.read_engine.connect()
        try:
            with db_errors():
                yield conn
        finally:
            quiet_close(conn)

    def count(self, table: Any, *where: Any, conn: Connection | None = None) -> int:
        """SELECT count(*) FROM table WHERE ...; on ``conn`` or the read engine."""
        query = select(func.count()).select_from(table).where(*where)
        if conn is not None:
            return int(conn.execute(query).scalar_one())
        with self.connect() as c:
            return int(c.execute(query).scalar_one())

    def insert_ignore(self, table: Any) -> Any:
        """INSERT that skips rows whose key exists: concurrent writers of the same
        row (identical chunks, redelivered batches) never deadlock or fail."""
        if self.dialect == "postgresql":
            return postgresql.insert(table).on_conflict_do_nothing()
        if self.dialect == "sqlite":
            return sqlite.insert(table).on_conflict_do_nothing()
        return insert(table).prefix_with("IGNORE")

    def dispose(self) -> None:
        self.engine.dispose()
        if self.read_engine is not self.engine:
            self.read_engine.dispose()


def quiet_close(conn: Connection) -> None:
    # closing rolls back what was not committed; on a dead connection that
    # fails too, and the error that killed it is the one worth reporting
    with contextlib.suppress(SQLAlchemyError):
        conn.close()


def _deferred_snapshots(reader: Engine) -> None:
    """SQLite readers: a plain (deferred) BEGIN, so every read of one unit of
    work sees the same WAL snapshot, without ever taking the write lock."""

    @event.listens_for(reader, "connect", insert=True)
    def _no_autobegin(dbapi_conn, _record):  # type: ignore[no-untyped-def]
        dbapi_conn.isolation_level = None

    @event.listens_for(reader, "begin")
    def _begin(conn):  # type: ignore[no-untyped-def]
        conn.exec_driver_sql("BEGIN")
