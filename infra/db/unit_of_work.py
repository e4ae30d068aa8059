"""The unit of work over SQL: one connection, one transaction, every
repository of domain.ports.UnitOfWork built on it.

``readonly=True`` runs on the read engine: on SQLite its transactions stay
deferred (never BEGIN IMMEDIATE), so readers use WAL snapshots and never queue
behind the writer. A write unit of work on SQLite takes the write lock at
BEGIN (infra/db/engine.py), which also serializes writers; on PostgreSQL
``documents.get(key, for_update=True)`` locks the document's row instead.

Errors leave as domain errors (infra.errors.classify_db): a lost connection
is a TransientError, and so is a failed commit (its outcome is unknown, and
every write kbstream makes is safe to repeat).
"""

from __future__ import annotations

from types import TracebackType
from typing import Self

from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from domain.errors import PermanentError, TransientError
from infra.db.database import Database, db_errors, quiet_close, translated
from infra.db.documents import DocumentRepository
from infra.db.embedding_cache import EmbeddingCache
from infra.db.jobs import ImportJobs
from infra.db.payloads import PayloadStore
from infra.db.segments import SegmentRepository
from infra.db.vector_indexes import VectorIndexRegistry


class SqlUnitOfWork:
    documents: DocumentRepository
    segments: SegmentRepository
    embeddings: EmbeddingCache
    payloads: PayloadStore
    jobs: ImportJobs
    vector_indexes: VectorIndexRegistry

    def __init__(self, database: Database, readonly: bool = False) -> None:
        self.database = database
        self.readonly = readonly
        self._conn: Connection | None = None

    @property
    def connection(self) -> Connection:
        if self._conn is None:
            raise RuntimeError("the unit of work is not open (use it in a `with` block)")
        return self._conn

    def __enter__(self) -> Self:
        if self._conn is not None:
            raise RuntimeError("a unit of work is opened once")
        engine = self.database.read_engine if self.readonly else self.database.engine
        with db_errors():
            conn = engine.connect()
            if self.readonly and engine.dialect.name == "postgresql":
                # BEGIN READ ONLY: a write fails here as it does on SQLite
                conn.execution_options(postgresql_readonly=True)
        try:
            with db_errors():
                conn.begin()
        except BaseException:
            quiet_close(conn)
            raise
        self._conn = conn
        db = self.database
        self.documents = DocumentRepository(db, conn)
        self.segments = SegmentRepository(db, conn)
        self.embeddings = EmbeddingCache(db, conn)
        self.payloads = PayloadStore(db, conn)
        self.jobs = ImportJobs(db, conn)
        self.vector_indexes = VectorIndexRegistry(db, conn)
        return self

    def commit(self) -> None:
        """Commit what was done so far; work after it starts a new transaction
        (rolled back at the end of the block unless committed again)."""
        try:
            self.connection.commit()
        except SQLAlchemyError as exc:
            raise TransientError(f"database commit failed: {translated(exc)}") from exc

    def rollback(self) -> None:
        with db_errors():
            self.connection.rollback()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            quiet_close(conn)  # rolls back anything not committed
        if isinstance(exc, SQLAlchemyError):
            if self.readonly and "readonly database" in str(exc):  # SQLite's query_only
                raise PermanentError(f"write in a read-only unit of work: {exc}") from exc
            raise translated(exc) from exc


class SqlUnitOfWorkFactory:
    """``factory(readonly=False)`` -> a new SqlUnitOfWork (domain.ports.UnitOfWorkFactory)."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def __call__(self, readonly: bool = False) -> SqlUnitOfWork:
        return SqlUnitOfWork(self.database, readonly=readonly)
