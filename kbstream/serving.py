"""Which vector index answers a dataset's searches, and the model that
embeds its queries: the collection the dataset's alias points at, and the
model its registry row names (loaded once per process when it is not the
configured one). A dataset without an alias (indexed before aliases existed,
or never loaded) is searched in the configured model's collection."""

from __future__ import annotations

from domain.ports import EmbeddingProvider
from domain.vector_indexes import DatasetIndexes, IndexTarget
from infra.vectors import MilvusVectorStore, alias_name
from kbstream.bootstrap import Container


def dataset_indexes(c: Container, dataset: str) -> DatasetIndexes:
    tenant = c.settings.tenant
    with c.uow(readonly=True) as uow:
        return DatasetIndexes(tenant, dataset, uow.vector_indexes.for_dataset(tenant, dataset))


def serving_index(c: Container, dataset: str) -> tuple[MilvusVectorStore, IndexTarget] | None:
    """The store reading through the dataset's alias and the model of the
    collection behind it; None when the dataset has no alias."""
    tenant = c.settings.tenant
    behind = c.vectors.alias_target(tenant, dataset)
    if behind is None:
        return None
    rules = dataset_indexes(c, dataset)
    record = next((r for r in rules.records if r.target.collection == behind), rules.serving)
    if record is None:  # an alias without a registry row: made by hand
        return None
    return c.vectors.view(alias_name(tenant, dataset), record.target.dim), record.target


def search_index(c: Container, dataset: str) -> tuple[MilvusVectorStore, EmbeddingProvider]:
    """Where to search the dataset and what embeds the query."""
    found = serving_index(c, dataset)
    if found is None:
        return c.vectors, c.provider
    store, target = found
    return store, c.provider_for(target)
