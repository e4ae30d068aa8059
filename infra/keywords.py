"""jieba TF-IDF keywords (Chinese and English) for the keyword index."""

from __future__ import annotations

import logging
import re
import threading

import jieba
import jieba.analyse

jieba.setLogLevel(logging.WARNING)

_TOKEN_OK = re.compile(r"[\w\u4e00-\u9fff]", re.UNICODE)
_ENGLISH_STOP = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "but",
        "by",
        "for",
        "from",
        "has",
        "have",
        "if",
        "in",
        "into",
        "is",
        "it",
        "its",
        "of",
        "on",
        "or",
        "so",
        "such",
        "that",
        "the",
        "their",
        "then",
        "there",
        "these",
        "they",
        "this",
        "to",
        "was",
        "were",
        "will",
        "with",
        "not",
        "can",
        "you",
        "your",
        "we",
        "our",
        "which",
        "when",
        "what",
        "how",
        "also",
        "may",
        "use",
        "used",
        "using",
    ]
)


class JiebaKeywordExtractor:
    """Thread-safe wrapper: jieba's default TF-IDF instance is global state."""

    def __init__(self, top_k: int = 50) -> None:
        self.top_k = top_k
        self._lock = threading.Lock()
        self._ready = False

    def _init(self) -> None:
        if not self._ready:
            jieba.initialize()
            self._ready = True

    def extract(self, text: str, top_k: int | None = None) -> list[tuple[str, float]]:
        with self._lock:
            self._init()
            tags = jieba.analyse.extract_tags(
                text.lower(), topK=top_k or self.top_k, withWeight=True
            )
        return [(w[:128], float(s)) for w, s in tags if self._keep(w)]

    def query_terms(self, query: str) -> dict[str, float]:
        """Keywords of a search query, weighted by rarity (idf via TF-IDF)."""
        terms = dict(self.extract(query, top_k=32))
        if not terms:
            with self._lock:
                self._init()
                words = jieba.lcut_for_search(query.lower())
            terms = {w: 1.0 for w in words if self._keep(w)}
        return terms

    @staticmethod
    def _keep(word: str) -> bool:
        w = word.strip()
        return bool(w) and w not in _ENGLISH_STOP and bool(_TOKEN_OK.search(w)) and not w.isdigit()
