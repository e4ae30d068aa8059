"""In-memory implementations of the ports (domain/ports.py) for fast unit
tests: the adapters in ``adapters``, the unit of work and its repositories in
``unit_of_work``."""

from tests.fakes.adapters import (
    HashingEmbeddingDouble,
    InMemoryDocumentReader,
    InMemoryKeywordIndex,
    InMemoryVectorIndex,
)
from tests.fakes.repositories import _Segments
from tests.fakes.unit_of_work import InMemoryUnitOfWork, InMemoryUnitOfWorkFactory

__all__ = [
    "HashingEmbeddingDouble",
    "InMemoryDocumentReader",
    "InMemoryKeywordIndex",
    "InMemoryUnitOfWork",
    "InMemoryUnitOfWorkFactory",
    "InMemoryVectorIndex",
    "_Segments",
]
