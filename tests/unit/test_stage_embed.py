"""embed, over in-memory ports: each distinct text reaches the model once,
only cache misses do, superseded segments are skipped, removals pass through
in order, and the per-document counters."""

from __future__ import annotations

from consumers.contract import StageResult
from consumers.embed import EmbedStage
from domain.documents import DocKey
from domain.events import Event, SegmentsEmbedded, SegmentsRemoved, SegmentsSplit, Topic
from tests.unit.stage_support import (
    DATASET,
    TENANT,
    World,
    created,
    of_type,
    paragraph,
    text_of,
    updated,
)

P = [paragraph(i) for i in range(6)]
SKIP = ("embed", "load_vectors", "index_keywords", "track_status")


def split_events(world: World, *lifecycle: Event) -> list[Event]:
    """Run parse and split; the events split sent to the segments topic."""
    events: list[Event] = []
    for event in lifecycle:
        parsed = world.parsed(event)
        result = world.stage("split").handle([parsed])
        events.extend(e.event for e in result.emits)
    return events


def embed(world: World, events: list[Event]) -> StageResult:
    stage = world.stage("embed")
    assert isinstance(stage, EmbedStage)
    return stage.handle(events)


def key(doc: str) -> DocKey:
    return DocKey(TENANT, DATASET, doc)


class TestModelCalls:
    def test_each_distinct_text_is_embedded_once_per_batch(self) -> None:
        world = World()
        events = split_events(
            world,
            created(text_of(P[0], P[1], P[0]), 1, doc="a"),  # P[0] twice in one document
            created(text_of(P[1], P[2]), 1, doc="b"),
        )
        result = embed(world, events)
        assert sorted(world.embedder.embedded_texts) == sorted([P[0], P[1], P[2]])
        assert len(world.embedder.calls) == 1
        assert result.counts == {"embedded_texts": 3, "cache_hits": 2}
        # the first document to ask for a text counts it as embedded, others as hits
        a, b = world.doc(key("a")), world.doc(key("b"))
        assert (a.embedded_texts, a.cache_hits) == (2, 1)
        assert (b.embedded_texts, b.cache_hits) == (1, 1)

    def test_only_cache_misses_reach_the_model(self) -> None:
        world = World()
        embed(world, split_events(world, created(text_of(P[0], P[1]), 1, doc="a")))
        world.embedder.calls.clear()
        result = embed(world, split_events(world, created(text_of(P[1], P[2]), 1, doc="b")))
        assert world.embedder.embedded_texts == [P[2]]
        assert result.counts == {"embedded_texts": 1, "cache_hits": 1}
        with world.uow(readonly=True) as uow:
            assert uow.embeddings.count(world.embedder.provider, world.embedder.model) == 3

    def test_redelivery_embeds_nothing_and_emits_the_same_refs(self) -> None:
        world = World()
        events = split_events(world, created(text_of(P[0], P[1]), 1))
        first = embed(world, events)
        world.embedder.calls.clear()
        again = embed(world, events)
        assert world.embedder.calls == []
        assert [e.segments for e in of_type(again, SegmentsEmbedded)] == [
            e.segments for e in of_type(first, SegmentsEmbedded)
        ]
        assert again.counts == {"embedded_texts": 0, "cache_hits": 2}


class TestOutput:
    def test_refs_name_the_cached_vectors(self) -> None:
        world = World()
        events = split_events(world, created(text_of(*P[:3]), 1))
        result = embed(world, events)
        embedded = of_type(result, SegmentsEmbedded)
        assert all(e.topic is Topic.EMBEDDED for e in result.emits)
        assert [(e.provider, e.model) for e in embedded] == [
            (world.embedder.provider, world.embedder.model)
        ] * 2  # two batches of at most two segments
        refs = [r for e in embedded for r in e.segments]
        assert [r.index_node_id for r in refs] == [
            s.index_node_id for e in events if isinstance(e, SegmentsSplit) for s in e.segments
        ]
        with world.uow(readonly=True) as uow:
            cached = uow.embeddings.get_many(
                TENANT, world.embedder.provider, world.embedder.model, [r.doc_hash for r in refs]
            )
        assert len(cached) == 3 and all(len(v) == world.embedder.dim for v in cached.values())

    def test_superseded_segments_are_skipped(self) -> None:
        world = World()
        old = split_events(world, created(text_of(P[0], P[1]), 1))
        # v2 replaced P[1] before embed saw v1's segments
        newer = split_events(world, updated(text_of(P[0], P[2]), 2))
        result = embed(world, old + newer)
        assert P[1] not in world.embedder.embedded_texts
        assert sorted(world.embedder.embedded_texts) == sorted([P[0], P[2]])
        alive = set(world.segments())
        assert {
            r.index_node_id for e in of_type(result, SegmentsEmbedded) for r in e.segments
        } <= alive

    def test_removals_are_forwarded_in_order(self) -> None:
        world = World()
        world.run(created(text_of(P[0], P[1]), 1))
        events = split_events(world, updated(text_of(P[0], P[2]), 2))
        assert isinstance(events[0], SegmentsRemoved)
        result = embed(world, events)
        assert [type(e.event) for e in result.emits] == [SegmentsRemoved, SegmentsEmbedded]
        assert result.emits[0].event is events[0]

    def test_a_batch_of_removals_only_writes_nothing(self) -> None:
        world = World()
        world.run(created(text_of(P[0], P[1]), 1))
        events = split_events(world, updated(text_of(P[0]), 2))
        assert [type(e) for e in events] == [SegmentsRemoved]
        world.embedder.calls.clear()
        commits = world.uow.commits
        result = embed(world, events)
        assert [e.event for e in result.emits] == events
        assert world.uow.commits == commits and world.embedder.calls == []


def test_embed_writes_once_per_batch() -> None:
    world = World()
    events = split_events(world, created(P[0], 1, doc="a"), created(P[1], 1, doc="b"))
    commits = world.uow.commits
    embed(world, events)
    assert world.uow.commits == commits + 1


class TestPrefetch:
    """prefetch() runs the model ahead of handle() (infra/kafka/lookahead.py):
    it writes nothing, handle() gives the same result with or without it, and
    no text reaches the model twice because of it."""

    def state(self, world: World) -> object:
        with world.uow(readonly=True) as uow:
            cache = uow.embeddings.count(world.embedder.provider, world.embedder.model)
        docs = [world.doc(key(d)) for d in ("a", "b")]
        return cache, [(d.embedded_texts, d.cache_hits) if d else None for d in docs]

    def test_handle_after_prefetch_calls_no_model_and_ends_the_same(self) -> None:
        plain, ahead = World(), World()
        lifecycle = (created(text_of(P[0], P[1], P[0]), 1, doc="a"), created(P[2], 1, doc="b"))
        expected = embed(plain, split_events(plain, *lifecycle))

        events = split_events(ahead, *lifecycle)
        stage = ahead.stage("embed")
        assert isinstance(stage, EmbedStage)
        stage.prefetch(events)
        assert sorted(ahead.embedder.embedded_texts) == sorted(P[:3])
        assert self.state(ahead) == (0, [(0, 0), (0, 0)])  # prefetch wrote nothing
        ahead.embedder.calls.clear()
        result = stage.handle(events)
        assert ahead.embedder.calls == []
        assert result.counts == expected.counts
        assert [(e.document_id, e.segments) for e in of_type(result, SegmentsEmbedded)] == [
            (e.document_id, e.segments) for e in of_type(expected, SegmentsEmbedded)
        ]
        assert self.state(ahead) == self.state(plain)

    def test_the_next_batch_skips_texts_the_held_batch_embeds(self) -> None:
        world = World()
        stage = world.stage("embed")
        assert isinstance(stage, EmbedStage)
        first = split_events(world, created(text_of(P[0], P[1]), 1, doc="a"))
        second = split_events(world, created(text_of(P[1], P[2]), 1, doc="b"))
        stage.prefetch(first)
        stage.prefetch(second)  # while the first batch is handled
        first_result = stage.handle(first)
        second_result = stage.handle(second)
        assert sorted(world.embedder.embedded_texts) == sorted(P[:3])  # each once
        assert first_result.counts == {"embedded_texts": 2, "cache_hits": 0}
        assert second_result.counts == {"embedded_texts": 1, "cache_hits": 1}

    def test_a_batch_never_handled_costs_nothing_later(self) -> None:
        world = World()
        stage = world.stage("embed")
        assert isinstance(stage, EmbedStage)
        dropped = split_events(world, created(text_of(P[0], P[1]), 1, doc="a"))
        stage.prefetch(dropped)  # e.g. its partition was revoked
        # two later batches push its vectors out of memory; nothing was written
        for i, doc in ((2, "b"), (3, "c")):
            stage.prefetch(split_events(world, created(P[i], 1, doc=doc)))
        world.embedder.calls.clear()
        result = stage.handle(dropped)  # redelivered
        assert sorted(world.embedder.embedded_texts) == sorted(P[:2])
        assert result.counts == {"embedded_texts": 2, "cache_hits": 0}

    def test_handle_embeds_what_prefetch_could_not(self) -> None:
        world = World()
        stage = world.stage("embed")
        assert isinstance(stage, EmbedStage)
        events = split_events(world, created(text_of(P[0], P[1]), 1, doc="a"))
        stage.prefetch(events[:0])  # a prefetch that saw none of the batch
        result = stage.handle(events)
        assert sorted(world.embedder.embedded_texts) == sorted(P[:2])
        assert result.counts == {"embedded_texts": 2, "cache_hits": 0}


class TestTenants:
    """Issue 20 item 6: the cache is per tenant, so whether a text hits it says
    nothing about what other tenants hold."""

    @staticmethod
    def theirs(event: Event) -> Event:
        return event.model_copy(update={"tenant_id": "t2"})

    def cached(self, world: World, tenant: str) -> int:
        with world.uow(readonly=True) as uow:
            return uow.embeddings.count(world.embedder.provider, world.embedder.model, tenant)

    def test_another_tenants_text_is_no_hit(self) -> None:
        world = World()
        embed(world, split_events(world, created(P[0], 1, doc="a")))
        result = embed(world, split_events(world, self.theirs(created(P[0], 1, doc="b"))))
        assert result.counts.get("cache_hits", 0) == 0
        assert result.counts["embedded_texts"] == 1
        doc = world.doc(DocKey("t2", DATASET, "b"))
        assert doc is not None and (doc.embedded_texts, doc.cache_hits) == (1, 0)
        assert (self.cached(world, TENANT), self.cached(world, "t2")) == (1, 1)
        # within a tenant the text is still embedded once
        again = embed(world, split_events(world, self.theirs(created(P[0], 1, doc="c"))))
        assert (again.counts.get("embedded_texts", 0), again.counts["cache_hits"]) == (0, 1)

    def test_two_tenants_in_one_batch_share_one_model_call(self) -> None:
        world = World()
        events = split_events(
            world, created(P[0], 1, doc="a"), self.theirs(created(P[0], 1, doc="a"))
        )
        embed(world, events)
        assert world.embedder.embedded_texts == [P[0]]
        for tenant in (TENANT, "t2"):
            doc = world.doc(DocKey(tenant, DATASET, "a"))
            assert doc is not None and (doc.embedded_texts, doc.cache_hits) == (1, 0)
            assert self.cached(world, tenant) == 1
