"""Shared fixtures. Integration and end-to-end tests use the real things: a
tansu broker on a free loopback port, PostgreSQL (KBSTREAM_TEST_PG_URL,
default postgresql://postgres@127.0.0.1:5432/test), SQLite, milvus-lite and the
bundled embedding model. Only unit tests use test doubles."""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.fakes import HashingEmbeddingDouble

if TYPE_CHECKING:
    from domain.ports import UnitOfWorkFactory
    from infra.db.database import Database

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

__all__ = ["HashingEmbeddingDouble"]  # re-exported: tests import it from here

# how `-n N --dist loadgroup` cuts the suite into work units (scripts/test.sh)
pytest_plugins = ("tests.parallel",)


@pytest.fixture(autouse=True)
def _isolated_logging() -> Iterator[None]:
    """A CLI command run in-process (typer's CliRunner) sets up logging on the
    root logger, with handlers on streams that close when it returns; undo it so
    the next test neither logs into a closed file nor sees its levels."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {
        name: logger.level
        for name, logger in logging.Logger.manager.loggerDict.items()
        if isinstance(logger, logging.Logger)
    }
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
    for name, logger in logging.Logger.manager.loggerDict.items():
        if isinstance(logger, logging.Logger) and logger.level != levels.get(name, logging.NOTSET):
            logger.setLevel(levels.get(name, logging.NOTSET))


PG_ADMIN_URL = os.environ.get(
    "KBSTREAM_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
)


@pytest.fixture
def embedding_double() -> HashingEmbeddingDouble:
    return HashingEmbeddingDouble()


@pytest.fixture(scope="session")
def tansu() -> Iterator[str]:
    """A memory-only tansu broker for the whole session; tests isolate
    themselves with unique topic prefixes."""
    from infra.kafka.broker import EmbeddedBroker

    broker = EmbeddedBroker().start()
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture
def topic_prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}."


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped at the end."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"kbstream_test_{uuid.uuid4().hex[:8]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # pragma: no cover - depends on the machine
        if os.environ.get("CI"):
            raise
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc}")
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :n AND pid <> pg_backend_pid()"
                ),
                {"n": name},
            )
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


def _reset_pg(url: str) -> None:
    from sqlalchemy import create_engine, text

    eng = create_engine(url)
    with eng.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    eng.dispose()


def _database_url(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'kb.db'}"
    url: str = request.getfixturevalue("pg_server_url")
    _reset_pg(url)
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each contract test runs against SQLite and PostgreSQL alike."""
    return _database_url(request.param, request, tmp_path)


@contextlib.contextmanager
def _migrated(url: str) -> Iterator[Database]:
    from infra.db.database import Database
    from infra.db.engine import create_db_engine, migrate

    engine = create_db_engine(url)
    migrate(engine)
    db = Database(engine)
    try:
        yield db
    finally:
        db.dispose()


@pytest.fixture
def database(db_url: str) -> Iterator[Database]:
    """A migrated database (infra.db.database.Database) on SQLite or PostgreSQL."""
    with _migrated(db_url) as db:
        yield db


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def uow_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[UnitOfWorkFactory]:
    """The same repository contract over the in-memory unit of work (the one
    stage unit tests use) and the SQL one on SQLite and PostgreSQL."""
    if request.param == "memory":
        from tests.fakes import InMemoryUnitOfWorkFactory

        yield InMemoryUnitOfWorkFactory()
        return
    from infra.db.unit_of_work import SqlUnitOfWorkFactory

    with _migrated(_database_url(request.param, request, tmp_path)) as db:
        yield SqlUnitOfWorkFactory(db)


@pytest.fixture
def milvus_uri(tmp_path: Path) -> str:
    return str(tmp_path / "milvus.db")
