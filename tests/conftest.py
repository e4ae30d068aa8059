"""Shared fixtures. Integration and end-to-end tests use the real things: a
tansu broker on a free loopback port, PostgreSQL (KBSTREAM_TEST_PG_URL,
default postgresql://postgres@127.0.0.1:5432/test), SQLite, milvus-lite and the
bundled embedding model. Only unit tests use test doubles."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PG_ADMIN_URL = os.environ.get(
    "KBSTREAM_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
)


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


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each contract test runs against SQLite and PostgreSQL alike."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'kb.db'}"
    url: str = request.getfixturevalue("pg_server_url")
    _reset_pg(url)
    return url


@pytest.fixture
def database(db_url: str) -> Iterator[object]:
    from infra.db.engine import create_db_engine, migrate
    from infra.db.repository import Database

    engine = create_db_engine(db_url)
    migrate(engine)
    db = Database(engine)
    try:
        yield db
    finally:
        db.dispose()


@pytest.fixture
def milvus_uri(tmp_path: Path) -> str:
    return str(tmp_path / "milvus.db")
