"""The published contract files must match the code."""

from __future__ import annotations

import json
from pathlib import Path

from domain.events import json_schemas
from infra.kafka.asyncapi import asyncapi

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_events_schema_file_is_current() -> None:
    on_disk = json.loads((DOCS / "events.schema.json").read_text())
    assert on_disk == json.loads(json.dumps(json_schemas())), (
        "docs/events.schema.json is stale: run `kbstream schema --output docs/events.schema.json`"
    )


def test_asyncapi_file_is_current() -> None:
    on_disk = json.loads((DOCS / "asyncapi.json").read_text())
    assert on_disk == json.loads(json.dumps(asyncapi())), (
        "docs/asyncapi.json is stale: run `kbstream schema --asyncapi --output docs/asyncapi.json`"
    )


def test_every_lifecycle_type_is_documented() -> None:
    doc = asyncapi()
    names = {m["name"] for m in doc["components"]["messages"].values()}
    assert {
        "document.created",
        "document.updated",
        "document.deleted",
        "segment.deleted",
        "segments.batch_imported",
    } <= names
