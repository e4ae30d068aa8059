"""The HTTP side of Dify's document and segment operations: each endpoint
publishes one lifecycle event (without a version: it applies to the
document's current one) and answers 202 with its event_id at once, as
Dify's own API does; `GET /v1/datasets/{dataset}/documents/{id}` shows
when it applied (`enabled`, `archived`, `status`). Publishing needs a broker:
`kbstream serve` beside a running `kbstream up`, or KBSTREAM_BROKERS."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from consumers.contract import Emit
from domain.events import (
    DOCUMENT_SWITCHES,
    DatasetDeleted,
    Event,
    SegmentDisabled,
    SegmentEnabled,
    SegmentUpdated,
    Topic,
)
from kbstream.publishing import publish_events

if TYPE_CHECKING:
    from kbstream.bootstrap import Container


class SegmentTarget(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index_node_id: str | None = Field(default=None, max_length=64)
    segment_id: int | None = Field(default=None, ge=0, le=2**31 - 1)


class SegmentEdit(SegmentTarget):
    content: str = Field(min_length=1)
    answer: str | None = None


class Accepted(BaseModel):
    event_id: str
    type: str


def add_routes(
    app: FastAPI,
    container: Container,
    auth: Sequence[Any],
    error: Callable[[int, int, str], Exception],
) -> None:
    """``error(status, code, message)``: the API's error, answered as
    ``{"error_code", "error_msg"}`` like every other endpoint's."""
    tenant = container.settings.tenant

    def accept(event: Event) -> Accepted:
        if not container.settings.brokers:
            raise error(
                503, 503, "no broker to publish to: run `kbstream up`, or set KBSTREAM_BROKERS"
            )
        publish_events(container, [Emit(Topic.LIFECYCLE, event)], client_id="kbstream-api")
        return Accepted(event_id=event.event_id, type=event.type)

    def ids(dataset: str, document_id: str) -> dict[str, Any]:
        return {"tenant_id": tenant, "dataset_id": dataset, "document_id": document_id}

    @app.post(
        "/v1/datasets/{dataset}/documents/{document_id}/{action}",
        dependencies=list(auth),
        status_code=202,
    )
    def document_operation(
        dataset: str,
        document_id: str,
        action: Literal["disable", "enable", "archive", "unarchive"],
    ) -> Accepted:
        """Disable, enable, archive or unarchive one document."""
        return accept(DOCUMENT_SWITCHES[action](**ids(dataset, document_id)))

    # before segments/{action}: routes match in order
    @app.post(
        "/v1/datasets/{dataset}/documents/{document_id}/segments/update",
        dependencies=list(auth),
        status_code=202,
        name="segment_update",
    )
    def segment_update(dataset: str, document_id: str, body: SegmentEdit) -> Accepted:
        """New text for one segment; only it is embedded again."""
        try:
            event = SegmentUpdated(**ids(dataset, document_id), **body.model_dump())
        except ValueError as exc:
            raise error(422, 422, str(exc)) from None
        return accept(event)

    @app.post(
        "/v1/datasets/{dataset}/documents/{document_id}/segments/{action}",
        dependencies=list(auth),
        status_code=202,
    )
    def segment_operation(
        dataset: str,
        document_id: str,
        action: Literal["disable", "enable"],
        body: SegmentTarget,
    ) -> Accepted:
        """Disable or enable one segment (by index_node_id or segment_id)."""
        kind = SegmentDisabled if action == "disable" else SegmentEnabled
        try:
            event = kind(**ids(dataset, document_id), **body.model_dump())
        except ValueError as exc:
            raise error(422, 422, str(exc)) from None
        return accept(event)

    @app.delete("/v1/datasets/{dataset}", dependencies=list(auth), status_code=202)
    def dataset_delete(dataset: str) -> Accepted:
        """Delete every document of the dataset (`kbstream dataset delete`
        also waits and purges the tombstones' texts)."""
        return accept(DatasetDeleted(tenant_id=tenant, dataset_id=dataset))
