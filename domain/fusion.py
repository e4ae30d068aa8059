"""Fusing a vector ranking with a keyword ranking, and putting scores on the
[0, 1] scale retrieval clients (Dify) expect. Pure: no infra imports.

Equal-weight reciprocal rank fusion lets an embedding model that does not
know a query's script drag down what the keyword side had right (the bundled
all-MiniLM-L6-v2 is English-only: on Chinese queries its ranking is noise).
So the vector side's weight defaults to the share of the query's tokens that
are in scripts the model covers: 1 for an English query, 0 for a Chinese one,
in between for a mixed one.

Lexical overlap with part of a question is common by chance ("file", "read",
"list" occur on most pages), overlap with all of it is not. So each keyword
hit's vote can be scaled by its evidence: the square of the share of the
query's keywords (weighted by idf) that the hit contains (keyword_evidence).
Off by default since the keyword side is BM25, whose idf and length
normalization already discount partial overlap. And where
the model reads the query, its ranking outweighs the keyword side (default
keyword weight 0.5): a good model's semantics are a stronger relevance signal
than word overlap in the languages it was trained on. Both choices were made
on one half of the English benchmark questions and checked on the other half
and on the Chinese set (benchmarks/README.md).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

Ranking = Sequence[tuple[str, float]]
FusionMethod = Literal["rrf", "score"]
RRF_K = 60  # the constant from Cormack et al.; damps the weight of top ranks
EVIDENCE_POWER = 2  # a hit with half the query's keywords votes a quarter

# scripts whose characters are one token each (no spaces between words)
_SYLLABIC = ("han", "hiragana", "katakana", "hangul")


def char_script(ch: str) -> str | None:
    """The script of a letter, lower case ("latin", "han", "cyrillic", ...);
    None for digits, punctuation, spaces and symbols (no script evidence)."""
    if not unicodedata.category(ch).startswith("L"):
        return None
    name = unicodedata.name(ch, "")
    if not name:
        return None
    if name.startswith(("CJK ", "KANGXI")):
        return "han"
    return name.split(" ", 1)[0].lower()


def script_tokens(text: str) -> list[str]:
    """One script label per token: a run of letters of an alphabetic script is
    one token (a word), every Han, kana or Hangul character is one."""
    out: list[str] = []
    previous: str | None = None
    for ch in text:
        script = char_script(ch)
        if script is None:
            previous = None
            continue
        if script in _SYLLABIC or script != previous:
            out.append(script)
        previous = script
    return out


def script_coverage(text: str, covered: Iterable[str]) -> float:
    """Share of ``text``'s tokens in ``covered`` scripts ("all" covers every
    script); 1.0 for text without letters (nothing says the model is lost)."""
    scripts = {s.strip().lower() for s in covered if s.strip()}
    if "all" in scripts:
        return 1.0
    tokens = script_tokens(text)
    if not tokens:
        return 1.0
    return sum(1 for t in tokens if t in scripts) / len(tokens)


def _contains(text: str, term: str) -> bool:
    """``term`` in lower-cased ``text``: a whole word for an ASCII term ("read"
    is not in "thread"), a substring otherwise (Chinese has no word breaks)."""
    term = term.lower()
    if not term.isascii():
        return term in text
    return re.search(rf"(?<![0-9a-z_]){re.escape(term)}(?![0-9a-z_])", text) is not None


def keyword_coverage(terms: Mapping[str, float], text: str) -> float:
    """The share of the query's keywords (weighted, e.g. by idf) found in
    ``text``; 1.0 when the query has no keywords (nothing to weigh against)."""
    total = sum(w for w in terms.values() if w > 0)
    if total <= 0:
        return 1.0
    lowered = text.lower()
    found = sum(w for t, w in terms.items() if w > 0 and _contains(lowered, t))
    return float(found / total)


def keyword_evidence(terms: Mapping[str, float], text: str) -> float:
    """How much of a query a keyword hit holds: keyword_coverage to
    EVIDENCE_POWER."""
    return float(keyword_coverage(terms, text) ** EVIDENCE_POWER)


@dataclass(frozen=True)
class FusionWeights:
    vector: float
    keyword: float


def fusion_weights(
    query: str,
    model_scripts: Iterable[str],
    vector_weight: float | None = None,
    keyword_weight: float = 0.5,
) -> FusionWeights:
    """The configured vector weight, or (None) the query's script coverage."""
    if vector_weight is None:
        vector_weight = script_coverage(query, model_scripts)
    return FusionWeights(max(0.0, vector_weight), max(0.0, keyword_weight))


def weighted_rrf(
    vector: Ranking,
    keyword: Ranking,
    weights: FusionWeights,
    k: int,
    evidence: Mapping[str, float] | None = None,
) -> list[tuple[str, float]]:
    """Weighted reciprocal rank fusion, scaled to [0, 1]: 1.0 is a node ranked
    first by every side with a positive weight (and full keyword evidence).
    ``evidence`` scales each keyword hit's vote (missing = 1). Ties by id."""
    total = weights.vector + weights.keyword
    if total <= 0:
        return []
    scores: dict[str, float] = {}
    for rank, (node, _) in enumerate(vector, start=1):
        scores[node] = scores.get(node, 0.0) + weights.vector / (RRF_K + rank)
    for rank, (node, _) in enumerate(keyword, start=1):
        vote = weights.keyword * _evidence(evidence, node)
        scores[node] = scores.get(node, 0.0) + vote / (RRF_K + rank)
    best = total / (RRF_K + 1)
    fused = [(node, s / best) for node, s in scores.items()]
    return sorted(fused, key=lambda kv: (-kv[1], kv[0]))[:k]


def _evidence(evidence: Mapping[str, float] | None, node: str) -> float:
    if evidence is None:
        return 1.0
    return min(1.0, max(0.0, evidence.get(node, 1.0)))


def weighted_score_fusion(
    vector: Ranking,
    keyword: Ranking,
    weights: FusionWeights,
    k: int,
    evidence: Mapping[str, float] | None = None,
) -> list[tuple[str, float]]:
    """Convex combination of unit scores (cosine clamped, keyword saturated and
    scaled by ``evidence``): a node missing from one side scores 0 there."""
    total = weights.vector + weights.keyword
    if total <= 0:
        return []
    scores: dict[str, float] = {}
    for ranking, weight, mode in (
        (vector, weights.vector, "vector"),
        (keyword, weights.keyword, "keyword"),
    ):
        for node, raw in ranking:
            unit = unit_score(mode, raw)
            if mode == "keyword":
                unit *= _evidence(evidence, node)
            scores[node] = scores.get(node, 0.0) + weight * unit / total
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:k]


def fuse(
    method: FusionMethod,
    vector: Ranking,
    keyword: Ranking,
    weights: FusionWeights,
    k: int,
    evidence: Mapping[str, float] | None = None,
) -> list[tuple[str, float]]:
    if method == "rrf":
        return weighted_rrf(vector, keyword, weights, k, evidence)
    if method == "score":
        return weighted_score_fusion(vector, keyword, weights, k, evidence)
    raise ValueError(f"unknown fusion method {method!r}: rrf or score")


# A keyword score is BM25 (Milvus full-text search, made positive by the
# adapter): a sum of idf x saturated term frequency over the query's terms,
# unbounded. 1 - exp(-s / KEYWORD_SCALE) maps it onto [0, 1) monotonically;
# KEYWORD_SCALE is about a typical one-term match (a rare word scores 2 to 5).
KEYWORD_SCALE = 4.0


def unit_score(mode: str, score: float) -> float:
    """A search score on [0, 1]: vector = cosine similarity clamped at 0
    (negative cosine means unrelated); keyword = 1 - exp(-score); hybrid is
    already on [0, 1] (see weighted_rrf and weighted_score_fusion)."""
    if mode == "vector":
        return min(1.0, max(0.0, score))
    if mode == "keyword":
        return 1.0 - math.exp(-max(0.0, score) / KEYWORD_SCALE)
    return min(1.0, max(0.0, score))


# -- relevance: the score a search reports ------------------------------------------
#
# Ranking and reporting are separate. A fused rank (or a BM25 sum, which grows
# with the query's length) says which hit is better, not whether any is good:
# the old hybrid score was 0.667, 0.656, ... for every query, "chocolate cake"
# against the Python docs included. The reported score is a relevance on
# [0, 1] from two signals that mean the same thing for every query:
#
# - the model's: cosine similarity, mapped linearly from a floor (unrelated
#   text) to a full mark, times the share of the query in scripts the model
#   reads (an English model's cosine for a Chinese query is noise);
# - the words': the share of the query's keywords (idf-weighted) the hit holds,
#   mapped the same way.
#
# Hybrid reports the model's relevance, or the fusion-weighted mean of both
# where the words lift it: the model vouches for a hit alone, word overlap
# only together with the model (or alone where the model cannot read the
# query, whose weight is then 0). 0.5 is the boundary the floors and full
# marks were set for, on the benchmark's on- and off-topic questions
# (benchmarks/README.md): at threshold 0.5 no on-topic answer was lost in
# hybrid and 100% / 95% of off-topic English / Chinese questions got nothing.


@dataclass(frozen=True)
class RelevanceScale:
    """A signal mapped linearly onto [0, 1]: ``floor`` and below is 0 (what
    unrelated text scores), ``full`` and above is 1; halfway is 0.5."""

    floor: float
    full: float

    def __post_init__(self) -> None:
        if not self.full > self.floor:
            raise ValueError(
                f"relevance scale: full ({self.full}) must be above floor ({self.floor})"
            )

    def __call__(self, signal: float) -> float:
        return min(1.0, max(0.0, (signal - self.floor) / (self.full - self.floor)))


# all-MiniLM-L6-v2: on-topic answers had cosine 0.39-0.69, off-topic questions'
# best hits 0.11-0.35 (KBSTREAM_VECTOR_RELEVANCE sets it for another model)
VECTOR_RELEVANCE = RelevanceScale(0.15, 0.6)
# on-topic answers held 25-100% of the query's weighted keywords, off-topic
# questions' best hits 0-50% (a common word or two): words alone rarely decide
KEYWORD_RELEVANCE = RelevanceScale(0.2, 0.5)


def vector_relevance(
    cosine: float, model_share: float, scale: RelevanceScale = VECTOR_RELEVANCE
) -> float:
    """The model's relevance: ``scale(cosine)`` times the share of the query
    the model reads (script_coverage)."""
    return scale(cosine) * min(1.0, max(0.0, model_share))


def keyword_relevance(coverage: float, scale: RelevanceScale = KEYWORD_RELEVANCE) -> float:
    """The words' relevance: ``scale`` of keyword_coverage."""
    return scale(coverage)


def hybrid_relevance(vector: float, keyword: float, weights: FusionWeights) -> float:
    """The model's relevance, or the weighted mean of both where higher."""
    total = weights.vector + weights.keyword
    if total <= 0:
        return 0.0
    mean = (weights.vector * vector + weights.keyword * keyword) / total
    return max(vector if weights.vector > 0 else 0.0, mean)
