"""The topic contract as an AsyncAPI 3 document, generated from the pipeline
table (consumers/pipeline.py) and the event models, so it cannot drift (a
test compares it with docs/asyncapi.json)."""

from __future__ import annotations

from typing import Any

from consumers.pipeline import TOPICS, consumers_of, producers_of
from domain.events import Topic, json_schemas
from infra.kafka import headers
from infra.kafka.topics import Topics

UPSTREAM = "upstream"  # who publishes a topic no stage produces (lifecycle)


def _message_id(event_type: str) -> str:
    return event_type.replace(".", "_")


def asyncapi(topics: Topics | None = None) -> dict[str, Any]:
    topics = topics or Topics()
    schemas = json_schemas()
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for spec in TOPICS:
        if spec.topic is Topic.DLQ:
            continue
        channel = spec.topic.value
        producers = producers_of(spec.topic) or [UPSTREAM]
        consumers = consumers_of(spec.topic)
        channels[channel] = {
            "address": topics.name(spec.topic),
            "description": f"{spec.description} Produced by {', '.join(producers)}; "
            f"consumed by {', '.join(consumers)}. "
            "Key: document_id (one document's events stay in order)"
            + (", dataset_id for dataset.deleted." if "dataset.deleted" in spec.events else "."),
            "messages": {
                _message_id(t): {"$ref": f"#/components/messages/{_message_id(t)}"}
                for t in spec.events
            },
        }
        ref = {"$ref": f"#/channels/{channel}"}
        for p in producers:
            if p != UPSTREAM:
                operations[f"{p}_sends_{channel}"] = {"action": "send", "channel": ref}
        for c in consumers:
            operations[f"{c}_receives_{channel}"] = {
                "action": "receive",
                "channel": ref,
                "description": f"consumer group {topics.prefix}{c}",
            }
        for t in spec.events:
            messages[_message_id(t)] = {
                "name": t,
                "contentType": "application/json",
                "payload": schemas[t],
            }
    dlq = next(t for t in TOPICS if t.topic is Topic.DLQ)
    channels[Topic.DLQ.value] = {
        "address": topics.name(Topic.DLQ),
        "description": f"{dlq.description} Each keeps the original key and bytes; headers: "
        f"{', '.join(headers.DEAD_LETTER_HEADERS)}. A body that would not fit the broker's "
        f"size limit is cut, and {', '.join(headers.TRUNCATION_HEADERS)} say so. "
        "Produced by the runtime of every stage.",
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "kbstream",
            "version": "1.0.0",
            "description": "Document lifecycle events in; a vector and a keyword index kept in step.",
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    }
