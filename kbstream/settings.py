"""Configuration, from KBSTREAM_* environment variables (documented in README).

Every verb reads the same settings; ``--home`` only moves the default
locations of the embedded state."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024


class Settings(BaseSettings):
    # frozen: what a process was started with stays so; a run that needs other
    # values builds other settings (model_copy)
    model_config = SettingsConfigDict(env_prefix="KBSTREAM_", extra="ignore", frozen=True)

    home: Path = Field(default=Path(".kbstream"), description="embedded state directory")
    brokers: str | None = Field(
        default=None, description="Kafka bootstrap servers; unset = start the embedded broker"
    )
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; unset = SQLite in home"
    )
    milvus_uri: str | None = Field(
        default=None, description="Milvus URI; unset = milvus-lite in home"
    )
    milvus_token: str | None = None
    broker_journal: Path | None = Field(
        default=None,
        description="set by kbstream for the processes of an embedded broker: the journal "
        "that keeps its acknowledged events across restarts",
    )
    tenant: str = "default"

    # a secured Kafka cluster (docs/security.md): librdkafka's names, also
    # mapped onto faust's aiokafka; they apply to KBSTREAM_BROKERS (leave them
    # unset with the embedded broker, which has no authentication)
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "SCRAM-SHA-512"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_ca_location: str | None = Field(
        default=None, description="CA certificate file for SSL/SASL_SSL; unset = system CAs"
    )

    topic_prefix: str = "kbstream."
    partitions: int = Field(default=4, ge=1)
    replication_factor: int = Field(default=1, ge=1)
    session_timeout_ms: int = Field(default=6000, ge=1000)
    max_poll_interval_ms: int = Field(default=600_000, ge=10_000)

    embedding_provider: str = "sentence-transformers"
    embedding_model: str | None = Field(
        default=None, description="model path or name; unset = bundled all-MiniLM-L6-v2"
    )
    embedding_device: str = "cpu"
    embedding_batch_size: int = Field(default=32, ge=1)
    # the openai provider (infra/remote_embedding.py; README "Remote embedding services")
    embedding_base_url: str = "https://api.openai.com/v1"
    embedding_api_key: SecretStr | None = Field(
        default=None, description="unset = OPENAI_API_KEY, if set"
    )
    embedding_dimensions: int | None = Field(
        default=None, ge=1, description="the remote model's output dimension (openai: required)"
    )
    embedding_send_dimensions: bool = Field(
        default=False, description="send `dimensions` to shorten Matryoshka models"
    )
    embedding_max_concurrency: int = Field(default=4, ge=1)
    embedding_rpm: int = Field(default=3000, ge=0, description="requests per minute; 0 = no limit")
    embedding_tpm: int = Field(default=1_000_000, ge=0, description="tokens per minute; 0 = none")
    embedding_timeout_seconds: float = Field(default=60.0, gt=0)
    embedding_max_retry_after_seconds: float = Field(
        default=60.0,
        ge=0,
        le=3600,
        description="the longest a 429's Retry-After pauses the remote service's calls; "
        "a longer one fails the batch as transient (the stage's retry policy backs off)",
    )
    embedding_max_input_tokens: int = Field(
        default=8191, ge=8, description="the remote model's input limit, in its tokens"
    )
    tokenizer: str | None = Field(
        default=None, description="tokenizer.json or model folder of the remote model"
    )
    runtime: Literal["confluent", "faust"] = Field(
        default="confluent",
        description="what consumes the stages: a confluent-kafka loop or faust-streaming agents",
    )
    embed_max_segments: int = Field(default=96, ge=1, description="segments one embed poll takes")
    embed_linger_ms: int = Field(
        default=20, ge=0, description="how long embed waits for more events to fill a batch"
    )
    fetch_wait_ms: int = Field(
        default=100,
        ge=1,
        le=10_000,
        description="how long a stage's fetch may wait at the broker for new events",
    )
    embed_lookahead: bool = Field(
        default=True,
        description="start the model on the next batch while the current one is written "
        "(confluent runtime)",
    )
    # hybrid search (domain/fusion.py)
    embedding_scripts: str = Field(
        default="latin",
        description="comma-separated scripts the model understands (latin, han, ...; all)",
    )
    hybrid_fusion: Literal["rrf", "score"] = "rrf"
    hybrid_vector_weight: float | None = Field(
        default=None, ge=0, description="unset = the query's share of tokens in embedding_scripts"
    )
    # below the model's 1: word overlap is weaker evidence than a model that reads the query
    hybrid_keyword_weight: float = Field(default=0.5, ge=0)
    # off since keywords are BM25: it no longer helped on the benchmark (benchmarks/README.md)
    hybrid_keyword_evidence: bool = Field(
        default=False, description="scale each keyword hit by the share of the query it holds"
    )
    # the cosine the model gives unrelated text (relevance 0) and a clear
    # answer (relevance 1); domain/fusion.py, measured for all-MiniLM-L6-v2
    vector_relevance_floor: float = Field(default=0.15, ge=-1, le=1)
    vector_relevance_full: float = Field(default=0.6, ge=-1, le=1)
    # Milvus's tokenizer for the keyword index (infra/keyword_index.py)
    keyword_tokenizer: Literal["standard", "jieba", "whitespace"] = "standard"
    # `kbstream serve`: the bearer token clients (Dify) send; unset = no auth
    api_key: str | None = None
    # a longer query is a 400 before any work (1 MB cost 4 s of CPU); the model
    # reads its first 256 tokens anyway
    max_query_chars: int = Field(default=4000, ge=1)
    # /docs, /redoc and /openapi.json without the key (they list every endpoint)
    api_docs_open: bool = False
    # records carry the document's absolute source path (a server path) too
    api_expose_paths: bool = False

    allowed_roots: str = Field(
        default="", description="os.pathsep-separated roots for file:// refs"
    )
    max_document_bytes: int = Field(default=50 * MiB, ge=1)
    # a parser child exceeding these ends its document in `error` (keep the
    # wall limit well below max_poll_interval_ms)
    extract_cpu_seconds: int = Field(default=60, ge=1)
    extract_memory_bytes: int = Field(default=2048 * MiB, ge=64 * MiB)
    extract_wall_seconds: float = Field(default=120.0, gt=0)
    max_event_bytes: int = Field(default=900_000, ge=10_000)
    inline_text_bytes: int = Field(default=256 * 1024, ge=1024)
    segments_per_event: int = Field(default=32, ge=1)
    max_segments_per_document: int = Field(
        default=10_000,
        ge=1,
        description="a document that would split into more segments ends in error",
    )

    retry_attempts: int = Field(default=6, ge=1)
    retry_max_seconds: float = Field(default=30.0, gt=0)
    max_deliveries: int = Field(
        default=5, ge=1, description="deaths of a worker on one message before it is dead-lettered"
    )

    retired_grace_seconds: float = Field(
        default=3600.0, ge=0, description="how long a retired vector index is kept after a switch"
    )

    log_level: str = "INFO"
    log_format: Literal["text", "json"] = Field(
        default="text", description="json: one JSON object per line, for log shippers"
    )
    metrics_port: int | None = Field(
        default=None, description="/metrics, /healthz and /readyz on this port"
    )

    @model_validator(mode="after")
    def _relevance_scale(self) -> Settings:
        if not self.vector_relevance_full > self.vector_relevance_floor:
            raise ValueError(
                "KBSTREAM_VECTOR_RELEVANCE_FULL must be above KBSTREAM_VECTOR_RELEVANCE_FLOOR"
            )
        return self

    @model_validator(mode="after")
    def _sasl_needs_credentials(self) -> Settings:
        protocol = self.kafka_security_protocol
        if protocol.startswith("SASL_") and not (
            self.kafka_sasl_username and self.kafka_sasl_password
        ):
            raise ValueError(
                f"KBSTREAM_KAFKA_SECURITY_PROTOCOL={protocol} needs "
                "KBSTREAM_KAFKA_SASL_USERNAME and KBSTREAM_KAFKA_SASL_PASSWORD"
            )
        return self

    @field_validator("home")
    @classmethod
    def _abs_home(cls, v: Path) -> Path:
        return v.expanduser().absolute()

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'kbstream.db'}"

    @property
    def vector_uri(self) -> str:
        return self.milvus_uri or str(self.home / "milvus.db")

    @property
    def roots(self) -> list[Path]:
        return [Path(p).expanduser().resolve() for p in self.allowed_roots.split(os.pathsep) if p]

    def kafka_client_properties(self) -> dict[str, str]:
        """The librdkafka security properties for KBSTREAM_BROKERS (empty for
        a plaintext cluster)."""
        protocol = self.kafka_security_protocol
        if protocol == "PLAINTEXT":
            return {}
        props = {"security.protocol": protocol}
        if protocol.startswith("SASL_"):
            assert self.kafka_sasl_username and self.kafka_sasl_password  # validated
            props["sasl.mechanism"] = self.kafka_sasl_mechanism
            props["sasl.username"] = self.kafka_sasl_username
            props["sasl.password"] = self.kafka_sasl_password.get_secret_value()
        if self.kafka_ssl_ca_location and protocol.endswith("SSL"):
            props["ssl.ca.location"] = self.kafka_ssl_ca_location
        return props

    def group(self, stage: str) -> str:
        return f"{self.topic_prefix}{stage}"


def load_settings(**overrides: object) -> Settings:
    clean = {k: v for k, v in overrides.items() if v is not None}
    return Settings(**clean)  # type: ignore[arg-type]
