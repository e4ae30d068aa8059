"""The one error classifier: is a failure of the database, Milvus or the
broker worth retrying (TransientError), or will it fail the same way every
time (PermanentError)? Adapters translate their library's exceptions here, so
stages and the runner only ever see the two domain error classes.

Default for the unknown: permanent for a request the dependency answered
(retrying the same request gets the same answer), transient for a lost
connection. A permanent error dead-letters the event or stops the worker
with a one-line reason; it never loops as "transient failure".
"""

from __future__ import annotations

from domain.errors import KbstreamError, PermanentError, TransientError

# -- database --------------------------------------------------------------------

# PostgreSQL SQLSTATE classes: 08 connection exception, 40 transaction rollback
# (serialization failure, deadlock), 53 insufficient resources, 57 operator
# intervention (admin shutdown, cannot connect now), 58 system error.
_PG_TRANSIENT_CLASSES = ("08", "40", "53", "57", "58")
# SQLite: "database is locked" / "busy" are contention, worth waiting for.
_SQLITE_TRANSIENT = ("database is locked", "database is busy", "disk i/o error", "unable to open")
_CONNECTION_HINTS = (
    "connection refused",
    "could not connect",
    "server closed the connection",
    "connection reset",
    "terminating connection",
    "connection already closed",
    "ssl connection has been closed",
    "the database system is starting up",
    "the database system is shutting down",
    "timeout expired",
)


def classify_db(exc: BaseException) -> KbstreamError:
    """A SQLAlchemy/DBAPI error -> TransientError or PermanentError."""
    from sqlalchemy.exc import DBAPIError

    orig = getattr(exc, "orig", None) or exc
    message = str(orig).lower()
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return TransientError(f"database connection lost: {orig}")
    code = getattr(orig, "pgcode", None)
    if code:
        if code.startswith(_PG_TRANSIENT_CLASSES):
            return TransientError(f"database unavailable ({code}): {_first_line(orig)}")
        return PermanentError(f"database rejected the statement ({code}): {_first_line(orig)}")
    if any(h in message for h in _SQLITE_TRANSIENT + _CONNECTION_HINTS):
        return TransientError(f"database unavailable: {_first_line(orig)}")
    from sqlalchemy.exc import OperationalError

    if isinstance(exc, OperationalError) and "no such" in message:
        # a missing table or column: the schema does not match this version
        return PermanentError(
            f"database schema mismatch: {_first_line(orig)}; run the migrations "
            "(any kbstream command migrates on start) or upgrade every worker"
        )
    if isinstance(exc, OperationalError):
        return TransientError(f"database error: {_first_line(orig)}")
    return PermanentError(f"database error: {_first_line(orig)}")


# -- Milvus ----------------------------------------------------------------------

_MILVUS_TRANSIENT_HINTS = (
    "unavailable",
    "connect",
    "timeout",
    "deadline",
    "channel",
    "released",
    "not loaded",
    "too_many_pings",
    "rate limit",
    "memory quota",
)


def classify_milvus(what: str, exc: BaseException) -> KbstreamError:
    """Milvus down or busy is worth retrying; a request it rejects (wrong
    dimension, bad parameter) fails the same way every time."""
    try:
        from pymilvus.exceptions import MilvusUnavailableException
    except ImportError:  # pragma: no cover
        MilvusUnavailableException = ()  # type: ignore[assignment,misc]  # noqa: N806
    message = str(exc).lower()
    if isinstance(exc, MilvusUnavailableException) or any(
        h in message for h in _MILVUS_TRANSIENT_HINTS
    ):
        return TransientError(f"Milvus {what} failed: {exc}")
    return PermanentError(f"Milvus rejected {what}: {exc}")


# -- Kafka -----------------------------------------------------------------------


def classify_kafka(what: str, err: object) -> KbstreamError:
    """A confluent_kafka KafkaError (or KafkaException) -> domain error.
    librdkafka says itself whether an error is retriable or fatal; a message
    too large, an authorization failure or an unknown topic is neither."""
    from confluent_kafka import KafkaError, KafkaException

    if isinstance(err, KafkaException):
        err = err.args[0] if err.args else err
    if not isinstance(err, KafkaError):
        return TransientError(f"{what}: {err}")
    permanent_codes = {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.GROUP_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._UNKNOWN_TOPIC,
        KafkaError.INVALID_CONFIG,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError.SASL_AUTHENTICATION_FAILED,
    }
    if err.fatal() or err.code() in permanent_codes:
        return PermanentError(f"{what}: {err.str()} ({err.name()})")
    return TransientError(f"{what}: {err.str()} ({err.name()})")


def _first_line(exc: object) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
