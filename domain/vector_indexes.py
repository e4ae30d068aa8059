"""A dataset's vector indexes: which embedding model's collection serves its
searches, which one is being built beside it, and which ones are retired and
wait to be dropped. Pure rules; the registry table stores the records.

A model switch is blue/green: the new model's index is ``building`` while the
old one keeps ``serving``; when the build is complete and verified, the
dataset's alias moves to it, it becomes ``serving`` and the old one
``retired`` until ``drop_after``."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum


class IndexState(StrEnum):
    BUILDING = "building"
    SERVING = "serving"
    RETIRED = "retired"


# a retired index may be built again (switching back to a previous model)
NEXT_STATES: dict[IndexState, frozenset[IndexState]] = {
    IndexState.BUILDING: frozenset({IndexState.SERVING, IndexState.RETIRED}),
    IndexState.SERVING: frozenset({IndexState.RETIRED}),
    IndexState.RETIRED: frozenset({IndexState.BUILDING}),
}


class IndexRuleError(ValueError):
    """A change the rules do not allow (a second build, a bad transition)."""


@dataclass(frozen=True)
class IndexTarget:
    """One embedding model's vector collection: what an index is built with."""

    provider: str
    model: str  # identity: name@fingerprint12
    model_spec: str  # what KBSTREAM_EMBEDDING_MODEL said: a folder or a name
    dim: int
    collection: str


@dataclass(frozen=True)
class VectorIndexRecord:
    tenant_id: str
    dataset_id: str
    target: IndexTarget
    state: IndexState
    progress_done: int = 0
    progress_total: int = 0
    created_at: datetime | None = None
    switched_at: datetime | None = None
    drop_after: datetime | None = None

    @property
    def model(self) -> str:
        return self.target.model

    def move_to(self, state: IndexState, **changes: object) -> VectorIndexRecord:
        if state is not self.state and state not in NEXT_STATES[self.state]:
            raise IndexRuleError(
                f"vector index of {self.model} for {self.dataset_id} cannot go "
                f"from {self.state} to {state}"
            )
        return replace(self, state=state, **changes)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, object]:
        t = self.target
        return {
            "model": t.model,
            "model_spec": t.model_spec,
            "provider": t.provider,
            "dim": t.dim,
            "collection": t.collection,
            "state": self.state.value,
            "progress_done": self.progress_done,
            "progress_total": self.progress_total,
            "created_at": self.created_at,
            "switched_at": self.switched_at,
            "drop_after": self.drop_after,
        }


@dataclass
class DatasetIndexes:
    """Every vector index record of one dataset, and the rules over them: at
    most one serving and one building; a worker loads vectors for the dataset
    only with the serving or the building model."""

    tenant_id: str
    dataset_id: str
    records: list[VectorIndexRecord]

    def __post_init__(self) -> None:
        for state in (IndexState.SERVING, IndexState.BUILDING):
            if sum(r.state is state for r in self.records) > 1:
                raise IndexRuleError(f"dataset {self.dataset_id} has two {state} vector indexes")

    def _one(self, state: IndexState) -> VectorIndexRecord | None:
        return next((r for r in self.records if r.state is state), None)

    @property
    def serving(self) -> VectorIndexRecord | None:
        return self._one(IndexState.SERVING)

    @property
    def building(self) -> VectorIndexRecord | None:
        return self._one(IndexState.BUILDING)

    def of_model(self, model: str) -> VectorIndexRecord | None:
        return next((r for r in self.records if r.model == model), None)

    @property
    def registered(self) -> bool:
        return bool(self.records)

    def may_load(self, model: str) -> bool:
        """May a worker embedding with ``model`` write this dataset's vectors?
        Yes into an unregistered dataset (it registers it), or with the serving
        or the building model; never into a collection nobody searches."""
        if self.serving is None and self.building is None:
            return True
        return any(r is not None and r.model == model for r in (self.serving, self.building))

    def first_serving(self, target: IndexTarget, now: datetime) -> VectorIndexRecord:
        """The record a first load registers: this model serves the dataset."""
        return VectorIndexRecord(
            self.tenant_id,
            self.dataset_id,
            target,
            IndexState.SERVING,
            created_at=now,
            switched_at=now,
        )

    def start_building(self, target: IndexTarget, now: datetime) -> VectorIndexRecord:
        """The record a rebuild with ``target`` works on: the serving one when
        the model is the same (rebuild in place), else a building one (a retired
        record of that model comes back)."""
        serving = self.serving
        if serving is not None and serving.model == target.model:
            return replace(serving, target=target, progress_done=0, progress_total=0)
        building = self.building
        if building is not None and building.model != target.model:
            raise IndexRuleError(
                f"dataset {self.dataset_id} is already building a vector index with "
                f"{building.model}; finish that rebuild (run it again) first"
            )
        if building is not None:
            return replace(building, target=target)  # resume
        old = self.of_model(target.model)
        if old is not None:
            return old.move_to(
                IndexState.BUILDING,
                target=target,
                drop_after=None,
                progress_done=0,
                progress_total=0,
            )
        return VectorIndexRecord(
            self.tenant_id, self.dataset_id, target, IndexState.BUILDING, created_at=now
        )

    def switch_to(self, model: str, now: datetime, grace_seconds: float) -> list[VectorIndexRecord]:
        """``model``'s index serves from now on; the one serving before retires
        until now + grace. Returns the records that changed, in the order to save them."""
        new = self.of_model(model)
        if new is None:
            raise IndexRuleError(f"dataset {self.dataset_id} has no vector index of {model}")
        if new.state is IndexState.SERVING:
            return []
        # the old one retires first: one serving record at any moment (a unique index)
        changed = []
        old = self.serving
        if old is not None:
            drop_after = now + timedelta(seconds=grace_seconds)
            changed.append(old.move_to(IndexState.RETIRED, switched_at=now, drop_after=drop_after))
        changed.append(new.move_to(IndexState.SERVING, switched_at=now, drop_after=None))
        return changed

    def droppable(self, now: datetime, force: bool = False) -> list[VectorIndexRecord]:
        """Retired indexes whose grace period is over (all of them with ``force``)."""
        return [
            r
            for r in self.records
            if r.state is IndexState.RETIRED
            and (force or r.drop_after is None or _aware(r.drop_after) <= _aware(now))
        ]


def _aware(t: datetime) -> datetime:
    # SQLite returns naive datetimes for timezone-aware columns; they are UTC
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)
