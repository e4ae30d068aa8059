"""BM25 statistics of a whole dataset in milvus-lite.

milvus-lite (3.x, Python) scores BM25 with each storage segment's own
statistics: a text upserted after the rest sits alone in the memtable and its
rare word gets an idf of ln(4/3) instead of ~4, so the sentence a user just
edited ranks below old text that shares a common word. Its source says so
(``Collection._search_sparse``: "TODO: BM25 IDF accuracy ... aggregate global
statistics ... at search time"). A Milvus server merges every segment's
statistics in its query node (the "idf oracle"), so it needs nothing here.

``install()`` makes milvus-lite's BM25 search do what that TODO says, the way
Elasticsearch's DFS_QUERY_THEN_FETCH does: a first pass over the same sources
with the same masks (deleted and superseded rows out, the search filter
applied) sums the document count, the total length and each query term's
document frequency; the second pass scores every source with those sums. The
filter of every kbstream search names one tenant and dataset, so the
statistics are the dataset's, whenever its texts arrived and whatever else
the collection holds. Nothing is stored: no schema change, no index-time
cost; a search costs about twice milvus-lite's (benchmarks/README.md).

kbstream installs it where it runs milvus-lite: in-process for a local file
(infra/milvus.py connect) and in `kbstream up`'s milvus-lite server, started
as ``python -m infra.milvus_lite_bm25 server ...``.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_state = threading.local()
_installed = False
_install_lock = threading.Lock()


@dataclass
class Statistics:
    """What BM25 needs from every source of one search."""

    documents: int = 0
    length: float = 0.0
    df: dict[int, int] = field(default_factory=dict)

    def add(self, index: Any, queries: Sequence[dict[int, float]], mask: Any) -> None:
        lengths = index._doc_lengths
        if mask is None:
            # an index built with its mask (milvus-lite's memtable) holds
            # only valid rows; the lengths of the others are 0
            self.documents += int(index.doc_count)
            self.length += float(lengths.sum())
        else:
            self.documents += int(np.count_nonzero(mask))
            self.length += float(lengths[mask].sum())
        terms = {t for q in queries for t in q}
        for term in terms:
            posting = index._posting_lists.get(term)
            if not posting:
                continue
            n = len(posting) if mask is None else sum(1 for lid, _ in posting if mask[lid])
            self.df[term] = self.df.get(term, 0) + n


def score(
    index: Any, queries: Sequence[dict[int, float]], top_k: int, mask: Any, stats: Statistics
) -> tuple[Any, Any]:
    """SparseInvertedIndex.search with the statistics of every source."""
    from milvus_lite.index.sparse_common import empty_results, validate_mask

    mask = validate_mask(mask, len(index._doc_lengths))
    ids, dists = empty_results(len(queries), top_k)
    n = stats.documents
    if n == 0:
        return ids, dists
    k1, b = index.k1, index.b
    avgdl = stats.length / n if stats.length > 0 else 1.0
    lengths = index._doc_lengths
    for qi, query in enumerate(queries):
        scores: dict[int, float] = {}
        for term, weight in query.items():
            posting = index._posting_lists.get(term)
            df = stats.df.get(term, 0)
            if not posting or df == 0:
                continue
            idf = math.log((n - df + 0.5) / (df + 0.5) + 1.0)
            for lid, tf in posting:
                if mask is not None and not mask[lid]:
                    continue
                norm = tf * (k1 + 1.0) / (tf + k1 * (1.0 - b + b * lengths[lid] / avgdl))
                scores[lid] = scores.get(lid, 0.0) + idf * norm * weight
        best = sorted(scores.items(), key=lambda kv: kv[1], reverse=True)[:top_k]
        for j, (lid, s) in enumerate(best):
            ids[qi, j] = lid
            dists[qi, j] = -s  # milvus-lite's convention: smaller is better
    return ids, dists


def install() -> bool:
    """Patch milvus-lite's BM25 search (idempotent); False where this
    milvus-lite has not the functions it replaces (then a WARNING)."""
    global _installed
    with _install_lock:
        if _installed:
            return True
        try:
            from milvus_lite.engine.collection import Collection
            from milvus_lite.index import sparse_factory
            from milvus_lite.index.sparse_inverted import SparseInvertedIndex
        except ImportError:
            return False
        search_sparse = getattr(Collection, "_search_sparse", None)
        dispatch = getattr(sparse_factory, "_search_prepared_sparse_index", None)
        if search_sparse is None or dispatch is None:
            log.warning(
                "milvus-lite without _search_sparse: BM25 keeps per-segment statistics "
                "(late text ranks low); pin milvus-lite 3.0"
            )
            return False
        sparse_factory._search_prepared_sparse_index = _dispatch(dispatch, SparseInvertedIndex)
        Collection._search_sparse = _two_pass(search_sparse)
        _installed = True
        return True


def _dispatch(original: Callable[..., Any], bm25: type) -> Callable[..., Any]:
    def dispatch(index: Any, queries: Any, top_k: int, valid_mask: Any = None) -> Any:
        mode = getattr(_state, "mode", None)
        if mode is None or not isinstance(index, bm25):
            return original(index, queries, top_k, valid_mask=valid_mask)
        if mode == "collect":
            from milvus_lite.index.sparse_common import empty_results

            _state.stats.add(index, queries, valid_mask)
            return empty_results(len(queries), top_k)
        return score(index, queries, top_k, valid_mask, _state.stats)

    return dispatch


def _two_pass(original: Callable[..., Any]) -> Callable[..., Any]:
    def search_sparse(
        self: Any,
        query_vectors: Any,
        vector_field: str,
        top_k: int,
        metric_type: str,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        if metric_type != "BM25" or getattr(_state, "mode", None) is not None:
            return original(self, query_vectors, vector_field, top_k, metric_type, *args, **kwargs)
        _state.stats = Statistics()
        try:
            _state.mode = "collect"
            original(self, query_vectors, vector_field, top_k, metric_type, *args, **kwargs)
            _state.mode = "score"
            return original(self, query_vectors, vector_field, top_k, metric_type, *args, **kwargs)
        finally:
            _state.mode = None
            _state.stats = None

    return search_sparse


def main(argv: list[str] | None = None) -> int:
    """milvus-lite's command line (``server --data-dir ...``) with the patch."""
    from milvus_lite.cmdline import main as milvus_lite_main

    install()
    return int(milvus_lite_main(argv) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
