"""The vector index registry over the in-memory, SQLite and PostgreSQL units
of work alike: insert-ignore of a second serving record, save, remove."""

from __future__ import annotations

from datetime import UTC, datetime

from domain.ports import UnitOfWorkFactory
from domain.vector_indexes import DatasetIndexes, IndexState, IndexTarget, VectorIndexRecord

NOW = datetime(2026, 12, 1, tzinfo=UTC)
A = IndexTarget("st", "a@1", "/models/a", 4, "kb_a")
B = IndexTarget("st", "b@2", "/models/b", 4, "kb_b")


def test_registry_keeps_one_serving_record_and_switches(uow_factory: UnitOfWorkFactory) -> None:
    with uow_factory() as uow:
        assert uow.vector_indexes.add(VectorIndexRecord("t", "ds", A, IndexState.SERVING))
        # a concurrent first load with another model loses quietly
        assert not uow.vector_indexes.add(VectorIndexRecord("t", "ds", B, IndexState.SERVING))
        assert uow.vector_indexes.add(VectorIndexRecord("t", "other", B, IndexState.SERVING))
        uow.commit()
    with uow_factory() as uow:
        rules = DatasetIndexes("t", "ds", uow.vector_indexes.for_dataset("t", "ds"))
        uow.vector_indexes.save(rules.start_building(B, NOW))
        uow.commit()
    with uow_factory() as uow:
        rules = DatasetIndexes("t", "ds", uow.vector_indexes.for_dataset("t", "ds"))
        for record in rules.switch_to("b@2", NOW, 60):
            uow.vector_indexes.save(record)
        uow.commit()
    with uow_factory(readonly=True) as uow:
        found = uow.vector_indexes.for_datasets([("t", "ds"), ("t", "other")])
    rules = DatasetIndexes("t", "ds", found[("t", "ds")])
    assert rules.serving is not None and rules.serving.target == B
    (retired,) = rules.droppable(NOW.replace(hour=1))
    assert retired.target == A and retired.drop_after is not None
    with uow_factory() as uow:
        uow.vector_indexes.remove(retired)
        uow.commit()
    with uow_factory(readonly=True) as uow:
        assert [r.model for r in uow.vector_indexes.for_dataset("t", "ds")] == ["b@2"]
        assert len(uow.vector_indexes.for_dataset("t", "other")) == 1
