"""infra/errors.py: which failures of Kafka, Milvus and the database are worth
retrying (TransientError) and which fail the same way every time
(PermanentError). The errors are the libraries' own exception objects."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from confluent_kafka import KafkaError, KafkaException
from pymilvus.exceptions import (
    ConnectionNotExistException,
    DataNotMatchException,
    ErrorCode,
    MilvusException,
    MilvusUnavailableException,
)
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, ProgrammingError

from domain.errors import PermanentError, TransientError
from infra.errors import classify_db, classify_kafka, classify_milvus
from infra.kafka.producer import EventPublisher

# --- Kafka ------------------------------------------------------------------------

KAFKA_PERMANENT = [
    KafkaError.MSG_SIZE_TOO_LARGE,
    KafkaError.RECORD_LIST_TOO_LARGE,
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    KafkaError.SASL_AUTHENTICATION_FAILED,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError._UNKNOWN_TOPIC,
    KafkaError.INVALID_CONFIG,
    KafkaError.POLICY_VIOLATION,
]
KAFKA_TRANSIENT = [
    KafkaError._MSG_TIMED_OUT,
    KafkaError._TRANSPORT,
    KafkaError._ALL_BROKERS_DOWN,
    KafkaError.BROKER_NOT_AVAILABLE,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.REQUEST_TIMED_OUT,
    KafkaError.NOT_ENOUGH_REPLICAS,
    KafkaError._QUEUE_FULL,
]


@pytest.mark.parametrize("code", KAFKA_PERMANENT)
def test_kafka_errors_that_will_fail_again_are_permanent(code: int) -> None:
    err = KafkaError(code)
    got = classify_kafka("delivering to t", err)
    assert type(got) is PermanentError
    assert str(got).startswith("delivering to t: ") and err.name() in str(got)
    # raised by produce() as a KafkaException: the same verdict
    assert type(classify_kafka("producing", KafkaException(err))) is PermanentError


@pytest.mark.parametrize("code", KAFKA_TRANSIENT)
def test_kafka_errors_of_an_unavailable_cluster_are_transient(code: int) -> None:
    assert type(classify_kafka("delivering", KafkaError(code))) is TransientError
    assert type(classify_kafka("producing", KafkaException(KafkaError(code)))) is TransientError


def test_a_fatal_kafka_error_is_permanent_whatever_its_code() -> None:
    fatal = KafkaError(KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, "producer fenced", fatal=True)
    assert type(classify_kafka("delivering", fatal)) is PermanentError
    assert type(classify_kafka("delivering", KafkaError(KafkaError._TRANSPORT, fatal=True))) is (
        PermanentError
    )


def test_something_that_is_not_a_kafka_error_is_transient() -> None:
    assert type(classify_kafka("delivering", "connection reset")) is TransientError
    assert type(classify_kafka("delivering", KafkaException("odd"))) is TransientError


def test_the_producer_refuses_a_message_too_large_as_permanent_not_as_retry() -> None:
    """No broker needed: librdkafka checks message.max.bytes in produce()."""
    pub = EventPublisher("127.0.0.1:9", max_event_bytes=10_000)
    try:
        with pytest.raises(PermanentError) as info:
            pub.produce_raw("t", b"x" * (pub.max_message_bytes + 1), key=b"k")
        assert "MSG_SIZE_TOO_LARGE" in str(info.value)
        assert isinstance(info.value.__cause__, KafkaException)
    finally:
        pub.close()


# --- Milvus -----------------------------------------------------------------------

MILVUS_TRANSIENT = [
    MilvusUnavailableException(message="server unavailable"),
    ConnectionNotExistException(message="should create connection first."),
    MilvusException(message="Fail connecting to server on localhost:19530, illegal connection"),
    MilvusException(message="rpc deadline exceeded"),
    MilvusException(message="collection not loaded"),
    MilvusException(message="collection released"),
    MilvusException(ErrorCode.RATE_LIMIT, "request is rejected by grpc RateLimiter"),
    MilvusException(message="memory quota exhausted"),
    MilvusException(message="some new server hiccup", retriable=True),
]
MILVUS_PERMANENT = [
    MilvusException(message="the dim (8) of field data(vector) is not equal to schema dim (16)"),
    MilvusException(message="invalid parameter: metric type not found"),
    DataNotMatchException(message="The data doesn't match with schema fields, expect 5, got 4"),
    MilvusException(message="syntax error in filter expression"),
    # the server says the request was wrong: its words do not matter then
    MilvusException(message="field timeout_ms out of range", is_input_error=True),
]


@pytest.mark.parametrize("exc", MILVUS_TRANSIENT, ids=str)
def test_milvus_down_or_busy_is_transient(exc: MilvusException) -> None:
    got = classify_milvus("upsert", exc)
    assert type(got) is TransientError
    assert str(got).startswith("Milvus upsert failed: ")


@pytest.mark.parametrize("exc", MILVUS_PERMANENT, ids=str)
def test_a_request_milvus_rejects_is_permanent(exc: MilvusException) -> None:
    got = classify_milvus("upsert", exc)
    assert type(got) is PermanentError
    assert str(got).startswith("Milvus rejected upsert: ")


def test_a_lost_connection_outside_pymilvus_is_transient() -> None:
    assert type(classify_milvus("search", ConnectionResetError("reset"))) is TransientError
    assert type(classify_milvus("search", TimeoutError())) is TransientError


# --- database ---------------------------------------------------------------------


class PgError(Exception):
    """Shaped like a psycopg2 error: a message and a SQLSTATE in ``pgcode``."""

    def __init__(self, message: str, pgcode: str) -> None:
        super().__init__(message)
        self.pgcode = pgcode


@pytest.mark.parametrize(
    ("pgcode", "message"),
    [
        ("40001", "could not serialize access due to concurrent update"),
        ("40P01", "deadlock detected"),
        ("08006", "connection failure"),
        ("53300", "sorry, too many clients already"),
        ("57P01", "terminating connection due to administrator command"),
        ("57P03", "the database system is starting up"),
    ],
)
def test_postgres_unavailable_or_contended_is_transient(pgcode: str, message: str) -> None:
    exc = OperationalError("UPDATE documents ...", {}, PgError(message, pgcode))
    got = classify_db(exc)
    assert type(got) is TransientError
    assert pgcode in str(got) and message in str(got)


@pytest.mark.parametrize(
    ("cls", "pgcode", "message"),
    [
        (ProgrammingError, "42703", 'column "indexing_status" does not exist'),
        (ProgrammingError, "42P01", 'relation "documents" does not exist'),
        (IntegrityError, "23505", "duplicate key value violates unique constraint"),
        (DBAPIError, "22001", "value too long for type character varying(128)"),
    ],
)
def test_postgres_rejecting_the_statement_is_permanent(
    cls: type[DBAPIError], pgcode: str, message: str
) -> None:
    got = classify_db(cls("INSERT ...", {}, PgError(message, pgcode)))
    assert type(got) is PermanentError
    assert pgcode in str(got) and message in str(got)


def test_a_connection_invalidated_by_sqlalchemy_is_transient() -> None:
    exc = DBAPIError("SELECT 1", {}, PgError("SSL SYSCALL error: EOF detected", "XX000"))
    exc.connection_invalidated = True
    assert type(classify_db(exc)) is TransientError


def test_connection_messages_without_a_sqlstate_are_transient() -> None:
    orig = Exception('connection to server at "127.0.0.1", port 5432 failed: Connection refused')
    assert type(classify_db(OperationalError("SELECT 1", {}, orig))) is TransientError


def _sqlite_error(tmp_path: Path, sql: str, lock: bool = False) -> BaseException:
    """The error SQLAlchemy really raises on a SQLite file."""
    path = tmp_path / "kb.db"
    setup = sqlite3.connect(path)
    setup.execute("CREATE TABLE IF NOT EXISTS documents (id TEXT PRIMARY KEY)")
    setup.commit()
    if lock:
        setup.execute("BEGIN EXCLUSIVE")
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0})
    try:
        with engine.begin() as conn:
            conn.execute(text(sql))
    except Exception as exc:
        return exc
    finally:
        engine.dispose()
        setup.close()
    raise AssertionError(f"{sql!r} did not fail")


def test_sqlite_database_is_locked_is_transient(tmp_path: Path) -> None:
    exc = _sqlite_error(tmp_path, "INSERT INTO documents VALUES ('a')", lock=True)
    assert "database is locked" in str(exc)
    assert type(classify_db(exc)) is TransientError


def test_sqlite_schema_mismatch_is_permanent_and_says_to_migrate(tmp_path: Path) -> None:
    for sql in ("SELECT indexing_status FROM documents", "SELECT * FROM segments"):
        exc = _sqlite_error(tmp_path, sql)
        assert isinstance(exc, OperationalError) and "no such" in str(exc)
        got = classify_db(exc)
        assert type(got) is PermanentError
        assert "schema mismatch" in str(got) and "migrat" in str(got)


def test_sqlite_locked_as_constructed_by_hand_matches_the_real_one() -> None:
    exc = OperationalError("UPDATE ...", {}, sqlite3.OperationalError("database is locked"))
    assert type(classify_db(exc)) is TransientError
    exc = OperationalError("SELECT ...", {}, sqlite3.OperationalError("no such column: x"))
    assert type(classify_db(exc)) is PermanentError
