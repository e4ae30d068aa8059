"""Engine set-up for PostgreSQL (production, CI) and SQLite (embedded default),
and schema migration on start."""

from __future__ import annotations

import contextlib
import fcntl
import logging
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
_PG_MIGRATION_LOCK = 0x6B6273  # any constant; all workers must use the same one


def create_read_engine(engine: Engine) -> Engine:
    """SQLite: a second engine for read-only work. Its transactions stay
    deferred (no BEGIN IMMEDIATE), so readers use WAL snapshots and never queue
    behind the writer. Other databases use the same engine."""
    if engine.dialect.name != "sqlite" or engine.url.database in (None, "", ":memory:"):
        return engine
    # no pre-ping: a file's connection does not drop, and the ping was one more
    # statement per unit of work
    reader = create_engine(engine.url, connect_args={"timeout": 60, "check_same_thread": False})

    @event.listens_for(reader, "connect")
    def _pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout=60000")
        cur.execute("PRAGMA query_only=ON")
        cur.close()

    return reader


def create_db_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            # WAL lets readers run beside the one writer; busy_timeout makes
            # writers queue instead of failing with "database is locked".
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):  # type: ignore[no-untyped-def]
            # Take the write lock up front: a deferred transaction that reads
            # and then writes can fail with SQLITE_BUSY without waiting.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        # pysqlite's own transaction handling must be off for BEGIN IMMEDIATE
        @event.listens_for(engine, "connect", insert=True)
        def _no_autobegin(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            dbapi_conn.isolation_level = None

        return engine
    extra: dict[str, str] = {}
    if parsed.get_driver_name() == "psycopg2":
        # executemany of UPDATEs (a batch's documents) in pages, not a round trip a row
        extra["executemany_mode"] = "values_plus_batch"
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5, **extra)


def migrate(engine: Engine) -> None:
    """Bring the schema to head. Safe to call from many workers at once."""
    with _migration_lock(engine):
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_MIGRATION_LOCK})
                conn.commit()
        return
    db = engine.url.database
    if engine.dialect.name == "sqlite" and db and db != ":memory:":
        with open(f"{db}.migrate.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
        return
    yield
