"""Composition root: the one place that turns settings into adapters and
stages. Everything else receives its dependencies."""

from __future__ import annotations

import logging
import threading
from functools import cached_property
from pathlib import Path

from consumers import STAGES
from consumers.embed import EmbedStage
from consumers.index_keywords import IndexKeywordsStage
from consumers.load_vectors import LoadVectorsStage
from consumers.parse import ParseStage
from consumers.split import SplitStage
from consumers.track_status import TrackStatusStage
from domain.errors import PermanentError
from infra.db.engine import create_db_engine, migrate
from infra.db.repository import Database
from infra.embedding import (
    ModelTokenCounter,
    SentenceTransformerProvider,
    _dim,
    create_provider,
    resolve_model,
)
from infra.extract import ExtractLimits
from infra.kafka.producer import EventPublisher
from infra.kafka.runner import RunnerConfig, Stage, StageRunner
from infra.kafka.topics import Topics
from infra.keywords import JiebaKeywordExtractor
from infra.vectors import MilvusVectorStore, collection_name
from kbstream.settings import Settings

log = logging.getLogger(__name__)


class Container:
    """Lazily built adapters: a `search` never loads torch, a split worker
    never opens Milvus."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = Topics(settings.topic_prefix)
        self._lock = threading.Lock()

    @cached_property
    def db(self) -> Database:
        engine = create_db_engine(self.settings.db_url)
        migrate(engine)
        return Database(engine)

    @cached_property
    def model_identity(self) -> tuple[str, str, int]:
        """(provider, model, dim) without loading the model."""
        if self.settings.embedding_provider not in ("sentence-transformers", "local"):
            raise PermanentError(f"unknown embedding provider {self.settings.embedding_provider!r}")
        name, path = resolve_model(self.settings.embedding_model)
        return "sentence-transformers", name, _dim(path)

    @cached_property
    def provider(self) -> SentenceTransformerProvider:
        s = self.settings
        return create_provider(
            s.embedding_provider, s.embedding_model, s.embedding_device, s.embedding_batch_size
        )

    @cached_property
    def token_counter(self) -> ModelTokenCounter:
        _, path = resolve_model(self.settings.embedding_model)
        return ModelTokenCounter(path)

    @cached_property
    def keywords(self) -> JiebaKeywordExtractor:
        return JiebaKeywordExtractor(top_k=self.settings.keywords_per_segment)

    @cached_property
    def vectors(self) -> MilvusVectorStore:
        provider, model, dim = self.model_identity
        uri = self.settings.vector_uri
        if not uri.startswith(("http://", "https://", "tcp://", "unix:")):
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
        return MilvusVectorStore(
            uri, collection_name(provider, model, dim), dim, self.settings.milvus_token
        )

    @property
    def limits(self) -> ExtractLimits:
        return ExtractLimits(max_bytes=self.settings.max_document_bytes)

    def stage(self, name: str) -> Stage:
        s = self.settings
        if name == "parse":
            return ParseStage(self.db, self.topics, s.roots, self.limits, s.inline_text_bytes)
        if name == "split":
            return SplitStage(self.db, self.topics, self.token_counter, s.segments_per_event)
        if name == "embed":
            return EmbedStage(
                self.db,
                self.topics,
                self.provider,
                # documents are often smaller than one event's worth of segments:
                # take more events per poll so a model call sees ~embed_max_segments
                max_batch=max(1, 4 * s.embed_max_segments // s.segments_per_event),
            )
        if name == "load_vectors":
            provider, model, _ = self.model_identity
            return LoadVectorsStage(self.db, self.topics, self.vectors, provider, model)
        if name == "index_keywords":
            return IndexKeywordsStage(self.db, self.topics, self.keywords)
        if name == "track_status":
            return TrackStatusStage(self.db, self.topics, self.vectors)
        raise PermanentError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")

    def runner(self, name: str, bootstrap: str, exclusive: bool = False) -> StageRunner:
        s = self.settings
        config = RunnerConfig(
            bootstrap=bootstrap,
            group_id=s.group(name),
            dlq_topic=self.topics.dlq,
            session_timeout_ms=s.session_timeout_ms,
            max_poll_interval_ms=s.max_poll_interval_ms,
            retry_attempts=s.retry_attempts,
            retry_max_seconds=s.retry_max_seconds,
            max_event_bytes=s.max_event_bytes,
            exclusive=exclusive,
        )
        publisher = EventPublisher(bootstrap, s.max_event_bytes, client_id=f"kbstream-{name}")
        return StageRunner(self.stage(name), config, publisher)

    def close(self) -> None:
        if "vectors" in self.__dict__:
            self.vectors.close()
        if "db" in self.__dict__:
            self.db.dispose()
