"""Search over one dataset: vector (Milvus), keyword (jieba postings) and
hybrid (reciprocal rank fusion of the two rankings)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from kbstream.bootstrap import Container

Mode = Literal["vector", "keyword", "hybrid"]
RRF_K = 60  # the constant from Cormack et al.; damps the weight of top ranks


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
    vec = c.provider.embed([query])[0]
    hits = c.vectors.search(vec, c.settings.tenant, dataset, k)
    return [(h.index_node_id, h.score) for h in hits]


def keyword_ranking(c: Container, dataset: str, query: str, k: int) -> list[tuple[str, float]]:
    terms = c.keywords.query_terms(query)
    with c.uow(readonly=True) as uow:
        return uow.postings.search(c.settings.tenant, dataset, terms, k)


def rrf(rankings: list[list[tuple[str, float]]], k: int) -> list[tuple[str, float]]:
    scores: dict[str, float] = {}
    for ranking in rankings:
        for rank, (node, _) in enumerate(ranking, start=1):
            scores[node] = scores.get(node, 0.0) + 1.0 / (RRF_K + rank)
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:k]


def search(
    c: Container, dataset: str, query: str, mode: Mode = "hybrid", top_k: int = 5
) -> list[Hit]:
    if mode == "vector":
        ranked = vector_ranking(c, dataset, query, top_k)
    elif mode == "keyword":
        ranked = keyword_ranking(c, dataset, query, top_k)
    else:
        depth = max(top_k * 4, 20)
        ranked = rrf(
            [vector_ranking(c, dataset, query, depth), keyword_ranking(c, dataset, query, depth)],
            top_k,
        )
    with c.uow(readonly=True) as uow:
        rows = uow.segments.by_ids([n for n, _ in ranked])
    hits = []
    for node, score in ranked:
        # both rankings are filtered by tenant and dataset, and index_node_ids
        # embed the dataset: a missing row is a vector whose segment is gone
        # (verify --repair cleans these)
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
