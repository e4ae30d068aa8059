"""The rules over a dataset's vector indexes (domain/vector_indexes.py),
without a database: states, one serving and one building, who may load."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from domain.vector_indexes import (
    DatasetIndexes,
    IndexRuleError,
    IndexState,
    IndexTarget,
    VectorIndexRecord,
)

NOW = datetime(2026, 12, 1, tzinfo=UTC)
A = IndexTarget("st", "a@1", "/models/a", 4, "kb_a")
B = IndexTarget("st", "b@2", "/models/b", 4, "kb_b")


def rec(target: IndexTarget, state: IndexState, **kw: object) -> VectorIndexRecord:
    return VectorIndexRecord("t", "ds", target, state, **kw)  # type: ignore[arg-type]


def indexes(*records: VectorIndexRecord) -> DatasetIndexes:
    return DatasetIndexes("t", "ds", list(records))


def test_an_unregistered_dataset_may_be_loaded_by_any_model() -> None:
    rules = indexes()
    assert rules.may_load("a@1") and rules.may_load("b@2")
    first = rules.first_serving(A, NOW)
    assert first.state is IndexState.SERVING and first.model == "a@1"


def test_only_the_serving_or_the_building_model_may_load() -> None:
    rules = indexes(rec(A, IndexState.SERVING))
    assert rules.may_load("a@1") and not rules.may_load("b@2")
    rules = indexes(rec(A, IndexState.SERVING), rec(B, IndexState.BUILDING))
    assert rules.may_load("a@1") and rules.may_load("b@2") and not rules.may_load("c@3")
    assert not indexes(rec(A, IndexState.RETIRED), rec(B, IndexState.SERVING)).may_load("a@1")


def test_two_serving_or_two_building_are_refused() -> None:
    with pytest.raises(IndexRuleError):
        indexes(rec(A, IndexState.SERVING), rec(B, IndexState.SERVING))
    with pytest.raises(IndexRuleError):
        indexes(rec(A, IndexState.BUILDING), rec(B, IndexState.BUILDING))


def test_transitions() -> None:
    building = rec(A, IndexState.BUILDING)
    assert building.move_to(IndexState.SERVING).state is IndexState.SERVING
    serving = rec(A, IndexState.SERVING)
    with pytest.raises(IndexRuleError):
        serving.move_to(IndexState.BUILDING)
    retired = rec(A, IndexState.RETIRED)
    with pytest.raises(IndexRuleError):
        retired.move_to(IndexState.SERVING)
    assert retired.move_to(IndexState.BUILDING).state is IndexState.BUILDING


def test_rebuilding_with_the_serving_model_works_in_place() -> None:
    serving = rec(A, IndexState.SERVING, progress_done=5)
    target = indexes(serving).start_building(A, NOW)
    assert target.state is IndexState.SERVING and target.progress_done == 0
    assert indexes(serving).switch_to("a@1", NOW, 60) == []


def test_a_model_switch_builds_then_serves_and_retires_the_old_one() -> None:
    rules = indexes(rec(A, IndexState.SERVING))
    building = rules.start_building(B, NOW)
    assert building.state is IndexState.BUILDING
    rules = indexes(rec(A, IndexState.SERVING), building)
    with pytest.raises(IndexRuleError, match="already building"):
        rules.start_building(IndexTarget("st", "c@3", "/c", 4, "kb_c"), NOW)
    changed = {r.model: r for r in rules.switch_to("b@2", NOW, 3600)}
    assert changed["b@2"].state is IndexState.SERVING and changed["b@2"].switched_at == NOW
    assert changed["a@1"].state is IndexState.RETIRED
    assert changed["a@1"].drop_after == NOW + timedelta(hours=1)


def test_switching_back_reuses_the_retired_record() -> None:
    retired = rec(A, IndexState.RETIRED, drop_after=NOW)
    rules = indexes(retired, rec(B, IndexState.SERVING))
    back = rules.start_building(A, NOW)
    assert back.state is IndexState.BUILDING and back.drop_after is None


def test_retired_indexes_are_droppable_after_their_grace_period() -> None:
    later = rec(A, IndexState.RETIRED, drop_after=NOW + timedelta(hours=1))
    rules = indexes(later, rec(B, IndexState.SERVING))
    assert rules.droppable(NOW) == []
    assert rules.droppable(NOW, force=True) == [later]
    naive = NOW.replace(tzinfo=None) + timedelta(hours=2)  # SQLite hands back naive UTC
    assert rules.droppable(naive) == [later]
