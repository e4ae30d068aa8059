"""Milvus vector store: milvus-lite file (embedded default), milvus-lite server
or a real Milvus (production). Primary key = index_node_id, so every write is an
idempotent upsert; the dataset is the partition key and every search filters on
tenant and dataset. One physical collection per embedding model; each dataset
reads through its own alias (``alias_name``), which a rebuild moves atomically
from one model's collection to another's."""

from __future__ import annotations

import copy
import hashlib
import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pymilvus import DataType, MilvusClient
from pymilvus.exceptions import MilvusException

from domain.ports import VectorRow
from domain.vector_indexes import IndexTarget
from infra.errors import classify_milvus
from infra.milvus import (
    MilvusCollection,
    connect,
    disconnect,
    ensure_collection,
    is_missing,
    of_dataset,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VectorHit:
    index_node_id: str
    score: float
    document_id: str


def collection_name(provider: str, model: str, dim: int) -> str:
    """One collection per embedding model: a model change builds a new
    collection beside the old one instead of mixing vector spaces. The readable
    part may collide (org/model vs other-org/model); the hash never does."""
    base = model.rstrip("/").split("/")[-1]
    if provider != "sentence-transformers":
        base = f"{provider}_{base}"
    slug = re.sub(r"[^A-Za-z0-9]+", "_", base).strip("_").lower()[:120] or "model"
    digest = hashlib.sha256(f"{provider}\x1f{model}".encode()).hexdigest()[:8]
    return f"kb_{slug}_{dim}_{digest}"


def alias_name(tenant_id: str, dataset_id: str) -> str:
    """The dataset's search alias: readable, and unique by its hash (Milvus
    names: letters, digits and underscores, starting with a letter)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", dataset_id).strip("_").lower()[:80] or "dataset"
    digest = hashlib.sha256(f"{tenant_id}\x1f{dataset_id}".encode()).hexdigest()[:8]
    return f"kbd_{slug}_{digest}"


class MilvusVectorStore(MilvusCollection):
    def __init__(
        self,
        uri: str,
        collection: str,
        dim: int,
        token: str | None = None,
        provider: str = "",
        model: str = "",
        model_spec: str = "",
    ) -> None:
        self.uri = uri
        self.collection = collection
        self.dim = dim
        self._token = token
        self._target = IndexTarget(provider, model, model_spec, dim, collection)
        # milvus-lite's local mode is not documented as thread-safe
        self._lock = threading.RLock()
        self._client: MilvusClient | None = None
        self._owner = True  # views share the owner's client and never close it

    @property
    def lock(self) -> threading.RLock:
        return self._lock

    @property
    def target(self) -> IndexTarget:
        return self._target

    # -- aliases and other collections ----------------------------------------------

    def view(
        self, collection: str, dim: int | None = None, create: bool = False
    ) -> MilvusVectorStore:
        """The same store over another collection or an alias, sharing this
        store's client; ``create`` makes the collection (with ``dim``) if missing."""
        client = self.client
        other = copy.copy(self)
        other.collection = collection
        other.dim = dim or self.dim
        other._owner = False
        if create:
            with self._lock:
                other._ensure_collection()
        elif not self.call("has", client.has_collection, collection):
            raise LookupError(f"Milvus has no collection or alias {collection!r}")
        return other

    def has_collection(self, name: str) -> bool:
        return bool(self.call("has", self.client.has_collection, name))

    def alias_target(self, tenant_id: str, dataset_id: str) -> str | None:
        """The collection the dataset's alias points at; None without an alias."""
        alias = alias_name(tenant_id, dataset_id)
        # asking describe_alias about a missing alias makes pymilvus log an ERROR
        if alias not in self.call("list_aliases", self.client.list_aliases).get("aliases", []):
            return None
        try:
            with self._lock:
                res = self.client.describe_alias(alias=alias)
        except MilvusException as exc:
            if is_missing(exc):
                return None
            raise classify_milvus("describe_alias", exc) from exc
        return str(res["collection_name"])

    def ensure_alias(self, tenant_id: str, dataset_id: str) -> None:
        if self.alias_target(tenant_id, dataset_id) is not None:
            return
        try:
            with self._lock:
                self.client.create_alias(self.collection, alias_name(tenant_id, dataset_id))
        except MilvusException as exc:
            # another worker created it meanwhile: theirs stands
            if self.alias_target(tenant_id, dataset_id) is None:
                raise classify_milvus("create_alias", exc) from exc

    def point_alias(self, tenant_id: str, dataset_id: str, collection: str) -> None:
        """Move (or create) the dataset's alias to ``collection``: one atomic
        switch for every search that follows."""
        alias = alias_name(tenant_id, dataset_id)
        if self.alias_target(tenant_id, dataset_id) is None:
            self.call("create_alias", self.client.create_alias, collection, alias)
        else:
            self.call("alter_alias", self.client.alter_alias, collection, alias)

    def aliases_of(self, collection: str) -> list[str]:
        res = self.call("list_aliases", self.client.list_aliases, collection_name=collection)
        return list(res.get("aliases", []))

    def count_all(self) -> int:
        res = self.call(
            "count", self.client.query, self.collection, filter="", output_fields=["count(*)"]
        )
        return int(res[0]["count(*)"]) if res else 0

    def drop(self) -> None:
        self.call("drop", self.client.drop_collection, self.collection)

    def vectors(self, index_node_ids: Sequence[str]) -> dict[str, list[float]]:
        """index_node_id -> stored vector (for checks that compare vector spaces)."""
        if not index_node_ids:
            return {}
        res = self.call(
            "get",
            self.client.query,
            self.collection,
            ids=list(index_node_ids),
            output_fields=["index_node_id", "vector"],
        )
        return {r["index_node_id"]: [float(x) for x in r["vector"]] for r in res}

    @property
    def client(self) -> MilvusClient:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = connect(self.uri, self._token)
                    self._ensure_collection()
        return self._client

    def _ensure_collection(self) -> None:
        assert self._client is not None
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("index_node_id", DataType.VARCHAR, is_primary=True, max_length=64)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
        schema.add_field("tenant_id", DataType.VARCHAR, max_length=128)
        schema.add_field("dataset_id", DataType.VARCHAR, max_length=128, is_partition_key=True)
        schema.add_field("document_id", DataType.VARCHAR, max_length=128)
        index = self._client.prepare_index_params()
        index.add_index(field_name="vector", index_type="AUTOINDEX", metric_type="COSINE")
        ensure_collection(self._client, self.collection, schema, index)

    def upsert(self, rows: Sequence[VectorRow]) -> int:
        if not rows:
            return 0
        data = [
            {
                "index_node_id": r.index_node_id,
                "vector": np.asarray(r.vector, dtype=np.float32).tolist(),
                "tenant_id": r.key.tenant_id,
                "dataset_id": r.key.dataset_id,
                "document_id": r.key.document_id,
            }
            for r in rows
        ]
        res = self.call("upsert", self.client.upsert, self.collection, data)
        return int(res.get("upsert_count", len(rows)))

    def search(
        self, vector: Sequence[float], tenant_id: str, dataset_id: str, limit: int
    ) -> list[VectorHit]:
        expr = of_dataset(tenant_id, dataset_id)
        res = self.call(
            "search",
            self.client.search,
            self.collection,
            data=[list(map(float, vector))],
            limit=limit,
            filter=expr,
            output_fields=["document_id"],
            anns_field="vector",
        )
        hits = res[0] if res else []
        return [
            VectorHit(
                h["id"] if "id" in h else h["index_node_id"],
                float(h["distance"]),
                h["entity"]["document_id"],
            )
            for h in hits
        ]

    def ids(self, tenant_id: str, dataset_id: str) -> dict[str, str]:
        """index_node_id -> document_id of every vector in a dataset."""
        return {k: v[0] for k, v in self.ids_with_duplicates(tenant_id, dataset_id).items()}

    def ids_with_duplicates(self, tenant_id: str, dataset_id: str) -> dict[str, tuple[str, int]]:
        """index_node_id -> (document_id, how many rows carry that id)."""
        expr = of_dataset(tenant_id, dataset_id)
        out: dict[str, tuple[str, int]] = {}
        it = self.call(
            "query",
            self.client.query_iterator,
            self.collection,
            batch_size=1000,
            filter=expr,
            output_fields=["index_node_id", "document_id"],
        )
        while True:
            batch = self.call("query", it.next)
            if not batch:
                it.close()
                break
            for row in batch:
                node = row["index_node_id"]
                seen = out.get(node)
                out[node] = (row["document_id"], seen[1] + 1 if seen else 1)
        return out

    def existing(self, index_node_ids: Sequence[str]) -> set[str]:
        if not index_node_ids:
            return set()
        res = self.call(
            "get",
            self.client.query,
            self.collection,
            ids=list(index_node_ids),
            output_fields=["index_node_id"],
        )
        return {r["index_node_id"] for r in res}

    def close(self) -> None:
        if not self._owner:
            return
        with self._lock:
            if self._client is not None:
                try:
                    disconnect(self._client, self.uri)
                finally:
                    self._client = None
