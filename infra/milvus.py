"""What every Milvus collection of kbstream shares: the client (built once per
Milvus, with the keepalive milvus-lite accepts), the lock around it, calls that
reload a released collection and classify errors (infra/errors.py), creating a
collection when another worker may be creating it too, and the filter
expressions by tenant, dataset and document. The vector store
(infra/vectors.py) and the keyword index (infra/keyword_index.py) are built on
it."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pymilvus import MilvusClient
from pymilvus.exceptions import MilvusException

from domain.documents import DocKey
from domain.errors import PermanentError, TransientError
from infra.children import milvus_dir_locked
from infra.errors import classify_milvus

log = logging.getLogger(__name__)

# -- the client ---------------------------------------------------------------------------


def is_local(uri: str) -> bool:
    """A milvus-lite file served by this process (not a server's address)."""
    return not uri.startswith(("http://", "https://", "tcp://", "unix:", "grpc://"))


# gRPC keepalive that milvus-lite's server (a grpcio server on its defaults) accepts.
# pymilvus pings every 10 s, idle channels included; that server allows no ping on an
# idle connection and one per 5 minutes during calls, and answers more with GOAWAY
# too_many_pings, which gRPC core prints on stderr. A server on this machine needs no
# keepalive to be found dead: its connection is refused or reset at once.
LOOPBACK_KEEPALIVE = {
    "grpc.keepalive_time_ms": 300_000,
    "grpc.keepalive_permit_without_calls": 0,
}


def grpc_options(uri: str) -> dict[str, int]:
    """Channel options for a Milvus at ``uri``: the loopback keepalive for a local
    file (milvus-lite in this process) or a server on this machine (`kbstream up`'s
    milvus-lite); pymilvus's own for a remote Milvus."""
    if is_local(uri) or urlsplit(uri).hostname in ("127.0.0.1", "localhost", "::1"):
        return dict(LOOPBACK_KEEPALIVE)
    return {}


# milvus-lite serves a local file from a gRPC server thread of this process
# that outlives the client; stop it when the last client on that file closes.
_local_open: dict[str, int] = {}
_local_lock = threading.Lock()


def connect(uri: str, token: str | None = None) -> MilvusClient:
    """A client for ``uri``; close it with ``disconnect``. Raises PermanentError
    when another process holds the local file, TransientError otherwise."""
    if is_local(uri):
        # this process serves the file: BM25 over the dataset's statistics
        from infra import milvus_lite_bm25

        milvus_lite_bm25.install()
    kwargs: dict[str, Any] = {"uri": uri, "grpc_options": grpc_options(uri)}
    if token:
        kwargs["token"] = token
    try:
        client = MilvusClient(**kwargs)
    except MilvusException as exc:
        # a local file locked by another process will not free itself:
        # say who holds it instead of retrying forever
        held = milvus_dir_locked(Path(uri)) if is_local(uri) else None
        if held:
            raise PermanentError(held) from exc
        raise TransientError(f"Milvus unavailable at {uri}: {exc}") from exc
    if is_local(uri):
        with _local_lock:
            _local_open[uri] = _local_open.get(uri, 0) + 1
    return client


def disconnect(client: MilvusClient, uri: str) -> None:
    """Close a client of ``connect``; the last one on a local file stops its server."""
    try:
        client.close()
    finally:
        _release_local(uri)


def _release_local(uri: str) -> None:
    if not is_local(uri):
        return
    with _local_lock:
        left = _local_open.get(uri, 1) - 1
        if left > 0:
            _local_open[uri] = left
            return
        _local_open.pop(uri, None)
    try:
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(uri)
    except Exception:  # an older milvus-lite without a server manager
        log.debug("could not release milvus-lite server for %s", uri, exc_info=True)


def is_missing(exc: MilvusException) -> bool:
    """Milvus's answer about a collection or alias that does not exist."""
    text = str(exc).lower()
    return "not exist" in text or "not found" in text


def ensure_collection(client: MilvusClient, name: str, schema: Any, index: Any) -> None:
    """Create ``name`` unless it exists, and load it either way: a collection
    opened from disk starts released, and searches need it loaded. Another
    worker may create it between the check and the create: theirs stands."""
    if client.has_collection(name):
        client.load_collection(name)
        return
    try:
        client.create_collection(name, schema=schema, index_params=index)
    except MilvusException:
        if not client.has_collection(name):
            raise
        client.load_collection(name)


# -- filter expressions ---------------------------------------------------------------


def quote(value: str) -> str:
    """A string literal of Milvus's filter language."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def of_dataset(tenant_id: str, dataset_id: str) -> str:
    return f"tenant_id == {quote(tenant_id)} and dataset_id == {quote(dataset_id)}"


def of_document(key: DocKey) -> str:
    return (
        f"{of_dataset(key.tenant_id, key.dataset_id)} and document_id == {quote(key.document_id)}"
    )


# the most rows one query answers (Milvus's query window)
QUERY_CAP = 16_384


def of_documents(tenant_id: str, dataset_id: str, document_ids: Iterable[str]) -> str:
    docs = ", ".join(quote(d) for d in document_ids)
    return f"{of_dataset(tenant_id, dataset_id)} and document_id in [{docs}]"


# -- a collection -----------------------------------------------------------------------


class MilvusCollection:
    """One collection of the shared tenant/dataset/document fields, read and
    written through ``call``. Subclasses provide ``client`` (connected, the
    collection ensured), ``lock`` (guarding that client) and ``collection``."""

    collection: str

    @property
    def client(self) -> MilvusClient:
        raise NotImplementedError

    @property
    def lock(self) -> threading.RLock:
        raise NotImplementedError

    def call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` under the lock; Milvus errors classified
        (TransientError or PermanentError) as ``what``."""
        # milvus-lite's local mode is not documented as thread-safe
        with self.lock:
            try:
                return fn(*args, **kwargs)
            except MilvusException as exc:
                message = str(exc).lower()
                if "released" in message or "not loaded" in message:
                    # someone released the collection (an operator, a restart):
                    # load it again and retry once instead of stalling forever
                    try:
                        self.client.load_collection(self.collection)
                        return fn(*args, **kwargs)
                    except MilvusException as again:
                        raise classify_milvus(what, again) from again
                raise classify_milvus(what, exc) from exc

    # -- reads and deletes both collections answer the same way -----------------------

    def ids_for_documents(self, keys: Iterable[DocKey]) -> dict[DocKey, set[str]]:
        """One query per (tenant, dataset) and chunk of up to 256 documents
        instead of one per document: track_status checks a whole batch at once.
        A query answers at most QUERY_CAP rows, so a chunk whose answer reaches
        it is asked again in halves (a single document without the cap)."""
        out: dict[DocKey, set[str]] = {}
        groups: dict[tuple[str, str], list[str]] = {}
        for k in set(keys):
            out[k] = set()
            groups.setdefault((k.tenant_id, k.dataset_id), []).append(k.document_id)
        for (tenant, dataset), docs in groups.items():
            docs.sort()
            for i in range(0, len(docs), 256):
                for r in self._ids_of(tenant, dataset, docs[i : i + 256]):
                    out[DocKey(tenant, dataset, r["document_id"])].add(r["index_node_id"])
        return out

    def _ids_of(self, tenant: str, dataset: str, docs: list[str]) -> list[dict[str, Any]]:
        capped = len(docs) > 1
        res: list[dict[str, Any]] = self.call(
            "query",
            self.client.query,
            self.collection,
            filter=of_documents(tenant, dataset, docs),
            output_fields=["index_node_id", "document_id"],
            consistency_level="Strong",  # completion decisions read this
            **({"limit": QUERY_CAP} if capped else {}),
        )
        if capped and len(res) >= QUERY_CAP:
            half = len(docs) // 2
            return self._ids_of(tenant, dataset, docs[:half]) + self._ids_of(
                tenant, dataset, docs[half:]
            )
        return res

    def ids_for_document(self, key: DocKey) -> list[str]:
        res = self.call(
            "query",
            self.client.query,
            self.collection,
            filter=of_document(key),
            output_fields=["index_node_id"],
            consistency_level="Strong",  # completion decisions read this
        )
        return [r["index_node_id"] for r in res]

    def count(self, tenant_id: str, dataset_id: str) -> int:
        res = self.call(
            "count",
            self.client.query,
            self.collection,
            filter=of_dataset(tenant_id, dataset_id),
            output_fields=["count(*)"],
        )
        return int(res[0]["count(*)"]) if res else 0

    def delete(self, index_node_ids: Iterable[str]) -> None:
        ids = list(index_node_ids)
        if ids:
            self.call("delete", self.client.delete, self.collection, ids=ids)

    def delete_document(self, key: DocKey) -> None:
        self.call("delete", self.client.delete, self.collection, filter=of_document(key))

    def delete_dataset(self, tenant_id: str, dataset_id: str) -> None:
        expr = of_dataset(tenant_id, dataset_id)
        self.call("delete", self.client.delete, self.collection, filter=expr)
