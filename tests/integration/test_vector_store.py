"""MilvusVectorStore against a real milvus-lite file: idempotent upserts,
tenant/dataset isolation, deletes, listing and reopening from disk."""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np
import pytest

from domain.documents import DocKey
from domain.errors import PermanentError, TransientError
from infra.milvus import grpc_options
from infra.vectors import MilvusVectorStore, VectorRow, collection_name

pytestmark = pytest.mark.integration

DIM = 8
COLLECTION = collection_name("test", "m", DIM)


def unit(seed: int) -> list[float]:
    v = np.random.default_rng(seed).standard_normal(DIM).astype("float32")
    return (v / np.linalg.norm(v)).tolist()


def rows(
    n: int, tenant: str = "t1", dataset: str = "ds1", doc: str = "doc-1", start: int = 0
) -> list[VectorRow]:
    return [
        VectorRow(f"{tenant}-{dataset}-{doc}-{i}", unit(i), DocKey(tenant, dataset, doc))
        for i in range(start, start + n)
    ]


@pytest.fixture
def store(milvus_uri: str) -> Iterator[MilvusVectorStore]:
    s = MilvusVectorStore(milvus_uri, COLLECTION, DIM)
    yield s
    s.close()


def test_collection_name_slugging() -> None:
    assert re.fullmatch(r"kb_test_m_8_[0-9a-f]{8}", COLLECTION), COLLECTION
    assert collection_name("test", "m", DIM) == COLLECTION, "must be deterministic"
    assert collection_name("sentence-transformers", "BAAI/bge-small-zh-v1.5", 512).startswith(
        "kb_bge_small_zh_v1_5_512_"
    )
    assert collection_name("openai", "text-embedding-3-small", 1536).startswith(
        "kb_openai_text_embedding_3_small_1536_"
    )
    assert collection_name("sentence-transformers", "org/Model.Name/", 384).startswith(
        "kb_model_name_384_"
    )
    # a dimension change is a different collection, never a mixed one
    assert collection_name("openai", "m", 256) != collection_name("openai", "m", 1024)
    names = [
        COLLECTION,
        collection_name("sentence-transformers", "x" * 1000, 4096),
        collection_name("ollama", "nomic-embed-text:latest", 768),
        collection_name("local", "中文模型", 768),
        collection_name("local", "///", 768),
    ]
    for name in names:
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name), name
        assert len(name) <= 255


def test_collection_name_distinguishes_different_models() -> None:
    st = "sentence-transformers"
    assert collection_name(st, "BAAI/bge-small-en-v1.5", 384) != collection_name(
        st, "my-org/bge-small-en-v1.5", 384
    )
    assert collection_name("local", "中文模型", 768) != collection_name("local", "日本語", 768)
    assert collection_name("a", "b_c", 8) != collection_name("a_b", "c", 8)
    assert collection_name("openai", "m", 8) != collection_name("azure", "m", 8)


def test_upsert_is_idempotent(store: MilvusVectorStore) -> None:
    batch = rows(5)
    assert store.upsert(batch) == 5
    assert store.count("t1", "ds1") == 5
    assert store.upsert(batch) == 5
    assert store.count("t1", "ds1") == 5
    assert store.ids("t1", "ds1") == {r.index_node_id: "doc-1" for r in batch}
    assert store.upsert([]) == 0


def test_upsert_replaces_the_vector_of_an_existing_id(store: MilvusVectorStore) -> None:
    store.upsert(rows(4))
    target = rows(4)[0]
    moved = VectorRow(target.index_node_id, unit(999), DocKey("t1", "ds1", "doc-9"))
    store.upsert([moved])
    assert store.count("t1", "ds1") == 4
    top = store.search(unit(999), "t1", "ds1", limit=1)[0]
    assert (top.index_node_id, top.document_id) == (target.index_node_id, "doc-9")
    assert top.score == pytest.approx(1.0, abs=1e-4)
    assert store.ids("t1", "ds1")[target.index_node_id] == "doc-9"


def test_search_filters_by_tenant_and_dataset(store: MilvusVectorStore) -> None:
    query = unit(7)
    mine = rows(3, "t1", "ds1")
    # the best possible matches all live elsewhere: same dataset id under another
    # tenant, another dataset of the same tenant, another tenant altogether
    decoys = [
        VectorRow(f"decoy-{t}-{d}-{i}", query, DocKey(t, d, "doc-x"))
        for t, d in [("t2", "ds1"), ("t1", "ds2"), ("t2", "ds2")]
        for i in range(3)
    ]
    store.upsert(mine + decoys)

    hits = store.search(query, "t1", "ds1", limit=50)
    assert sorted(h.index_node_id for h in hits) == sorted(r.index_node_id for r in mine)
    assert all(h.document_id == "doc-1" for h in hits)
    assert hits == sorted(hits, key=lambda h: -h.score)

    other = store.search(query, "t2", "ds1", limit=50)
    assert {h.index_node_id for h in other} == {
        "decoy-t2-ds1-0",
        "decoy-t2-ds1-1",
        "decoy-t2-ds1-2",
    }
    assert all(h.score == pytest.approx(1.0, abs=1e-4) for h in other)
    assert store.search(query, "t3", "ds1", limit=50) == []
    assert len(store.search(query, "t1", "ds1", limit=2)) == 2


def test_filter_values_cannot_escape_their_quotes(store: MilvusVectorStore) -> None:
    store.upsert(rows(3, "t1", "ds1") + rows(3, "t2", "ds2"))
    for evil in ['x" or dataset_id != "', 'x\\" or tenant_id != \\"', "ds1' or '1'=='1"]:
        assert store.search(unit(1), "t1", evil, limit=10) == []
        assert store.ids(evil, "ds1") == {}
        assert store.count("t1", evil) == 0
        store.delete_document(DocKey(evil, "ds1", "doc-1"))
    assert store.count("t1", "ds1") == 3 and store.count("t2", "ds2") == 3
    # and values with quotes work as plain values
    odd = VectorRow("odd-1", unit(5), DocKey('ten"ant', "data\\set", "d'oc"))
    store.upsert([odd])
    assert store.ids('ten"ant', "data\\set") == {"odd-1": "d'oc"}
    store.delete_document(DocKey('ten"ant', "data\\set", "d'oc"))
    assert store.count('ten"ant', "data\\set") == 0


def test_delete_by_ids(store: MilvusVectorStore) -> None:
    batch = rows(5)
    store.upsert(batch + rows(2, dataset="ds2"))
    gone = [batch[1].index_node_id, batch[3].index_node_id]
    store.delete([*gone, "never-existed"])
    store.delete([])
    assert store.count("t1", "ds1") == 3
    assert store.count("t1", "ds2") == 2
    assert store.existing([r.index_node_id for r in batch]) == {
        batch[0].index_node_id,
        batch[2].index_node_id,
        batch[4].index_node_id,
    }
    hit_ids = {h.index_node_id for h in store.search(unit(1), "t1", "ds1", limit=10)}
    assert hit_ids.isdisjoint(gone) and len(hit_ids) == 3
    store.delete(gone)  # deleting again is a no-op
    assert store.count("t1", "ds1") == 3


def test_delete_document_removes_only_that_document(store: MilvusVectorStore) -> None:
    target = rows(4, "t1", "ds1", "doc-1")
    keep = (
        rows(3, "t1", "ds1", "doc-2")  # same dataset, other document
        + rows(2, "t1", "ds2", "doc-1")  # same document id, other dataset
        + rows(2, "t2", "ds1", "doc-1")  # same dataset and document id, other tenant
    )
    store.upsert(target + keep)
    store.delete_document(DocKey("t1", "ds1", "doc-1"))
    assert store.existing([r.index_node_id for r in target]) == set()
    assert store.existing([r.index_node_id for r in keep]) == {r.index_node_id for r in keep}
    assert store.ids("t1", "ds1") == {r.index_node_id: "doc-2" for r in keep[:3]}
    assert store.count("t1", "ds2") == 2 and store.count("t2", "ds1") == 2
    store.delete_document(DocKey("t1", "ds1", "doc-1"))  # idempotent
    assert store.count("t1", "ds1") == 3


def test_ids_lists_every_vector_of_a_dataset_past_one_page(store: MilvusVectorStore) -> None:
    docs = [f"doc-{d}" for d in range(5)]
    mine = [r for d in docs for r in rows(500, "t1", "ds1", d)]  # 2500: several pages of 1000
    store.upsert(mine)
    store.upsert(rows(10, "t1", "ds2") + rows(10, "t2", "ds1"))
    listed = store.ids("t1", "ds1")
    assert listed == {r.index_node_id: r.key.document_id for r in mine}
    assert store.count("t1", "ds1") == 2500
    assert store.ids("t1", "nothing-here") == {}


def test_existing(store: MilvusVectorStore) -> None:
    batch = rows(3)
    store.upsert(batch)
    ids = [r.index_node_id for r in batch]
    assert store.existing(ids) == set(ids)
    assert store.existing([ids[0], "nope", "also-nope"]) == {ids[0]}
    assert store.existing([]) == set()
    assert store.existing(["nope"]) == set()


def test_reopened_store_finds_and_searches_the_data(milvus_uri: str) -> None:
    first = MilvusVectorStore(milvus_uri, COLLECTION, DIM)
    batch = rows(6)
    first.upsert(batch + rows(2, dataset="ds2"))
    first.close()
    first.close()  # closing twice is harmless

    again = MilvusVectorStore(milvus_uri, COLLECTION, DIM)
    try:
        # searching needs the collection loaded: the store must do that itself
        top = again.search(unit(2), "t1", "ds1", limit=3)
        assert top[0].index_node_id == batch[2].index_node_id
        assert top[0].score == pytest.approx(1.0, abs=1e-4)
        assert again.count("t1", "ds1") == 6
        assert again.ids("t1", "ds1") == {r.index_node_id: "doc-1" for r in batch}
        again.upsert(rows(2, start=6))
        assert again.count("t1", "ds1") == 8
    finally:
        again.close()


def test_collections_of_different_models_do_not_mix(milvus_uri: str) -> None:
    a = MilvusVectorStore(milvus_uri, collection_name("test", "a", DIM), DIM)
    b = MilvusVectorStore(milvus_uri, collection_name("test", "b", 4), 4)
    try:
        a.upsert(rows(3))
        b.upsert([VectorRow("b-1", [1.0, 0.0, 0.0, 0.0], DocKey("t1", "ds1", "doc-1"))])
        assert a.count("t1", "ds1") == 3
        assert b.ids("t1", "ds1") == {"b-1": "doc-1"}
    finally:
        a.close()
        b.close()


def test_wrong_dimension_is_a_permanent_error(store: MilvusVectorStore) -> None:
    """Retrying cannot fix a malformed request, so the runner must not retry it forever."""
    store.upsert(rows(1))
    with pytest.raises(PermanentError) as info:
        store.upsert([VectorRow("short", [0.1, 0.2, 0.3], DocKey("t1", "ds1", "doc-1"))])
    assert not isinstance(info.value, TransientError)
    with pytest.raises(PermanentError):
        store.search([0.1, 0.2], "t1", "ds1", limit=3)
    assert store.count("t1", "ds1") == 1, "the store still works afterwards"


def test_ids_for_document(store: MilvusVectorStore) -> None:
    target = rows(40, "t1", "ds1", "doc-1")
    store.upsert(
        target
        + rows(5, "t1", "ds1", "doc-2")
        + rows(5, "t1", "ds2", "doc-1")
        + rows(5, "t2", "ds1", "doc-1")
    )
    got = store.ids_for_document(DocKey("t1", "ds1", "doc-1"))
    assert sorted(got) == sorted(r.index_node_id for r in target)
    assert store.ids_for_document(DocKey("t1", "ds1", "doc-404")) == []


def test_store_recovers_when_its_collection_was_released(store: MilvusVectorStore) -> None:
    store.upsert(rows(3))
    store.client.release_collection(store.collection)  # an operator, or another worker
    last: Exception | None = None
    for _ in range(3):  # what the runner does with a TransientError: try again
        try:
            assert len(store.search(unit(0), "t1", "ds1", limit=5)) == 3
            return
        except TransientError as exc:
            last = exc
    raise AssertionError(f"still failing after 3 retries: {last}")


def test_ids_for_documents_in_one_call(store: MilvusVectorStore) -> None:
    store.upsert(
        rows(3, "t1", "ds1", "doc-1")
        + rows(2, "t1", "ds1", "doc-2")
        + rows(40, "t1", "ds1", "many")  # more documents than one query chunk below
        + rows(2, "t1", "ds2", "doc-1")
    )
    keys = [DocKey("t1", "ds1", f"doc-{i}") for i in range(1, 40)] + [
        DocKey("t1", "ds2", "doc-1"),
        DocKey("t1", "ds1", "many"),
    ]
    got = store.ids_for_documents(keys)
    for key in keys:
        assert got[key] == set(store.ids_for_document(key))
    assert len(got[DocKey("t1", "ds1", "doc-1")]) == 3
    assert len(got[DocKey("t1", "ds2", "doc-1")]) == 2
    assert got[DocKey("t1", "ds1", "doc-7")] == set()


def test_ids_for_documents_past_the_query_cap(
    store: MilvusVectorStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk of documents whose answer reaches the query window is asked
    again in halves, so no id is lost (the cap lowered to 4 rows here)."""
    import infra.milvus

    monkeypatch.setattr(infra.milvus, "QUERY_CAP", 4)
    store.upsert(rows(3, "t1", "ds1", "a") + rows(2, "t1", "ds1", "b") + rows(6, "t1", "ds1", "c"))
    keys = [DocKey("t1", "ds1", d) for d in ("a", "b", "c", "d")]
    got = store.ids_for_documents(keys)
    assert {k.document_id: len(v) for k, v in got.items()} == {"a": 3, "b": 2, "c": 6, "d": 0}
    for key in keys:
        assert got[key] == set(store.ids_for_document(key))


@pytest.mark.parametrize(
    ("uri", "loopback"),
    [
        ("/tmp/kb/milvus.db", True),  # milvus-lite in this process
        ("http://127.0.0.1:19530", True),  # `kbstream up`'s milvus-lite
        ("http://localhost:19530", True),
        ("https://milvus.example.com:443", False),
        ("http://10.0.0.7:19530", False),
    ],
)
def test_keepalive_the_milvus_lite_server_accepts(uri: str, loopback: bool) -> None:
    """Issue 20 item 11: pymilvus pings every 10 s, idle or not; milvus-lite's grpcio
    server allows no ping on an idle connection and one per 5 minutes during calls,
    and answers more with GOAWAY too_many_pings, which gRPC core prints on stderr."""
    options = grpc_options(uri)
    if not loopback:
        assert options == {}  # a remote Milvus keeps pymilvus's keepalive
        return
    assert options["grpc.keepalive_time_ms"] >= 300_000  # the server's minimum interval
    assert options["grpc.keepalive_permit_without_calls"] == 0


def test_the_store_opens_its_channel_with_those_options(store: MilvusVectorStore) -> None:
    store.ids("t", "d")  # opens the client
    handler = store.client._handler  # type: ignore[attr-defined]
    assert handler._grpc_options == grpc_options(store.uri)
