"""Search over one dataset: vector (Milvus), keyword (Milvus full-text BM25)
and hybrid (weighted fusion of the two rankings, domain/fusion.py). Vectors and
texts live in two collections (one per embedding model, one for all texts), so
hybrid fuses here, not in a Milvus hybrid_search over one collection."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from domain.fusion import RRF_K, FusionWeights, fuse, fusion_weights, keyword_evidence
from kbstream.bootstrap import Container

Mode = Literal["vector", "keyword", "hybrid"]
__all__ = ["RRF_K", "Hit", "Mode", "hybrid_evidence", "hybrid_ranking", "rrf", "search"]


@dataclass
class Hit:
    document: str
    document_id: str
    index_node_id: str
    score: float
    content: str
    position: int
    answer: str | None = None
    parent: str | None = None
    mode: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def vector_ranking(c: Container, dataset: str, query: str, k: int) -> list[tuple[str, float]]:
    from kbstream.serving import search_index

    # through the dataset's alias, with the model of the collection behind it
    store, provider = search_index(c, dataset)
    vec = provider.embed([query])[0]
    hits = store.search(vec, c.settings.tenant, dataset, k)
    return [(h.index_node_id, h.score) for h in hits]


def keyword_ranking(c: Container, dataset: str, query: str, k: int) -> list[tuple[str, float]]:
    return c.keyword_index.search(query, c.settings.tenant, dataset, k)


def rrf(rankings: list[list[tuple[str, float]]], k: int) -> list[tuple[str, float]]:
    """Equal-weight reciprocal rank fusion (raw scores), kept for callers that
    fuse more than two rankings; search() uses hybrid_ranking."""
    scores: dict[str, float] = {}
    for ranking in rankings:
        for rank, (node, _) in enumerate(ranking, start=1):
            scores[node] = scores.get(node, 0.0) + 1.0 / (RRF_K + rank)
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:k]


def hybrid_weights(c: Container, query: str) -> FusionWeights:
    """The configured weights; the vector side's defaults to how much of the
    query is in scripts the model covers (KBSTREAM_EMBEDDING_SCRIPTS)."""
    s = c.settings
    return fusion_weights(
        query,
        s.embedding_scripts.split(","),
        s.hybrid_vector_weight,
        s.hybrid_keyword_weight,
    )


def hybrid_evidence(
    c: Container, dataset: str, query: str, keyword: list[tuple[str, float]]
) -> dict[str, float] | None:
    """Each keyword hit's evidence (domain/fusion.keyword_evidence): how much of
    the query's keywords its text holds; None when switched off."""
    if not keyword or not c.settings.hybrid_keyword_evidence:
        return None
    terms = c.keywords.query_terms(query)
    with c.uow(readonly=True) as uow:
        rows = uow.segments.in_dataset(c.settings.tenant, dataset, [n for n, _ in keyword])
    return {n: keyword_evidence(terms, row.content) for n, row in rows.items()}


def hybrid_ranking(c: Container, dataset: str, query: str, k: int) -> list[tuple[str, float]]:
    """Weighted fusion (KBSTREAM_HYBRID_FUSION) of both rankings, scores on [0, 1],
    each keyword hit's vote scaled by its evidence. A side with weight 0 is not
    queried at all."""
    weights = hybrid_weights(c, query)
    depth = max(k * 4, 20)
    vec = vector_ranking(c, dataset, query, depth) if weights.vector > 0 else []
    kw = keyword_ranking(c, dataset, query, depth) if weights.keyword > 0 else []
    evidence = hybrid_evidence(c, dataset, query, kw)
    return fuse(c.settings.hybrid_fusion, vec, kw, weights, k, evidence)


def search(
    c: Container, dataset: str, query: str, mode: Mode = "hybrid", top_k: int = 5
) -> list[Hit]:
    if mode == "vector":
        ranked = vector_ranking(c, dataset, query, top_k)
    elif mode == "keyword":
        ranked = keyword_ranking(c, dataset, query, top_k)
    else:
        ranked = hybrid_ranking(c, dataset, query, top_k)
    with c.uow(readonly=True) as uow:
        # the indexes filter on the tenant and dataset fields their writers set;
        # the rows are the authority, so an entity carrying another dataset's
        # id (a forged write) never returns that dataset's text
        rows = uow.segments.in_dataset(c.settings.tenant, dataset, [n for n, _ in ranked])
    hits = []
    for node, score in ranked:
        # a missing row: an entity whose segment is gone (verify --repair
        # cleans these) or not this dataset's
        row = rows.get(node)
        if row is None:
            continue
        hits.append(
            Hit(
                document=row.source,
                document_id=row.document_id,
                index_node_id=node,
                score=round(float(score), 6),
                content=row.content,
                position=row.position,
                answer=row.answer,
                parent=row.parent,
                mode=mode,
            )
        )
    return hits
