"""consumers/pipeline.py is the one place a stage is named: the modules that
decide something per stage (supervisor, observability, deploy/generate.py,
the stack, the CLI, the composition root) read the facts on its entries, so
adding a stage is one table entry plus its module."""

from __future__ import annotations

import ast
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import consumers.pipeline as pipeline
from consumers.pipeline import (
    PIPELINE,
    STAGES,
    Progress,
    Scaling,
    Sizing,
    StageSpec,
    scaled,
    stage_spec,
)
from domain.events import Topic
from kbstream import observability, supervisor
from kbstream.settings import Settings
from tests.unit.test_deploy_manifests import load_generator

ROOT = Path(__file__).resolve().parents[2]
# where the stage facts used to be decided by name; benchmarks and producers too
READERS = ("kbstream", "infra", "benchmarks", "producers", "scripts", "domain")
# a string that happens to equal a stage's name without naming the stage
NOT_A_STAGE = {("infra/extract/markup.py", "embed")}  # the HTML element


def _stage_names_in(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        (n.lineno, n.value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in STAGES
    ]


def test_no_module_outside_the_table_names_a_stage() -> None:
    files = [p for top in READERS for p in (ROOT / top).rglob("*.py")]
    files.append(ROOT / "deploy" / "generate.py")
    named = [
        f"{rel}:{line}: {name!r}"
        for path in files
        for line, name in _stage_names_in(path)
        if (rel := str(path.relative_to(ROOT))) and (rel, name) not in NOT_A_STAGE
    ]
    assert not named, "stage named outside consumers/pipeline.py:\n" + "\n".join(named)


def test_a_stage_module_names_only_itself() -> None:
    for path in (ROOT / "consumers").glob("*.py"):
        if path.name == "pipeline.py":
            continue
        for line, name in _stage_names_in(path):
            assert name == path.stem, f"consumers/{path.name}:{line} names {name!r}"


def test_the_table_keeps_the_facts_it_replaced() -> None:
    """What supervisor, observability, stack, bootstrap and deploy decided by name."""
    assert scaled(Scaling.PROCESSES) == ["parse", "split", "index_keywords"]
    assert scaled(Scaling.ONE_PROCESS) == ["embed", "load_vectors"]
    assert scaled(Scaling.THREAD) == ["track_status"]
    assert [s.name for s in PIPELINE if s.needs_model] == ["embed"]
    assert [s.name for s in PIPELINE if s.lingers] == ["embed"]
    assert [s.name for s in PIPELINE if s.extracts] == ["parse"]
    assert [s.name for s in PIPELINE if s.ready_needs_milvus] == [
        "load_vectors",
        "index_keywords",
        "track_status",
    ]
    assert [s.name for s in PIPELINE if s.exports_document_gauges] == ["track_status"]
    assert [s.name for s in PIPELINE if s.progress is None] == ["parse"]
    assert stage_spec("embed").sizing == Sizing("2", "1536Mi", "4", "3Gi", 20)


def test_supervisor_text_comes_from_the_table() -> None:
    assert supervisor.AUTO_RULE == (
        "auto: parse, split and index_keywords get max(1, min(partitions, cpus // 4)) "
        "processes each; embed and load_vectors one process each; track_status stays a thread"
    )


SUMMARIZE = StageSpec(
    "summarize",
    "A stage that does not exist: one table entry, nothing else.",
    (Topic.SEGMENTS,),
    (Topic.PROGRESS,),
    lambda d: pytest.fail("not built in this test"),
    scaling=Scaling.PROCESSES,
    sizing=Sizing("750m", "640Mi", "2", "2Gi", 35),
    progress=Progress.KEYWORDS_INDEXED,
    ready_needs_milvus=True,
)


@pytest.fixture
def extended(monkeypatch: pytest.MonkeyPatch) -> tuple[StageSpec, ...]:
    """The table with one more stage, seen by every module that reads it."""
    table = (*PIPELINE, SUMMARIZE)
    names = tuple(s.name for s in table)
    monkeypatch.setattr(pipeline, "PIPELINE", table)
    monkeypatch.setattr(pipeline, "STAGES", names)
    monkeypatch.setattr(supervisor, "PIPELINE", table)
    monkeypatch.setattr(observability, "PIPELINE", table)
    monkeypatch.setattr(observability, "STAGES", names)
    return table


def test_an_extra_entry_is_scaled_by_up_workers_auto(extended: Any) -> None:
    counts = supervisor.auto_workers([*STAGES, "summarize"], cpus=16, partitions=12)
    assert counts["summarize"] == counts["parse"] == 4
    assert supervisor.parse_workers("summarize=3", [*STAGES, "summarize"]) == {"summarize": 3}


class _CountingDb:
    """Answers every count with 7 and remembers how many it was asked."""

    def __init__(self) -> None:
        self.asked = 0

    @contextlib.contextmanager
    def connect(self) -> Iterator[_CountingDb]:
        yield self

    def execute(self, _query: Any) -> _CountingDb:
        self.asked += 1
        return self

    def scalar(self) -> int:
        return 7


def test_an_extra_entry_is_observed(extended: Any) -> None:
    db = _CountingDb()
    progress = observability.segment_progress(db)  # type: ignore[arg-type]
    assert list(progress) == [*(s for s in STAGES if s != "parse"), "summarize"]
    assert progress["summarize"] == 7 and db.asked == len(progress)
    groups = observability.stage_groups(Settings(topic_prefix="kb."))
    assert groups["summarize"] == ("kb.summarize", ["kb.segments"])


def test_an_extra_entry_is_deployed(extended: Any) -> None:
    generator = load_generator()
    generator.PIPELINE = extended
    files = {str(p.relative_to(ROOT)): text for p, text in generator.rendered().items()}
    deployment, scaled_object = yaml.safe_load_all(files["deploy/k8s/summarize.yaml"])
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["kbstream", "worker", "summarize"]
    assert container["resources"]["requests"] == {"cpu": "750m", "memory": "640Mi"}
    assert container["resources"]["limits"] == {"cpu": "2", "memory": "2Gi"}
    (trigger,) = scaled_object["spec"]["triggers"]
    assert trigger["metadata"]["lagThreshold"] == "35"
    assert "summarize.yaml" in yaml.safe_load(files["deploy/k8s/kustomization.yaml"])["resources"]
