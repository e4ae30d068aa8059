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
from typing import Any

from consumers.contract import Stage, StageConfig
from consumers.failures import FailureRecorder
from consumers.pipeline import stage_spec
from domain.errors import PermanentError
from domain.ports import EmbeddingProvider, ModelTokens
from domain.vector_indexes import IndexTarget
from infra.db.database import Database
from infra.db.deliveries import SqlDeliveryLog
from infra.db.engine import create_db_engine, migrate
from infra.db.unit_of_work import SqlUnitOfWorkFactory
from infra.embedding import (
    BUNDLED_MODEL_NAME,
    REMOTE_PROVIDERS,
    ModelTokenCounter,
    create_provider,
    model_identity,
    resolve_model,
)
from infra.extract import ExtractLimits
from infra.extract.reader import FileReader
from infra.kafka.producer import EventPublisher
from infra.kafka.runner import RunnerConfig, StageRunner
from infra.kafka.runtimes import stage_runner
from infra.kafka.security import register as register_kafka_security
from infra.kafka.topics import Topics
from infra.keyword_index import MilvusKeywordIndex
from infra.keywords import JiebaKeywordExtractor
from infra.metrics import MeasuredEmbedder
from infra.milvus import is_local
from infra.remote_embedding import RemoteConfig, remote_config, remote_token_counter
from infra.vectors import MilvusVectorStore, collection_name
from kbstream.settings import Settings

log = logging.getLogger(__name__)

# Settings no adapter reads when it is built: a run may change them (Container.scoped)
# and still share the adapters already built.
RUN_SCOPED = frozenset({"broker_journal", "allowed_roots"})


def configure_kafka_clients(settings: Settings) -> None:
    """Every Kafka client of KBSTREAM_BROKERS in this process gets its
    security settings (SASL/TLS), whichever module builds it."""
    if settings.brokers:
        register_kafka_security(settings.brokers, settings.kafka_client_properties())


class Container:
    """Built once from settings, never changed: a run with other settings asks
    for another container (``scoped``)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.topics = Topics(settings.topic_prefix)
        configure_kafka_clients(settings)

    @property
    def settings(self) -> Settings:
        return self._settings

    def scoped(self, **update: Any) -> Container:
        """A container whose settings differ from these only in ``RUN_SCOPED``
        ones (the broker journal, the readable roots): it shares this one's
        adapters, has missing ones built here, and leaves closing them to this one."""
        unknown = sorted(set(update) - RUN_SCOPED)
        if unknown:
            raise ValueError(
                f"settings {', '.join(unknown)} shape adapters: build a new Container for them"
            )
        return _Scoped(self, self._settings.model_copy(update=update))

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
        if is_local(uri):
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
        return MilvusVectorStore(
            uri,
            collection_name(provider, model, dim),
            dim,
            self.settings.milvus_token,
            provider=provider,
            model=model,
            model_spec=self.model_spec,
        )

    @cached_property
    def keyword_index(self) -> MilvusKeywordIndex:
        """Full-text (BM25) index of segment texts, in the same Milvus."""
        return MilvusKeywordIndex(
            self.vectors, self.keywords.terms, self.settings.keyword_tokenizer
        )

    @property
    def model_spec(self) -> str:
        """What the settings name as the model (a folder, or the bundled model's
        name): a vector index registry row keeps it, so search can load it."""
        spec = self.settings.embedding_model or BUNDLED_MODEL_NAME
        folder = Path(spec).expanduser()
        return str(folder.resolve()) if folder.is_dir() else spec

    @cached_property
    def other_providers(self) -> dict[tuple[str, str], EmbeddingProvider]:
        """Providers of models other than the configured one, by (provider,
        model spec): search loads a dataset's serving model once per process."""
        return {}

    def provider_for(self, target: IndexTarget) -> EmbeddingProvider:
        """The provider of the model that built ``target``: the configured one,
        or another local model, loaded once and closed with this container."""
        if (target.provider, target.model) == self.model_identity[:2]:
            return self.provider
        key = (target.provider, target.model_spec)
        if target.provider in REMOTE_PROVIDERS and key not in self.other_providers:
            # its endpoint and key are settings of this process, not of the registry
            raise PermanentError(
                f"this dataset is served by the remote model {target.model}; search it with "
                f"KBSTREAM_EMBEDDING_PROVIDER={target.provider} and "
                f"KBSTREAM_EMBEDDING_MODEL={target.model_spec} (and its base URL and key)"
            )
        if key not in self.other_providers:
            s = self.settings
            self.other_providers[key] = create_provider(
                target.provider, target.model_spec, s.embedding_device, s.embedding_batch_size
            )
        return self.other_providers[key]

    # -- the model ---------------------------------------------------------------

    @cached_property
    def model_identity(self) -> tuple[str, str, int]:
        """(provider, model, dim) without loading the model."""
        s = self.settings
        return model_identity(s.embedding_provider, s.embedding_model, self.remote_embedding)

    @cached_property
    def remote_embedding(self) -> RemoteConfig | None:
        """The openai provider's configuration; None for a local model."""
        s = self.settings
        return remote_config(s) if s.embedding_provider in REMOTE_PROVIDERS else None

    @cached_property
    def provider(self) -> EmbeddingProvider:
        s = self.settings
        return create_provider(
            s.embedding_provider,
            s.embedding_model,
            s.embedding_device,
            s.embedding_batch_size,
            self.remote_embedding,
            self.token_counter if self.remote_embedding else None,
        )

    @cached_property
    def embedder(self) -> EmbeddingProvider:
        return MeasuredEmbedder(self.provider)  # each model call timed and sized for /metrics

    @cached_property
    def token_counter(self) -> ModelTokens:
        s = self.settings
        if s.embedding_provider in REMOTE_PROVIDERS:  # no model files here
            return remote_token_counter(s.tokenizer, s.embedding_max_input_tokens)
        _, path = resolve_model(s.embedding_model)
        return ModelTokenCounter(path)

    @property
    def tokens(self) -> ModelTokens:
        return self.token_counter

    # -- the other adapters stages need -------------------------------------------

    @cached_property
    def keywords(self) -> JiebaKeywordExtractor:
        """Query keywords for the hybrid evidence (indexing no longer extracts any)."""
        return JiebaKeywordExtractor()

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
            max_segments_per_document=s.max_segments_per_document,
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
            linger=s.embed_linger_ms / 1000 if spec.lingers else 0.0,
            lookahead=s.embed_lookahead,
            fetch_wait_ms=s.fetch_wait_ms,
        )
        publisher = self.publisher(bootstrap, client_id=f"kbstream-{name}")
        stage, inputs = self.stage(name), [self.topics.name(t) for t in spec.inputs]
        return stage_runner(
            s.runtime,
            stage,
            inputs,
            self.topics,
            config,
            publisher,
            FailureRecorder(self.uow),
            SqlDeliveryLog(self.database),
            datadir=s.home / "faust",
        )

    def publisher(self, bootstrap: str, client_id: str) -> EventPublisher:
        """A producer for ``bootstrap``; journaled when it is the embedded broker."""
        from kbstream.journal import writer_for

        return EventPublisher(
            bootstrap,
            self.settings.max_event_bytes,
            client_id=client_id,
            journal=writer_for(self.settings, bootstrap),
        )

    def close(self) -> None:
        for provider in [
            self.__dict__.get("provider"),
            *self.__dict__.get("other_providers", {}).values(),
        ]:
            close = getattr(provider, "close", None)
            if close is not None:  # a remote provider's HTTP client and threads
                close()
        if "vectors" in self.__dict__:
            self.vectors.close()
        if "database" in self.__dict__:
            self.database.dispose()


class _Scoped(Container):
    """``Container.scoped``: its own settings, its parent's adapters."""

    def __init__(self, parent: Container, settings: Settings) -> None:
        self._parent = parent
        self._settings = settings
        self.topics = parent.topics  # the same prefix: RUN_SCOPED does not hold it

    def close(self) -> None:
        """Nothing: the adapters are the parent's, closed with it."""


def _parents(name: str) -> property:
    def get(self: _Scoped) -> Any:
        return getattr(self._parent, name)

    return property(get)


# every adapter the parent builds lazily is the parent's: built once, closed once
for _name, _attr in list(vars(Container).items()):
    if isinstance(_attr, cached_property):
        setattr(_Scoped, _name, _parents(_name))
