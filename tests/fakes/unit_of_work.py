"""The in-memory unit of work: its own copy of the state, published row by
row on commit (see tests.fakes.state)."""

from __future__ import annotations

import copy
import itertools
from typing import Any, Self

from domain.ports import (
    DocumentRepository,
    EmbeddingCache,
    ImportJobs,
    PayloadStore,
    SegmentRepository,
    VectorIndexRegistry,
)
from tests.fakes.repositories import (
    _Documents,
    _Embeddings,
    _Jobs,
    _Payloads,
    _Segments,
    _VectorIndexes,
)
from tests.fakes.state import _State


class InMemoryUnitOfWorkFactory:
    """``factory(readonly=False)`` -> an in-memory UnitOfWork over shared state."""

    def __init__(self) -> None:
        self.state = _State()
        # sequences, like a database's, are not transactional
        self._doc_pk = itertools.count(1)
        self._segment_id = itertools.count(1)
        self.commits = 0  # committed write units of work, for tests
        self.open_units = 0  # units of work inside their `with` block
        self.readonly_opened = 0  # read-only units of work entered so far

    def __call__(self, readonly: bool = False) -> InMemoryUnitOfWork:
        return InMemoryUnitOfWork(self, readonly)

    def _publish(self, base: _State, work: _State) -> None:
        for name in _State.TABLES:
            before: dict[Any, Any] = getattr(base, name)
            after: dict[Any, Any] = getattr(work, name)
            shared: dict[Any, Any] = getattr(self.state, name)
            for k, v in after.items():
                if k not in before or before[k] != v:
                    shared[k] = copy.deepcopy(v)
            for k in before.keys() - after.keys():
                shared.pop(k, None)
        self.commits += 1


class InMemoryUnitOfWork:
    def __init__(self, factory: InMemoryUnitOfWorkFactory, readonly: bool) -> None:
        self.factory = factory
        self.readonly = readonly
        self._base: _State | None = None
        self._work: _State | None = None
        # typed as the ports, which is what UnitOfWork's attributes promise
        self.documents: DocumentRepository = _Documents(self)
        self.segments: SegmentRepository = _Segments(self)
        self.embeddings: EmbeddingCache = _Embeddings(self)
        self.payloads: PayloadStore = _Payloads(self)
        self.jobs: ImportJobs = _Jobs(self)
        self.vector_indexes: VectorIndexRegistry = _VectorIndexes(self)

    def __enter__(self) -> Self:
        self._base = copy.deepcopy(self.factory.state)
        self._work = copy.deepcopy(self._base)
        self.factory.open_units += 1
        self.factory.readonly_opened += self.readonly
        return self

    def __exit__(self, *exc: object) -> None:
        self._base = self._work = None
        self.factory.open_units -= 1

    def commit(self) -> None:
        if self.readonly:
            raise RuntimeError("commit of a read-only unit of work")
        assert self._base is not None and self._work is not None
        self.factory._publish(self._base, self._work)
        # what follows in the same block builds on what was just committed
        self._base = copy.deepcopy(self._work)

    @property
    def state(self) -> _State:
        if self._work is None:
            raise RuntimeError("the unit of work is used outside its `with` block")
        return self._work

    def writable(self) -> _State:
        if self.readonly:
            raise RuntimeError("write in a read-only unit of work")
        return self.state
