"""jieba for the keyword index: the terms of a text (what Milvus's BM25 index
stores and a keyword query asks for) and TF-IDF keywords of a query (the
hybrid evidence, domain/fusion.py).

Text without Chinese characters takes a fast path that gives exactly what jieba
gives, 8 times sooner on the Python documentation: jieba runs its dictionary DAG
and HMM over every run of Latin letters only to cut it at the regular expression
below (its ``finalseg.re_skip``) in the end. Same words, IDF table, stop words,
weights and order; tests/unit/test_keywords.py holds the two paths equal."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator
from operator import itemgetter

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

# jieba 0.42: what jieba.cut hands its DAG (re_han_default), the Han characters in
# it, and how its HMM cuts a run without them (finalseg.re_skip).
_HAN = re.compile("[\u4e00-\u9fd5]")
_BLOCK = re.compile(r"[\u4e00-\u9fd5a-zA-Z0-9+#&\._%\-]+")
_WORD = re.compile(r"([a-zA-Z0-9]+(?:\.\d+)?%?)")
_BLOCK_SPLIT = re.compile(f"({_BLOCK.pattern})")


class JiebaKeywordExtractor:
    """Thread-safe wrapper: jieba's default TF-IDF instance is global state."""

    def __init__(self, top_k: int = 50) -> None:
        self.top_k = top_k
        self._lock = threading.Lock()
        self._ready = False
        self._tfidf = jieba.analyse.default_tfidf
        # the few dictionary words jieba's DAG finds in ASCII text ("c++", "c#"):
        # text holding one takes jieba's own path
        self._dictionary_ascii: tuple[str, ...] = ()

    def _init(self) -> None:
        if not self._ready:
            jieba.initialize()
            self._dictionary_ascii = tuple(
                sorted(
                    w
                    for w, f in jieba.dt.FREQ.items()
                    if f and len(w) > 1 and w.isascii() and w == w.lower()
                )
            )
            self._ready = True

    def extract(self, text: str, top_k: int | None = None) -> list[tuple[str, float]]:
        text = text.lower()
        k = top_k or self.top_k
        with self._lock:
            self._init()
            if self._plain(text):
                tags = self._extract_plain(text, k)
            else:
                tags = jieba.analyse.extract_tags(text, topK=k, withWeight=True)
        return [(w[:128], float(s)) for w, s in tags if self._keep(w)]

    def terms(self, text: str) -> list[str]:
        """Every word of a text, in order, lower-cased, English stop words and
        punctuation left out: jieba's search-mode cut (words and the dictionary
        words inside them), which on text without Chinese is the _WORD split."""
        text = text.lower()
        with self._lock:
            self._init()
            if self._plain(text):
                words: Iterator[str] = _plain_cut(text)
            else:
                words = jieba.cut_for_search(text)
            return [w for w in (w.strip() for w in words) if _is_term(w)]

    def query_terms(self, query: str) -> dict[str, float]:
        """Keywords of a search query, weighted by rarity (idf via TF-IDF)."""
        terms = dict(self.extract(query, top_k=32))
        if not terms:
            with self._lock:
                self._init()
                words = jieba.lcut_for_search(query.lower())
            terms = {w: 1.0 for w in words if self._keep(w)}
        return terms

    def _plain(self, text: str) -> bool:
        """No Han character and no ASCII dictionary word: jieba would only cut it
        at _WORD. (Other scripts are single characters to jieba: never keywords.)"""
        return not _HAN.search(text) and not any(w in text for w in self._dictionary_ascii)

    def _extract_plain(self, text: str, top_k: int) -> list[tuple[str, float]]:
        """jieba's TFIDF.extract_tags, step for step, over _plain_words."""
        stop = self._tfidf.stop_words
        freq: dict[str, float] = {}
        for w in _plain_words(text):
            if len(w.strip()) < 2 or w.lower() in stop:
                continue
            freq[w] = freq.get(w, 0.0) + 1.0
        total = sum(freq.values())
        idf, median = self._tfidf.idf_freq, self._tfidf.median_idf
        for w in freq:
            freq[w] *= idf.get(w, median) / total
        return sorted(freq.items(), key=itemgetter(1), reverse=True)[:top_k]

    @staticmethod
    def _keep(word: str) -> bool:
        w = word.strip()
        return bool(w) and w not in _ENGLISH_STOP and bool(_TOKEN_OK.search(w)) and not w.isdigit()


def _is_term(word: str) -> bool:
    return bool(word) and word not in _ENGLISH_STOP and bool(_TOKEN_OK.search(word))


def _plain_cut(text: str) -> Iterator[str]:
    """jieba.cut (and cut_for_search) of a text _plain accepts: each _BLOCK cut
    at _WORD, every character between blocks on its own."""
    for i, part in enumerate(_BLOCK_SPLIT.split(text)):
        if i % 2:  # a block (the split's captured group)
            yield from (p for p in _WORD.split(part) if p)
        else:
            yield from part


def _plain_words(text: str) -> Iterator[str]:
    """jieba.cut's words of a text _plain accepts, but for the single characters
    outside _BLOCK, which are never keywords."""
    for block in _BLOCK.findall(text):
        if len(block) == 1:
            yield block
            continue
        for part in _WORD.split(block):
            if part:
                yield part
