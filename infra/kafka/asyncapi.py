"""The topic contract as an AsyncAPI 3 document, generated from the event
models so it cannot drift (a test compares it with docs/asyncapi.json)."""

from __future__ import annotations

from typing import Any

from domain.events import json_schemas
from infra.kafka.topics import Topics

# (topic attribute, description, message types, producing stage, consuming stages)
FLOW: list[tuple[str, str, list[str], str, list[str]]] = [
    (
        "lifecycle",
        "What happened to a document, published by upstream systems.",
        [
            "document.created",
            "document.updated",
            "document.deleted",
            "segment.deleted",
            "segments.batch_imported",
        ],
        "upstream",
        ["parse"],
    ),
    (
        "parsed",
        "Extracted text (inline or by claim-check reference).",
        ["document.parsed"],
        "parse",
        ["split"],
    ),
    (
        "segments",
        "Segments to index and segments removed.",
        ["segments.split", "segments.removed"],
        "split",
        ["embed", "index_keywords"],
    ),
    (
        "embedded",
        "Segments whose vectors are in the embedding cache; removals in order.",
        ["segments.embedded", "segments.removed"],
        "embed",
        ["load_vectors"],
    ),
    (
        "progress",
        "Branch completions the status tracker joins.",
        ["segments.loaded", "keywords.indexed"],
        "load_vectors, index_keywords",
        ["track_status"],
    ),
]


def asyncapi(topics: Topics | None = None) -> dict[str, Any]:
    topics = topics or Topics()
    schemas = json_schemas()
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for attr, description, types, producer, consumers in FLOW:
        address = getattr(topics, attr)
        channels[attr] = {
            "address": address,
            "description": f"{description} Produced by {producer}; consumed by {', '.join(consumers)}. "
            "Key: document_id (one document's events stay in order).",
            "messages": {
                t.replace(".", "_"): {"$ref": f"#/components/messages/{t.replace('.', '_')}"}
                for t in types
            },
        }
        for c in consumers:
            operations[f"{c}_receives_{attr}"] = {
                "action": "receive",
                "channel": {"$ref": f"#/channels/{attr}"},
                "description": f"consumer group {topics.prefix}{c}",
            }
        for t in types:
            messages[t.replace(".", "_")] = {
                "name": t,
                "contentType": "application/json",
                "payload": schemas[t],
            }
    channels["dlq"] = {
        "address": topics.dlq,
        "description": "Dead letters: the original bytes, with headers kb-stage, kb-error, "
        "kb-error-class, kb-original-topic, kb-original-partition, kb-original-offset, "
        "kb-attempts, kb-failed-at.",
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
