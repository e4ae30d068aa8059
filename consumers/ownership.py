"""An event may only touch its own document's segments. index_node_ids
travel on internal topics anyone with produce rights can write to, and a
write by id would move another tenant's vector or keyword entity into the
publisher's dataset (the primary key is the id alone). So every stage that
writes or deletes by the ids an event names first asks the segments table
who owns them, once per batch, and refuses an event naming any id alive
under another document. An id without a row is nobody's: deleting it from
an index removes only an orphan, which keeps removals racing a delete working."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from consumers.contract import StageResult
from domain.documents import DocKey
from domain.errors import DocumentError
from domain.events import (
    Event,
    KeywordsIndexed,
    SegmentDeleted,
    SegmentsEmbedded,
    SegmentsLoaded,
    SegmentsRemoved,
    SegmentsSplit,
)


def named_ids(event: Event) -> list[str]:
    """The index_node_ids an event names."""
    if isinstance(event, SegmentsSplit | SegmentsEmbedded):
        return [s.index_node_id for s in event.segments]
    if isinstance(event, SegmentsRemoved | SegmentsLoaded | KeywordsIndexed):
        return list(event.index_node_ids)
    if isinstance(event, SegmentDeleted) and event.index_node_id:
        return [event.index_node_id]
    return []


def foreign_ids_error(event: Event, ids: Sequence[str]) -> DocumentError:
    shown = ", ".join(sorted(ids)[:3]) + (", ..." if len(ids) > 3 else "")
    return DocumentError(
        f"{event.type} for document {event.doc_key} names {len(ids)} segment id(s) of "
        f"another document ({shown}); refused, nothing written. Publish only the "
        "document's own segment ids"
    )


def own_events(
    events: Sequence[Event], owners: Mapping[str, DocKey], result: StageResult
) -> list[Event]:
    """The events that name no segment of another document; each other one
    is rejected (dead-lettered, its own document marked `error`)."""
    out: list[Event] = []
    for e in events:
        foreign = [
            i for i in named_ids(e) if (owner := owners.get(i)) is not None and owner != e.doc_key
        ]
        if foreign:
            result.reject(e, foreign_ids_error(e, foreign))
        else:
            out.append(e)
    return out
