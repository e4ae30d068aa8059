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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from pymilvus import DataType, MilvusClient
from pymilvus.exceptions import MilvusException

from domain.documents import DocKey
from domain.errors import PermanentError, TransientError
from domain.ports import VectorRow
from domain.vector_indexes import IndexTarget
from infra.children import milvus_dir_locked
from infra.errors import classify_milvus

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


def _missing(exc: MilvusException) -> bool:
    text = str(exc).lower()
    return "not exist" in text or "not found" in text


# milvus-lite serves a local file from a gRPC server thread of this process
# that outlives the client; stop it when the last store on that file closes.
_LOCAL_OPEN: dict[str, int] = {}
_LOCAL_LOCK = threading.Lock()


def _is_local(uri: str) -> bool:
    return not uri.startswith(("http://", "https://", "tcp://", "unix:", "grpc://"))


# gRPC keepalive that milvus-lite's server (a grpcio server on its defaults) accepts.
# pymilvus pings every 10 s, idle channels included; that server allows no ping on an
# idle connection and one per 5 minutes during calls, and answers more with GOAWAY
# too_many_pings, which gRPC core prints on stderr. A server on this machine needs no
# keepalive to be found dead: its connection is refused or reset at once.
_LOOPBACK_KEEPALIVE = {
    "grpc.keepalive_time_ms": 300_000,
    "grpc.keepalive_permit_without_calls": 0,
}


def grpc_options(uri: str) -> dict[str, int]:
    """Channel options for a Milvus at ``uri``: the loopback keepalive for a local
    file (milvus-lite in this process) or a server on this machine (`kbstream up`'s
    milvus-lite); pymilvus's own for a remote Milvus."""
    if _is_local(uri) or urlsplit(uri).hostname in ("127.0.0.1", "localhost", "::1"):
        return dict(_LOOPBACK_KEEPALIVE)
    return {}


def _retain_local(uri: str) -> None:
    if _is_local(uri):
        with _LOCAL_LOCK:
            _LOCAL_OPEN[uri] = _LOCAL_OPEN.get(uri, 0) + 1


def _release_local(uri: str) -> None:
    if not _is_local(uri):
        return
    with _LOCAL_LOCK:
        left = _LOCAL_OPEN.get(uri, 1) - 1
        if left > 0:
            _LOCAL_OPEN[uri] = left
            return
        _LOCAL_OPEN.pop(uri, None)
    try:
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(uri)
    except Exception:  # an older milvus-lite without a server manager
        log.debug("could not release milvus-lite server for %s", uri, exc_info=True)


def _q(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _of_document(key: DocKey) -> str:
    return (
        f"tenant_id == {_q(key.tenant_id)} and dataset_id == {_q(key.dataset_id)} "
        f"and document_id == {_q(key.document_id)}"
    )


class _PerDocumentQueries:
    """Reads both Milvus collections (vectors, keywords) answer the same way:
    they share the tenant/dataset/document fields. Needs ``_call``, ``client``
    and ``collection``."""

    _call: Any
    client: Any
    collection: str

    def ids_for_documents(self, keys: Iterable[DocKey]) -> dict[DocKey, set[str]]:
        """One query per (tenant, dataset) and chunk of documents instead of
        one per document: track_status checks a whole batch at once."""
        out: dict[DocKey, set[str]] = {}
        groups: dict[tuple[str, str], list[str]] = {}
        for k in set(keys):
            out[k] = set()
            groups.setdefault((k.tenant_id, k.dataset_id), []).append(k.document_id)
        for (tenant, dataset), docs in groups.items():
            docs.sort()
            # small chunks: a query returns at most 16,384 rows
            for i in range(0, len(docs), 16):
                chunk = docs[i : i + 16]
                expr = (
                    f"tenant_id == {_q(tenant)} and dataset_id == {_q(dataset)} and "
                    f"document_id in [{', '.join(_q(d) for d in chunk)}]"
                )
                res = self._call(
                    "query",
                    self.client.query,
                    self.collection,
                    filter=expr,
                    output_fields=["index_node_id", "document_id"],
                    consistency_level="Strong",
                )
                for r in res:
                    out[DocKey(tenant, dataset, r["document_id"])].add(r["index_node_id"])
        return out

    def count(self, tenant_id: str, dataset_id: str) -> int:
        expr = f"tenant_id == {_q(tenant_id)} and dataset_id == {_q(dataset_id)}"
        res = self._call(
            "count", self.client.query, self.collection, filter=expr, output_fields=["count(*)"]
        )
        return int(res[0]["count(*)"]) if res else 0


class MilvusVectorStore(_PerDocumentQueries):
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
        elif not self._call("has", client.has_collection, collection):
            raise LookupError(f"Milvus has no collection or alias {collection!r}")
        return other

    def has_collection(self, name: str) -> bool:
        return bool(self._call("has", self.client.has_collection, name))

    def alias_target(self, tenant_id: str, dataset_id: str) -> str | None:
        """The collection the dataset's alias points at; None without an alias."""
        alias = alias_name(tenant_id, dataset_id)
        # asking describe_alias about a missing alias makes pymilvus log an ERROR
        if alias not in self._call("list_aliases", self.client.list_aliases).get("aliases", []):
            return None
        try:
            with self._lock:
                res = self.client.describe_alias(alias=alias)
        except MilvusException as exc:
            if _missing(exc):
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
            self._call("create_alias", self.client.create_alias, collection, alias)
        else:
            self._call("alter_alias", self.client.alter_alias, collection, alias)

    def aliases_of(self, collection: str) -> list[str]:
        res = self._call("list_aliases", self.client.list_aliases, collection_name=collection)
        return list(res.get("aliases", []))

    def count_all(self) -> int:
        res = self._call(
            "count", self.client.query, self.collection, filter="", output_fields=["count(*)"]
        )
        return int(res[0]["count(*)"]) if res else 0

    def delete_dataset(self, tenant_id: str, dataset_id: str) -> None:
        expr = f"tenant_id == {_q(tenant_id)} and dataset_id == {_q(dataset_id)}"
        self._call("delete", self.client.delete, self.collection, filter=expr)

    def drop(self) -> None:
        self._call("drop", self.client.drop_collection, self.collection)

    def vectors(self, index_node_ids: Sequence[str]) -> dict[str, list[float]]:
        """index_node_id -> stored vector (for checks that compare vector spaces)."""
        if not index_node_ids:
            return {}
        res = self._call(
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
                    try:
                        kwargs: dict[str, Any] = {
                            "uri": self.uri,
                            "grpc_options": grpc_options(self.uri),
                        }
                        if self._token:
                            kwargs["token"] = self._token
                        self._client = MilvusClient(**kwargs)
                        _retain_local(self.uri)
                    except MilvusException as exc:
                        # a local file locked by another process will not free
                        # itself: say who holds it instead of retrying forever
                        held = milvus_dir_locked(Path(self.uri)) if _is_local(self.uri) else None
                        if held:
                            raise PermanentError(held) from exc
                        raise TransientError(f"Milvus unavailable at {self.uri}: {exc}") from exc
                    self._ensure_collection()
        return self._client

    def _ensure_collection(self) -> None:
        assert self._client is not None
        c = self._client
        if c.has_collection(self.collection):
            # a collection opened from disk starts released; searches need it loaded
            c.load_collection(self.collection)
            return
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("index_node_id", DataType.VARCHAR, is_primary=True, max_length=64)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
        schema.add_field("tenant_id", DataType.VARCHAR, max_length=128)
        schema.add_field("dataset_id", DataType.VARCHAR, max_length=128, is_partition_key=True)
        schema.add_field("document_id", DataType.VARCHAR, max_length=128)
        index = c.prepare_index_params()
        index.add_index(field_name="vector", index_type="AUTOINDEX", metric_type="COSINE")
        try:
            c.create_collection(self.collection, schema=schema, index_params=index)
        except MilvusException:
            # another worker created it between our check and create
            if not c.has_collection(self.collection):
                raise
            c.load_collection(self.collection)

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            try:
                return fn(*args, **kwargs)
            except MilvusException as exc:
                message = str(exc).lower()
                if self._client is not None and ("released" in message or "not loaded" in message):
                    # someone released the collection (an operator, a restart):
                    # load it again and retry once instead of stalling forever
                    try:
                        self._client.load_collection(self.collection)
                        return fn(*args, **kwargs)
                    except MilvusException as again:
                        raise classify_milvus(what, again) from again
                raise classify_milvus(what, exc) from exc

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
        res = self._call("upsert", self.client.upsert, self.collection, data)
        return int(res.get("upsert_count", len(rows)))

    def delete(self, index_node_ids: Sequence[str]) -> None:
        if not index_node_ids:
            return
        self._call("delete", self.client.delete, self.collection, ids=list(index_node_ids))

    def delete_document(self, key: DocKey) -> None:
        expr = _of_document(key)
        self._call("delete", self.client.delete, self.collection, filter=expr)

    def search(
        self, vector: Sequence[float], tenant_id: str, dataset_id: str, limit: int
    ) -> list[VectorHit]:
        expr = f"tenant_id == {_q(tenant_id)} and dataset_id == {_q(dataset_id)}"
        res = self._call(
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
        expr = f"tenant_id == {_q(tenant_id)} and dataset_id == {_q(dataset_id)}"
        out: dict[str, tuple[str, int]] = {}
        it = self._call(
            "query",
            self.client.query_iterator,
            self.collection,
            batch_size=1000,
            filter=expr,
            output_fields=["index_node_id", "document_id"],
        )
        while True:
            batch = self._call("query", it.next)
            if not batch:
                it.close()
                break
            for row in batch:
                node = row["index_node_id"]
                seen = out.get(node)
                out[node] = (row["document_id"], seen[1] + 1 if seen else 1)
        return out

    def ids_for_document(self, key: DocKey) -> list[str]:
        expr = _of_document(key)
        res = self._call(
            "query",
            self.client.query,
            self.collection,
            filter=expr,
            output_fields=["index_node_id"],
            consistency_level="Strong",  # completion decisions read this
        )
        return [r["index_node_id"] for r in res]

    def existing(self, index_node_ids: Sequence[str]) -> set[str]:
        if not index_node_ids:
            return set()
        res = self._call(
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
                    self._client.close()
                finally:
                    self._client = None
                    _release_local(self.uri)
