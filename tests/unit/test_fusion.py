"""domain.fusion: script coverage, weighted fusion, unit scores; and
domain.metadata_filter: Dify's metadata_condition over hit metadata."""

from __future__ import annotations

import pytest

from domain.fusion import (
    VECTOR_RELEVANCE,
    FusionWeights,
    RelevanceScale,
    fuse,
    fusion_weights,
    hybrid_relevance,
    keyword_coverage,
    keyword_evidence,
    keyword_relevance,
    script_coverage,
    script_tokens,
    unit_score,
    vector_relevance,
    weighted_rrf,
    weighted_score_fusion,
)
from domain.metadata_filter import UnsupportedCondition, parse_condition

VEC = [("a", 0.9), ("b", 0.8), ("c", 0.7)]
KW = [("c", 3.0), ("d", 2.0), ("a", 1.0)]


def test_script_tokens_count_words_and_ideographs() -> None:
    assert script_tokens("grep 命令") == ["latin", "han", "han"]
    assert script_tokens("two words, 3 digits!") == ["latin", "latin", "latin"]
    assert script_tokens("Привет мир") == ["cyrillic", "cyrillic"]


@pytest.mark.parametrize(
    ("query", "share"),
    [
        ("how do I sort a list", 1.0),
        ("怎样排序", 0.0),
        ("grep 怎么用", 0.25),
        ("12345 ???", 1.0),  # no letters: no evidence against the model
    ],
)
def test_script_coverage(query: str, share: float) -> None:
    assert script_coverage(query, ["latin"]) == pytest.approx(share)


def test_all_covers_every_script() -> None:
    assert script_coverage("怎样排序", ["all"]) == 1.0
    assert script_coverage("怎样排序", ["latin", "han"]) == 1.0


def test_configured_vector_weight_overrides_coverage() -> None:
    # the model reads English: its ranking outweighs word overlap (keyword 0.5)
    assert fusion_weights("how do I sort", ["latin"]) == FusionWeights(1.0, 0.5)
    assert fusion_weights("怎样排序", ["latin"]) == FusionWeights(0.0, 0.5)
    assert fusion_weights("怎样排序", ["latin"], vector_weight=0.5) == FusionWeights(0.5, 0.5)
    assert fusion_weights("sort", ["latin"], keyword_weight=2.0) == FusionWeights(1.0, 2.0)


def test_equal_weight_rrf_scaled_to_one() -> None:
    fused = dict(weighted_rrf(VEC, KW, FusionWeights(1.0, 1.0), 10))
    # a: 1st and 3rd; c: 3rd and 1st -> a tie, broken by id
    assert list(fused)[:2] == ["a", "c"]
    assert fused["a"] == pytest.approx(fused["c"])
    assert all(0.0 < s <= 1.0 for s in fused.values())
    top = weighted_rrf([("x", 1.0)], [("x", 1.0)], FusionWeights(1.0, 1.0), 1)
    assert top == [("x", pytest.approx(1.0))]


def test_zero_vector_weight_keeps_the_keyword_order() -> None:
    fused = weighted_rrf(VEC, KW, FusionWeights(0.0, 1.0), 3)
    assert [n for n, _ in fused] == ["c", "d", "a"]


def test_weighted_rrf_leans_to_the_heavier_side() -> None:
    vector_heavy = weighted_rrf(VEC, KW, FusionWeights(1.0, 0.2), 4)
    keyword_heavy = weighted_rrf(VEC, KW, FusionWeights(0.2, 1.0), 4)
    assert [n for n, _ in vector_heavy] == ["a", "c", "b", "d"]
    assert [n for n, _ in keyword_heavy] == ["c", "a", "d", "b"]


def test_score_fusion_is_a_convex_combination_of_unit_scores() -> None:
    fused = dict(weighted_score_fusion(VEC, KW, FusionWeights(1.0, 1.0), 10))
    assert fused["a"] == pytest.approx((0.9 + unit_score("keyword", 1.0)) / 2)
    assert fused["b"] == pytest.approx(0.8 / 2)
    assert all(0.0 <= s <= 1.0 for s in fused.values())


def test_fuse_dispatches_and_refuses_unknown_methods() -> None:
    w = FusionWeights(1.0, 1.0)
    assert fuse("rrf", VEC, KW, w, 2) == weighted_rrf(VEC, KW, w, 2)
    assert fuse("score", VEC, KW, w, 2) == weighted_score_fusion(VEC, KW, w, 2)
    with pytest.raises(ValueError, match="unknown fusion"):
        fuse("max", VEC, KW, w, 2)  # type: ignore[arg-type]
    assert fuse("rrf", VEC, KW, FusionWeights(0.0, 0.0), 2) == []


def test_keyword_evidence_is_the_squared_weighted_share_of_query_keywords() -> None:
    terms = {"rows": 2.0, "spreadsheet": 1.0, "comma": 1.0}
    assert keyword_evidence(terms, "Reading ROWS from a comma list, spreadsheet") == 1.0
    assert keyword_evidence(terms, "rows and columns") == pytest.approx((2 / 4) ** 2)
    assert keyword_evidence(terms, "nothing here") == 0.0
    assert keyword_evidence({}, "anything") == 1.0  # no keywords: nothing to weigh


def test_keyword_evidence_matches_whole_words_and_chinese_substrings() -> None:
    assert keyword_evidence({"read": 1.0}, "a thread pool") == 0.0
    assert keyword_evidence({"read": 1.0}, "read(size)") == 1.0
    # Chinese has no spaces between words: a keyword is found inside a phrase
    assert keyword_evidence({"磁盘空间": 1.0, "占用": 1.0}, "显示磁盘空间的使用") == 0.25


def test_weak_keyword_evidence_cannot_outvote_the_model() -> None:
    vector = [("right", 0.6), ("other", 0.5)]
    keyword = [("other", 2.0), ("right", 1.0)]  # "other" shares one common word
    weights = FusionWeights(1.0, 1.0)
    # without evidence "other" (2nd + 1st) beats "right" (1st + 2nd) on the id tie-break
    assert weighted_rrf(vector, keyword, weights, 2)[0][0] == "other"
    evidence = {"other": 0.1, "right": 0.9}
    assert [n for n, _ in weighted_rrf(vector, keyword, weights, 2, evidence)] == [
        "right",
        "other",
    ]
    fused = dict(weighted_score_fusion(vector, keyword, weights, 2, evidence))
    assert fused["right"] > fused["other"]


def test_evidence_reorders_the_keyword_side_alone_and_keeps_scores_on_zero_one() -> None:
    fused = weighted_rrf([], KW, FusionWeights(0.0, 1.0), 3, {"c": 0.1, "d": 1.0, "a": 1.0})
    assert [n for n, _ in fused] == ["d", "a", "c"]
    assert all(0.0 < s <= 1.0 for _, s in fused)
    # missing nodes count as full evidence; out-of-range values are clamped
    assert weighted_rrf([], KW, FusionWeights(0.0, 1.0), 3, {"c": 7.0}) == weighted_rrf(
        [], KW, FusionWeights(0.0, 1.0), 3
    )
    assert fuse("rrf", VEC, KW, FusionWeights(1.0, 1.0), 2, {"c": 0.0}) == weighted_rrf(
        VEC, KW, FusionWeights(1.0, 1.0), 2, {"c": 0.0}
    )


def test_unit_scores_lie_on_zero_one() -> None:
    assert unit_score("vector", -0.3) == 0.0
    assert unit_score("vector", 0.42) == 0.42
    assert unit_score("vector", 1.0000001) == 1.0
    assert unit_score("keyword", 0.0) == 0.0
    assert 0.0 < unit_score("keyword", 0.5) < unit_score("keyword", 5.0) < 1.0
    assert unit_score("hybrid", 0.7) == 0.7


META = {
    "title": "kafka.md",
    "document_id": "doc-1",
    "position": 3,
    "status": "completed",
    "uploaded": 1_700_000_000,
}


@pytest.mark.parametrize(
    ("name", "op", "value", "expected"),
    [
        ("title", "is", "kafka.md", True),
        ("title", "is not", "kafka.md", False),
        ("title", "contains", "afk", True),
        ("title", "not contains", "afk", False),
        ("title", "start with", "kaf", True),
        ("title", "end with", ".md", True),
        ("title", "end with", ".txt", False),
        ("missing", "empty", None, True),
        ("title", "not empty", None, True),
        ("position", "=", 3, True),
        ("position", "≠", "3", False),
        ("position", ">", 2, True),
        ("position", "<", 2, False),
        ("position", "≥", 3, True),
        ("position", "<=", 2, False),
        ("title", ">", 2, False),  # not a number: never matches a numeric comparison
        ("title", "in", ["a.md", "kafka.md"], True),
        ("title", "in", "a.md, kafka.md", True),  # Dify's UI: comma-separated
        ("title", "not in", "a.md,kafka.md", False),
        ("position", "in", [3, 4], True),
        ("title", "in", [], False),
        ("missing", "not in", [], True),  # Dify: literal(True)
        ("uploaded", "before", 1_700_000_001, True),
        ("uploaded", "after", 1_700_000_001, False),
        ("uploaded", "after", "2023-11-14T00:00:00+00:00", True),
        # a field a hit lacks is SQL NULL in Dify: no comparison holds for it
        ("missing", "not contains", "x", False),
        ("missing", "is not", "x", False),
        ("missing", "not in", "a,b", False),
        ("missing", "<", 5, False),
        ("missing", "not empty", None, False),
        ("title", "empty", None, False),
    ],
)
def test_each_operator(name: str, op: str, value: object, expected: bool) -> None:
    cond = {"conditions": [{"name": [name], "comparison_operator": op, "value": value}]}
    f = parse_condition(cond)
    assert f is not None
    assert f.matches(META) is expected


def test_logical_operators_and_several_names() -> None:
    a = {"name": ["title"], "comparison_operator": "contains", "value": "kafka"}
    b = {"name": ["status"], "comparison_operator": "is", "value": "error"}
    both = parse_condition({"logical_operator": "and", "conditions": [a, b]})
    either = parse_condition({"logical_operator": "or", "conditions": [a, b]})
    assert both is not None and either is not None
    assert not both.matches(META)
    assert either.matches(META)
    any_name = parse_condition(
        {
            "conditions": [
                {"name": ["status", "title"], "comparison_operator": "is", "value": "kafka.md"}
            ]
        }
    )
    assert any_name is not None and any_name.matches(META)
    assert parse_condition(None) is None


def test_what_dify_sends_as_null() -> None:
    # Dify's model allows nulls and sends them
    assert parse_condition({"logical_operator": None, "conditions": None}) is not None
    nothing = parse_condition({"logical_operator": "and", "conditions": None})
    assert nothing is not None and nothing.matches({})
    a = {"name": "title", "comparison_operator": "contains", "value": "kafka"}
    b = {"name": "status", "comparison_operator": "is", "value": "error"}
    # null logical_operator is Dify's or_ (``and_ if op == "and" else or_``)
    either = parse_condition({"logical_operator": None, "conditions": [a, b]})
    assert either is not None and either.matches(META)
    # a condition without a value is left out, as Dify leaves it out of its SQL
    no_value = {"name": "status", "comparison_operator": "is", "value": None}
    only_a = parse_condition({"logical_operator": "and", "conditions": [a, no_value]})
    assert only_a is not None and only_a.matches(META) and len(only_a.conditions) == 1


@pytest.mark.parametrize(
    "raw",
    [
        {"conditions": [{"name": ["title"], "comparison_operator": "before", "value": "x"}]},
        {"conditions": [{"name": ["title"], "comparison_operator": "like", "value": "x"}]},
        {"conditions": [{"name": "title", "comparison_operator": "is", "value": ["a"]}]},
        {"conditions": [{"name": [], "comparison_operator": "is", "value": "x"}]},
        {"logical_operator": "xor", "conditions": []},
        {"conditions": "title"},
    ],
)
def test_unsupported_conditions_are_refused(raw: dict[str, object]) -> None:
    with pytest.raises(UnsupportedCondition):
        parse_condition(raw)


# -- relevance: the reported score --------------------------------------------------


def test_a_relevance_scale_maps_floor_to_0_and_full_to_1() -> None:
    scale = RelevanceScale(0.2, 0.6)
    assert scale(0.1) == 0.0 and scale(0.2) == 0.0
    assert scale(0.4) == pytest.approx(0.5)
    assert scale(0.6) == 1.0 and scale(0.9) == 1.0
    with pytest.raises(ValueError, match="above floor"):
        RelevanceScale(0.5, 0.5)


def test_the_model_is_trusted_as_far_as_it_reads_the_query() -> None:
    cosine = VECTOR_RELEVANCE.full
    assert vector_relevance(cosine, model_share=1.0) == 1.0
    assert vector_relevance(cosine, model_share=0.5) == 0.5
    assert vector_relevance(cosine, model_share=0.0) == 0.0  # an English model, a Chinese query


def test_hybrid_relevance_lets_the_model_vouch_alone_and_words_only_with_it() -> None:
    english = FusionWeights(vector=1.0, keyword=0.5)
    assert hybrid_relevance(0.8, 0.0, english) == 0.8
    # every query word in a text the model finds unrelated: not relevant
    assert hybrid_relevance(0.0, 1.0, english) == pytest.approx(1 / 3)
    # words lift what the model half believes
    assert hybrid_relevance(0.4, 1.0, english) == pytest.approx(0.6)
    chinese = FusionWeights(vector=0.0, keyword=0.5)  # the model cannot read it
    assert hybrid_relevance(0.9, 0.7, chinese) == pytest.approx(0.7)
    assert hybrid_relevance(0.9, 0.7, FusionWeights(0.0, 0.0)) == 0.0


def test_keyword_coverage_is_the_weighted_share_of_query_keywords() -> None:
    terms = {"rows": 2.0, "spreadsheet": 2.0}
    assert keyword_coverage(terms, "rows and columns") == 0.5
    assert keyword_relevance(keyword_coverage(terms, "rows in a spreadsheet")) == 1.0
    assert keyword_relevance(keyword_coverage(terms, "nothing here")) == 0.0
