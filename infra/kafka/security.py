"""Client security for a real Kafka cluster: the SASL and TLS properties that
every kbstream client of that cluster gets (librdkafka producers, consumers
and admin clients; faust's aiokafka through its credentials).

The composition root registers them for the configured bootstrap servers
(KBSTREAM_BROKERS, see ``kbstream.bootstrap.configure_kafka_clients``); each
client asks ``client_config`` for its configuration. An embedded broker's
address never has any, so verbs that start one are unaffected."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Mapping
from typing import Any

_lock = threading.Lock()
_by_bootstrap: dict[str, dict[str, str]] = {}


def register(bootstrap: str, props: Mapping[str, str]) -> None:
    """Give every later client of ``bootstrap`` these librdkafka properties
    (``security.protocol``, ``sasl.mechanism``, ``sasl.username``, ...)."""
    with _lock:
        if props:
            _by_bootstrap[bootstrap] = dict(props)
        else:
            _by_bootstrap.pop(bootstrap, None)


def security_props(bootstrap: str) -> dict[str, str]:
    with _lock:
        return dict(_by_bootstrap.get(bootstrap, {}))


def client_config(bootstrap: str, **props: Any) -> dict[str, Any]:
    """A librdkafka configuration for a client of ``bootstrap``: its security
    properties, then the client's own ``props``."""
    return {"bootstrap.servers": bootstrap, **security_props(bootstrap), **props}


def faust_credentials(bootstrap: str) -> Any | None:
    """The same security for faust (aiokafka): SASL or TLS credentials, or None."""
    props = security_props(bootstrap)
    protocol = props.get("security.protocol", "PLAINTEXT").upper()
    if protocol == "PLAINTEXT":
        return None
    import faust

    context = None
    if protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(cafile=props.get("ssl.ca.location") or None)
    if protocol == "SSL":
        return faust.SSLCredentials(context)
    return faust.SASLCredentials(
        username=props.get("sasl.username"),
        password=props.get("sasl.password"),
        mechanism=props.get("sasl.mechanism", "PLAIN"),
        ssl_context=context,
    )
