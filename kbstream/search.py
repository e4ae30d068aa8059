"""Search over one dataset: vector (Milvus), keyword (Milvus full-text BM25)
and hybrid (weighted fusion of the two rankings, domain/fusion.py). Vectors and
texts live in two collections (one per embedding model, one for all texts), so
hybrid fuses here, not in a Milvus hybrid_search over one collection.

Each mode picks its candidates by its own ranking (cosine, BM25, fused rank)
and reports a relevance on [0, 1] that means the same for every query
(domain/fusion.py: the model's calibrated cosine, the share of the query's
keywords a hit holds); hits are returned best relevance first, the mode's
ranking breaking ties. ``raw_score`` keeps the mode's own score."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from domain.fusion import (
    RRF_K,
    FusionWeights,
    RelevanceScale,
    fuse,
    fusion_weights,
    hybrid_relevance,
    keyword_coverage,
    keyword_evidence,
    keyword_relevance,
    script_coverage,
    vector_relevance,
)
from infra.vectors import MilvusVectorStore
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
    raw_score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class VectorSide:
    """The vector ranking, and what scores other hits against the query."""

    ranking: list[tuple[str, float]]
    store: MilvusVectorStore
    query: Sequence[float]

    def cosines(self, nodes: Sequence[str]) -> dict[str, float]:
        """node -> cosine with the query: from the ranking, else read back."""
        known = dict(self.ranking)
        missing = [n for n in nodes if n not in known]
        if missing:
            q = np.asarray(self.query, dtype=np.float32)
            q /= np.linalg.norm(q) or 1.0
            for node, vector in self.store.vectors(missing).items():
                v = np.asarray(vector, dtype=np.float32)
                known[node] = float(q @ v / (np.linalg.norm(v) or 1.0))
        return known


def vector_side(c: Container, dataset: str, query: str, k: int) -> VectorSide:
    from kbstream.serving import search_index

    # through the dataset's alias, with the model of the collection behind it
    store, provider = search_index(c, dataset)
    vec = provider.embed([query])[0]
    hits = store.search(vec, c.settings.tenant, dataset, k)
    return VectorSide([(h.index_node_id, h.score) for h in hits], store, vec)


def vector_ranking(c: Container, dataset: str, query: str, k: int) -> list[tuple[str, float]]:
    return vector_side(c, dataset, query, k).ranking


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
    return _hybrid(c, dataset, query, k)[0]


def _hybrid(
    c: Container, dataset: str, query: str, k: int
) -> tuple[list[tuple[str, float]], VectorSide | None]:
    weights = hybrid_weights(c, query)
    depth = max(k * 4, 20)
    side = vector_side(c, dataset, query, depth) if weights.vector > 0 else None
    vec = side.ranking if side else []
    kw = keyword_ranking(c, dataset, query, depth) if weights.keyword > 0 else []
    evidence = hybrid_evidence(c, dataset, query, kw)
    return fuse(c.settings.hybrid_fusion, vec, kw, weights, k, evidence), side


def relevance_scale(c: Container) -> RelevanceScale:
    s = c.settings
    return RelevanceScale(s.vector_relevance_floor, s.vector_relevance_full)


def search(
    c: Container, dataset: str, query: str, mode: Mode = "hybrid", top_k: int = 5
) -> list[Hit]:
    """At most top_k hits, best relevance first (see the module's docstring)."""
    side: VectorSide | None = None
    if mode == "vector":
        side = vector_side(c, dataset, query, top_k)
        ranked = side.ranking
    elif mode == "keyword":
        ranked = keyword_ranking(c, dataset, query, top_k)
    else:
        ranked, side = _hybrid(c, dataset, query, top_k)
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
                score=0.0,
                content=row.content,
                position=row.position,
                answer=row.answer,
                parent=row.parent,
                mode=mode,
                raw_score=round(float(score), 6),
            )
        )
    _score(c, query, mode, hits, side)
    # stable: the mode's own ranking breaks ties
    return sorted(hits, key=lambda h: -h.score)


def _score(c: Container, query: str, mode: Mode, hits: list[Hit], side: VectorSide | None) -> None:
    """Each hit's relevance on [0, 1] (domain/fusion.py)."""
    if not hits:
        return
    model_share = script_coverage(query, c.settings.embedding_scripts.split(","))
    vector: dict[str, float] = {}
    if side is not None:
        cosines = side.cosines([h.index_node_id for h in hits])
        scale = relevance_scale(c)
        vector = {n: vector_relevance(cos, model_share, scale) for n, cos in cosines.items()}
    keyword: dict[str, float] = {}
    if mode != "vector":
        terms = c.keywords.query_terms(query)
        keyword = {
            h.index_node_id: keyword_relevance(
                keyword_coverage(terms, h.content if not h.answer else f"{h.content}\n{h.answer}")
            )
            for h in hits
        }
    weights = hybrid_weights(c, query)
    for h in hits:
        v = vector.get(h.index_node_id, 0.0)
        k = keyword.get(h.index_node_id, 0.0)
        if mode == "vector":
            score = v
        elif mode == "keyword":
            score = k
        else:
            score = hybrid_relevance(v, k, weights)
        h.score = round(score, 6)
