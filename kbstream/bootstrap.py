"""Composition root: the one place that turns settings into adapters and
stages. Everything else receives its dependencies.

`Container` implements consumers.contract.StageDeps, so the pipeline table
(consumers/pipeline.py) builds any stage from it. Adapters are built lazily:
a `search` never loads torch, a split worker never opens Milvus.
"""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path

from consumers.contract import Stage, StageConfig
from consumers.failures import FailureRecorder
from consumers.pipeline import stage_spec
from infra.db.database import Database
from infra.db.deliveries import SqlDeliveryLog
from infra.db.engine import create_db_engine, migrate
from infra.db.unit_of_work import SqlUnitOfWorkFactory
from infra.embedding import (
    ModelTokenCounter,
    SentenceTransformerProvider,
    create_provider,
    model_identity,
    resolve_model,
)
from infra.extract import ExtractLimits
from infra.extract.reader import FileReader
from infra.kafka.producer import EventPublisher
from infra.kafka.runner import RunnerConfig, StageRunner
from infra.kafka.topics import Topics
from infra.keywords import JiebaKeywordExtractor
from infra.vectors import MilvusVectorStore, collection_name
from kbstream.settings import Settings

log = logging.getLogger(__name__)


class Container:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = Topics(settings.topic_prefix)

    # -- state -----------------------------------------------------------------

    @cached_property
    def database(self) -> Database:
        engine = create_db_engine(self.settings.db_url)
        migrate(engine)
        return Database(engine)

    @cached_property
    def uow(self) -> SqlUnitOfWorkFactory:
        return SqlUnitOfWorkFactory(self.database)

    @cached_property
    def vectors(self) -> MilvusVectorStore:
        provider, model, dim = self.model_identity
        uri = self.settings.vector_uri
        if not uri.startswith(("http://", "https://", "tcp://", "unix:")):
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
        return MilvusVectorStore(
            uri, collection_name(provider, model, dim), dim, self.settings.milvus_token
        )

    # -- the model ---------------------------------------------------------------

    @cached_property
    def model_identity(self) -> tuple[str, str, int]:
        """(provider, model, dim) without loading the model."""
        return model_identity(self.settings.embedding_provider, self.settings.embedding_model)

    @cached_property
    def provider(self) -> SentenceTransformerProvider:
        s = self.settings
        return create_provider(
            s.embedding_provider, s.embedding_model, s.embedding_device, s.embedding_batch_size
        )

    @property
    def embedder(self) -> SentenceTransformerProvider:
        return self.provider

    @cached_property
    def token_counter(self) -> ModelTokenCounter:
        _, path = resolve_model(self.settings.embedding_model)
        return ModelTokenCounter(path)

    @property
    def tokens(self) -> ModelTokenCounter:
        return self.token_counter

    # -- the other adapters stages need -------------------------------------------

    @cached_property
    def keywords(self) -> JiebaKeywordExtractor:
        return JiebaKeywordExtractor(top_k=self.settings.keywords_per_segment)

    @property
    def limits(self) -> ExtractLimits:
        s = self.settings
        return ExtractLimits(
            max_bytes=s.max_document_bytes,
            cpu_seconds=s.extract_cpu_seconds,
            memory_bytes=s.extract_memory_bytes,
            wall_seconds=s.extract_wall_seconds,
        )

    @property
    def reader(self) -> FileReader:
        return FileReader(self.settings.roots, self.limits)

    @property
    def stage_config(self) -> StageConfig:
        s = self.settings
        return StageConfig(
            inline_text_bytes=s.inline_text_bytes,
            segments_per_event=s.segments_per_event,
            embed_max_segments=s.embed_max_segments,
        )

    # -- stages and their runtime -------------------------------------------------

    def stage(self, name: str) -> Stage:
        return stage_spec(name).build(self)

    def runner(self, name: str, bootstrap: str, exclusive: bool = False) -> StageRunner:
        s = self.settings
        spec = stage_spec(name)
        config = RunnerConfig(
            bootstrap=bootstrap,
            group_id=s.group(spec.group),
            dlq_topic=self.topics.dlq,
            session_timeout_ms=s.session_timeout_ms,
            max_poll_interval_ms=s.max_poll_interval_ms,
            retry_attempts=s.retry_attempts,
            retry_max_seconds=s.retry_max_seconds,
            max_event_bytes=s.max_event_bytes,
            max_deliveries=s.max_deliveries,
            exclusive=exclusive,
        )
        publisher = EventPublisher(bootstrap, s.max_event_bytes, client_id=f"kbstream-{name}")
        return StageRunner(
            self.stage(name),
            [self.topics.name(t) for t in spec.inputs],
            self.topics,
            config,
            publisher,
            on_give_up=FailureRecorder(self.uow),
            deliveries=SqlDeliveryLog(self.database),
        )

    def close(self) -> None:
        if "vectors" in self.__dict__:
            self.vectors.close()
        if "database" in self.__dict__:
            self.database.dispose()
