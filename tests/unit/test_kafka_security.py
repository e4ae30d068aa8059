"""SASL/TLS settings (KBSTREAM_KAFKA_*) reach every Kafka client kbstream
builds for KBSTREAM_BROKERS: librdkafka producers, consumers and admin
clients through infra/kafka/security.py, faust through its credentials; and
nothing else (an embedded broker's address) gets them."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from infra.kafka import security
from infra.kafka.security import client_config, faust_credentials
from kbstream.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
BROKERS = "kafka-1:9092,kafka-2:9092"
SASL = {
    "brokers": BROKERS,
    "kafka_security_protocol": "SASL_SSL",
    "kafka_sasl_mechanism": "SCRAM-SHA-512",
    "kafka_sasl_username": "kbstream",
    "kafka_sasl_password": "s3cret",
    "kafka_ssl_ca_location": "/etc/ssl/kafka-ca.pem",
}
PROPS = {
    "security.protocol": "SASL_SSL",
    "sasl.mechanism": "SCRAM-SHA-512",
    "sasl.username": "kbstream",
    "sasl.password": "s3cret",
    "ssl.ca.location": "/etc/ssl/kafka-ca.pem",
}


@pytest.fixture(autouse=True)
def _forget() -> Iterator[None]:
    yield
    security.register(BROKERS, {})


def test_settings_give_librdkafka_properties_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Settings(brokers=BROKERS).kafka_client_properties() == {}  # plaintext: nothing
    for name, value in SASL.items():
        monkeypatch.setenv(f"KBSTREAM_{name.upper()}", value)
    settings = Settings()
    assert settings.kafka_client_properties() == PROPS
    assert "s3cret" not in repr(settings)  # a SecretStr


def test_sasl_without_credentials_is_refused_at_load() -> None:
    with pytest.raises(ValidationError, match="KBSTREAM_KAFKA_SASL_USERNAME"):
        Settings(brokers=BROKERS, kafka_security_protocol="SASL_PLAINTEXT")


def test_the_composition_root_gives_them_to_clients_of_its_brokers_only() -> None:
    from kbstream.bootstrap import Container

    Container(Settings(**SASL))  # type: ignore[arg-type]
    config = client_config(BROKERS, **{"group.id": "g"})
    assert config == {"bootstrap.servers": BROKERS, **PROPS, "group.id": "g"}
    # an embedded broker (another address) is plaintext
    assert client_config("127.0.0.1:40001") == {"bootstrap.servers": "127.0.0.1:40001"}


def test_the_event_publisher_is_built_with_them(monkeypatch: pytest.MonkeyPatch) -> None:
    from infra.kafka import producer

    built: list[dict[str, Any]] = []

    class Recorder:
        def __init__(self, config: dict[str, Any], **_: Any) -> None:
            built.append(config)

    monkeypatch.setattr(producer, "Producer", Recorder)
    security.register(BROKERS, PROPS)
    producer.EventPublisher(BROKERS, client_id="x")
    (config,) = built
    assert {k: config[k] for k in PROPS} == PROPS
    assert config["enable.idempotence"] is True and config["client.id"] == "x"


def test_faust_gets_the_same_credentials() -> None:
    import faust

    security.register(BROKERS, {**PROPS, "ssl.ca.location": ""})
    creds = faust_credentials(BROKERS)
    assert isinstance(creds, faust.SASLCredentials)
    assert (creds.username, creds.password) == ("kbstream", "s3cret")
    assert creds.mechanism.value == "SCRAM-SHA-512" and creds.ssl_context is not None
    security.register(BROKERS, {})
    assert faust_credentials(BROKERS) is None


def test_no_kafka_client_is_configured_around_client_config() -> None:
    """Every librdkafka configuration starts from client_config, so none can
    miss the security properties: no other module names bootstrap.servers."""
    offenders = [
        str(path.relative_to(ROOT))
        for folder in ("infra", "kbstream", "producers", "consumers")
        for path in (ROOT / folder).rglob("*.py")
        if path.name != "security.py"
        and re.search(r"[\"']bootstrap\.servers[\"']", path.read_text())
    ]
    assert offenders == []
