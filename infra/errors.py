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
    dimension, bad parameter) fails the same way every time. The server's
    own verdict (is_input_error, retriable) wins over the message's words."""
    from pymilvus.exceptions import (
        ConnectionNotExistException,
        ErrorCode,
        MilvusException,
        MilvusUnavailableException,
    )

    if isinstance(exc, MilvusException):
        if getattr(exc, "is_input_error", False):
            return PermanentError(f"Milvus rejected {what}: {exc}")
        if (
            getattr(exc, "retriable", False)
            or isinstance(exc, MilvusUnavailableException | ConnectionNotExistException)
            or exc.code == getattr(ErrorCode, "RATE_LIMIT", None)
        ):
            return TransientError(f"Milvus {what} failed: {exc}")
    if isinstance(exc, ConnectionError | TimeoutError):
        return TransientError(f"Milvus {what} failed: {exc}")
    if any(h in str(exc).lower() for h in _MILVUS_TRANSIENT_HINTS):
        return TransientError(f"Milvus {what} failed: {exc}")
    return PermanentError(f"Milvus rejected {what}: {exc}")


# -- Kafka -----------------------------------------------------------------------


def _kafka_permanent_codes() -> frozenset[int]:
    from confluent_kafka import KafkaError as K

    return frozenset(
        {
            # the message itself: it will be refused the same way every time
            K.MSG_SIZE_TOO_LARGE,
            K.RECORD_LIST_TOO_LARGE,
            K.INVALID_RECORD,
            K.INVALID_MSG_SIZE,
            K.UNSUPPORTED_FOR_MESSAGE_FORMAT,
            K.UNSUPPORTED_COMPRESSION_TYPE,
            K.POLICY_VIOLATION,
            # who we are or where we send it: a configuration to fix
            K.TOPIC_AUTHORIZATION_FAILED,
            K.GROUP_AUTHORIZATION_FAILED,
            K.CLUSTER_AUTHORIZATION_FAILED,
            K.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
            K.SASL_AUTHENTICATION_FAILED,
            K.UNSUPPORTED_SASL_MECHANISM,
            K.UNKNOWN_TOPIC_OR_PART,
            K.TOPIC_EXCEPTION,
            K._UNKNOWN_TOPIC,
            K._UNKNOWN_PARTITION,
            K.INVALID_CONFIG,
            K.INVALID_REQUIRED_ACKS,
            K._INVALID_ARG,
            K._NOT_IMPLEMENTED,
        }
    )


def classify_kafka(what: str, err: object) -> KbstreamError:
    """A confluent_kafka KafkaError (or KafkaException) -> domain error. A
    fatal error, a message too large, an authorization failure or an unknown
    topic is permanent; anything else (brokers down, timeouts, leader
    elections) is transient, as librdkafka retries those itself too."""
    from confluent_kafka import KafkaError, KafkaException

    if isinstance(err, KafkaException) and err.args:
        err = err.args[0]
    if not isinstance(err, KafkaError):
        return TransientError(f"{what}: {err}")
    described = f"{what}: {err.str()} ({err.name()})"
    if err.fatal() or err.code() in _kafka_permanent_codes():
        return PermanentError(described)
    return TransientError(described)


def _first_line(exc: object) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
