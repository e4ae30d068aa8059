"""Keyword postings: (tenant, dataset, keyword, index_node_id, weight), one row
per posting, so a change touches only its own segments' rows."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sqlalchemy import Float, case, cast, delete, func, literal, select
from sqlalchemy.engine import Connection

from domain.documents import DocKey
from infra.db.database import Database, chunks, of_document, table
from infra.db.models import KeywordPostingRow, SegmentRow

K = table(KeywordPostingRow)
S = table(SegmentRow)


class KeywordPostings:
    def __init__(self, database: Database, conn: Connection) -> None:
        self.db = database
        self.conn = conn

    def replace(
        self, key_postings: Mapping[tuple[DocKey, str], Sequence[tuple[str, float]]]
    ) -> None:
        """(document, index_node_id) -> keywords: replace those nodes' postings."""
        rows = [
            {
                "tenant_id": key.tenant_id,
                "dataset_id": key.dataset_id,
                "document_id": key.document_id,
                "index_node_id": node,
                "keyword": kw,
                "weight": float(w),
            }
            for (key, node), keywords in sorted(
                key_postings.items(), key=lambda kv: (kv[0][1], str(kv[0][0]))
            )
            for kw, w in keywords
        ]
        self.delete_nodes([node for _, node in key_postings])
        for chunk in chunks(rows):
            self.conn.execute(self.db.insert_ignore(K), list(chunk))

    def delete_nodes(self, index_node_ids: Sequence[str]) -> int:
        n = 0
        for chunk in chunks(sorted(set(index_node_ids))):
            n += self.conn.execute(delete(K).where(K.c.index_node_id.in_(chunk))).rowcount
        return n

    def delete_document_orphans(self, key: DocKey) -> int:
        """Postings of a document whose segment no longer exists."""
        alive = select(S.c.index_node_id).where(of_document(S, key))
        return int(
            self.conn.execute(
                delete(K).where(of_document(K, key), K.c.index_node_id.notin_(alive))
            ).rowcount
        )

    def nodes_for_document(self, key: DocKey) -> set[str]:
        query = select(K.c.index_node_id).where(of_document(K, key)).distinct()
        return set(self.conn.execute(query).scalars())

    def nodes(self, tenant_id: str, dataset_id: str) -> dict[str, str]:
        """index_node_id -> document_id of every node with postings."""
        rows = self.conn.execute(
            select(K.c.index_node_id, K.c.document_id)
            .where(K.c.tenant_id == tenant_id, K.c.dataset_id == dataset_id)
            .distinct()
        )
        return {r[0]: r[1] for r in rows}

    def search(
        self, tenant_id: str, dataset_id: str, keywords: Mapping[str, float], limit: int
    ) -> list[tuple[str, float]]:
        """Nodes ranked by the sum of posting weight x query weight over the
        query's keywords, best first (ties by id); aggregated in the database."""
        if not keywords or limit <= 0:
            return []
        query_weight = case(
            {kw: literal(float(w), Float) for kw, w in keywords.items()}, value=K.c.keyword
        )
        score = func.sum(K.c.weight * cast(query_weight, Float)).label("score")
        rows = self.conn.execute(
            select(K.c.index_node_id, score)
            .where(
                K.c.tenant_id == tenant_id,
                K.c.dataset_id == dataset_id,
                K.c.keyword.in_(sorted(keywords)),
            )
            .group_by(K.c.index_node_id)
            .order_by(score.desc(), K.c.index_node_id)
            .limit(limit)
        )
        return [(r[0], float(r[1])) for r in rows]

    def count(self, tenant_id: str, dataset_id: str) -> int:
        return self.db.count(
            K, K.c.tenant_id == tenant_id, K.c.dataset_id == dataset_id, conn=self.conn
        )
