"""The container is built once and never changed (issue 21 item 4): a run with
other settings gets a scoped container that shares the adapters."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from kbstream.bootstrap import RUN_SCOPED, Container
from kbstream.settings import Settings


@pytest.fixture
def container(tmp_path: Path) -> Container:
    return Container(Settings(home=tmp_path, brokers=None, database_url=None, milvus_uri=None))


def test_settings_are_frozen(container: Container) -> None:
    with pytest.raises(pydantic.ValidationError):
        container.settings.allowed_roots = "/elsewhere"  # type: ignore[misc]


def test_a_container_keeps_its_settings(container: Container, tmp_path: Path) -> None:
    with pytest.raises(AttributeError):
        container.settings = Settings(home=tmp_path / "other")  # type: ignore[misc]


def test_a_scoped_container_shares_the_adapters(container: Container, tmp_path: Path) -> None:
    journal, before = tmp_path / "journal", container.settings
    run = container.scoped(broker_journal=journal, allowed_roots=str(tmp_path))
    assert (run.settings.broker_journal, run.settings.allowed_roots) == (journal, str(tmp_path))
    assert container.settings is before and before.broker_journal is None
    assert run.topics is container.topics
    # built through the scoped one: built, held and closed by its parent
    providers = run.other_providers
    assert container.__dict__["other_providers"] is providers
    assert "other_providers" not in run.__dict__
    assert run.keywords is container.keywords


def test_a_scoped_container_leaves_closing_to_its_parent(container: Container) -> None:
    class Closable:
        closed = False

        def close(self) -> None:
            self.closed = True

    provider = Closable()
    run = container.scoped(allowed_roots="/srv")
    run.other_providers[("x", "y")] = provider  # type: ignore[assignment]
    run.close()
    assert not provider.closed
    container.close()
    assert provider.closed


@pytest.mark.parametrize("setting", ["tenant", "embedding_model", "milvus_uri", "topic_prefix"])
def test_settings_that_shape_adapters_need_a_new_container(
    container: Container, setting: str
) -> None:
    assert setting not in RUN_SCOPED
    with pytest.raises(ValueError, match=setting):
        container.scoped(**{setting: "other"})
