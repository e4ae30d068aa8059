"""publish_and_wait hands its embedded workers the run's settings (the broker's
journal, the folders they may read) without changing the caller's container."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from consumers.contract import Emit
from domain.events import DocumentCreated, Topic
from kbstream import publishing
from kbstream.bootstrap import Container
from kbstream.settings import Settings


@pytest.mark.parametrize("embedded", [True, False])
def test_the_run_gets_its_settings_and_the_container_keeps_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, embedded: bool
) -> None:
    container = Container(Settings(home=tmp_path, brokers=None, database_url=None, milvus_uri=None))
    original = container.settings
    journal, docs = tmp_path / "journal", tmp_path / "docs"
    seen: dict[str, Any] = {}

    @contextlib.contextmanager
    def broker_for(settings: Settings) -> Iterator[SimpleNamespace]:
        yield SimpleNamespace(bootstrap="127.0.0.1:1", embedded=embedded, journal=journal)

    class Pool:
        def __init__(self, run: Container, bootstrap: str, exclusive: bool = False) -> None:
            seen["pool"] = run
            seen["during"] = container.settings

        def start(self) -> Pool:
            return self

        def stop(self) -> None:
            seen["stopped"] = True

    def publish(run: Container, *args: Any) -> None:
        seen["publish"] = run

    def wait(run: Container, *args: Any) -> None:
        seen["wait"] = run
        seen["during"] = container.settings

    monkeypatch.setattr(publishing, "broker_for", broker_for)
    monkeypatch.setattr(publishing, "WorkerPool", Pool)
    monkeypatch.setattr(publishing, "_publish", publish)
    monkeypatch.setattr(publishing, "_wait", wait)
    event = DocumentCreated(dataset_id="d", document_id="a", version=1, source="a", uri="file:///x")

    publishing.publish_and_wait(container, [Emit(Topic.LIFECYCLE, event)], read_roots=[docs])

    assert container.settings is original and seen["during"] is original
    run = seen["publish"]
    assert run is seen["wait"] and run is not container
    assert run.settings.broker_journal == journal
    assert run.keywords is container.keywords  # the adapters are shared
    roots = run.settings.allowed_roots.split(os.pathsep)
    if embedded:  # the workers started here read the folders named
        assert seen["pool"] is run and seen["stopped"]
        assert str(docs.resolve()) in roots
    else:  # workers elsewhere read only their own roots
        assert "pool" not in seen and run.settings.allowed_roots == original.allowed_roots
