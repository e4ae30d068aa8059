"""Milvus full-text (BM25) keyword index: one entity per segment, primary key
index_node_id, so every write is an idempotent upsert; the dataset is the
partition key and every search filters on tenant and dataset.

kbstream cuts a segment's text into terms itself (jieba's search mode, with a
fast path for text without Chinese: infra/keywords.py) and stores them space
separated in a VARCHAR with an analyzer; a BM25 function turns that into a
sparse vector on insert, searched through a SPARSE_INVERTED_INDEX with metric
BM25; a query is cut the same way. Cutting here rather than in Milvus keeps
the analyzer trivial (split at spaces) and the same on milvus-lite, whose
jieba tokenizer is Python jieba on the hot path (3 times slower than this on
the benchmark corpus), and on a Milvus server. One collection serves every
dataset and every embedding model: a model switch never touches it. It lives
beside the vector collections, in the same Milvus, through the vector store's
client (milvus-lite serves one local file from one client per process)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from pymilvus import DataType, Function, FunctionType, MilvusClient
from pymilvus.exceptions import MilvusException

from domain.ports import KeywordRow
from infra.errors import classify_milvus
from infra.milvus import MilvusCollection, ensure_collection, of_dataset
from infra.vectors import MilvusVectorStore

log = logging.getLogger(__name__)

# the text holds terms cut by kbstream: the tokenizer only splits at the spaces.
# "standard" does on milvus-lite (\w+) and on Milvus; "jieba" or "whitespace"
# (Milvus 2.5.11+) also keep each term whole on a Milvus server.
TOKENIZERS = ("standard", "jieba", "whitespace")
MAX_TEXT_BYTES = 65_535  # Milvus's VARCHAR limit


def keyword_collection(tokenizer: str) -> str:
    """Another tokenizer is another collection (rebuild fills it), never a mixed one."""
    return f"kb_keywords_{tokenizer}_v1"


def clip(text: str) -> str:
    """The text cut to what a VARCHAR holds, at a character boundary."""
    data = text.encode()
    if len(data) <= MAX_TEXT_BYTES:
        return text
    return data[:MAX_TEXT_BYTES].decode(errors="ignore")


class MilvusKeywordIndex(MilvusCollection):
    def __init__(
        self,
        vectors: MilvusVectorStore,
        terms: Callable[[str], list[str]],
        tokenizer: str = "standard",
    ) -> None:
        if tokenizer not in TOKENIZERS:
            raise ValueError(f"keyword tokenizer {tokenizer!r}: one of {', '.join(TOKENIZERS)}")
        self._vectors = vectors
        self._terms = terms
        self.tokenizer = tokenizer
        self.collection = keyword_collection(tokenizer)
        self._ready = False

    def terms(self, text: str) -> str:
        """What the index stores (and a query asks for): the text's terms."""
        return " ".join(self._terms(text))

    @property
    def lock(self) -> threading.RLock:
        return self._vectors.lock  # one client, shared with the vector store

    @property
    def client(self) -> MilvusClient:
        client = self._vectors.client
        if not self._ready:
            with self.lock:
                if not self._ready:
                    self._ensure_collection(client)
                    self._ready = True
        return client

    def _ensure_collection(self, c: MilvusClient) -> None:
        try:
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("index_node_id", DataType.VARCHAR, is_primary=True, max_length=64)
            schema.add_field("tenant_id", DataType.VARCHAR, max_length=128)
            schema.add_field("dataset_id", DataType.VARCHAR, max_length=128, is_partition_key=True)
            schema.add_field("document_id", DataType.VARCHAR, max_length=128)
            schema.add_field(
                "text",
                DataType.VARCHAR,
                max_length=MAX_TEXT_BYTES,
                enable_analyzer=True,
                analyzer_params={"tokenizer": self.tokenizer, "filter": ["lowercase"]},
            )
            schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
            schema.add_function(
                Function(
                    name="text_bm25",
                    function_type=FunctionType.BM25,
                    input_field_names=["text"],
                    output_field_names=["sparse"],
                )
            )
            index = c.prepare_index_params()
            index.add_index(
                field_name="sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25"
            )
            ensure_collection(c, self.collection, schema, index)
        except MilvusException as exc:
            raise classify_milvus("create_collection", exc) from exc

    # -- writes ------------------------------------------------------------------

    def upsert(self, rows: Sequence[KeywordRow]) -> int:
        if not rows:
            return 0
        data = [
            {
                "index_node_id": r.index_node_id,
                "tenant_id": r.key.tenant_id,
                "dataset_id": r.key.dataset_id,
                "document_id": r.key.document_id,
                "text": clip(self.terms(r.text)),
            }
            for r in rows
        ]
        res = self.call("upsert", self.client.upsert, self.collection, data)
        return int(res.get("upsert_count", len(rows)))

    # -- reads -------------------------------------------------------------------

    def search(
        self, query: str, tenant_id: str, dataset_id: str, limit: int
    ) -> list[tuple[str, float]]:
        terms = self.terms(query)
        if not terms or limit <= 0:
            return []
        expr = of_dataset(tenant_id, dataset_id)
        res = self.call(
            "search",
            self.client.search,
            self.collection,
            data=[terms],
            anns_field="sparse",
            limit=limit,
            filter=expr,
            output_fields=["index_node_id"],
            search_params={"metric_type": "BM25"},
        )
        hits = [
            (str(h.get("id", h.get("index_node_id"))), abs(float(h["distance"])))
            for h in (res[0] if res else [])
        ]
        # milvus-lite reports BM25 as a negative distance (best most negative),
        # Milvus as a positive score: order by the magnitude, ties by id
        return sorted(hits, key=lambda h: (-h[1], h[0]))

    def ids(self, tenant_id: str, dataset_id: str) -> dict[str, str]:
        """index_node_id -> document_id of every entity of a dataset."""
        expr = of_dataset(tenant_id, dataset_id)
        out: dict[str, str] = {}
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
                return out
            out.update({r["index_node_id"]: r["document_id"] for r in batch})
