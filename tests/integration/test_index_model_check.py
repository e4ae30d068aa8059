"""Issue 20 item 11: a one-shot `kbstream index` whose KBSTREAM_EMBEDDING_MODEL
neither serves the dataset nor is being built for it used to retry "restart this
worker with ..." until killed (the CLI is that worker). It now refuses before
uploading or publishing anything, in one line naming the serving model and
`kbstream rebuild --dataset NAME --model ...`. Real SQLite; no broker is started."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from domain.vector_indexes import IndexState, IndexTarget, VectorIndexRecord
from kbstream.bootstrap import Container
from kbstream.cli import app
from kbstream.indexing import ModelMismatch, check_model
from kbstream.settings import Settings

OTHER = IndexTarget("sentence-transformers", "other@0123456789ab", "/models/other", 384, "kb_o")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key in [k for k in os.environ if k.startswith("KBSTREAM_")]:
        monkeypatch.delenv(key)
    home = tmp_path / "home"
    monkeypatch.setenv("KBSTREAM_HOME", str(home))
    return home


def register(home: Path, target: IndexTarget, state: IndexState = IndexState.SERVING) -> None:
    container = Container(Settings(home=home))
    try:
        with container.uow() as uow:
            uow.vector_indexes.save(VectorIndexRecord("default", "kb", target, state))
            uow.commit()
    finally:
        container.close()


def test_a_one_shot_index_with_another_model_is_refused_before_publishing(home: Path) -> None:
    register(home, OTHER)
    doc = home.parent / "a.txt"
    doc.write_text("The harbour tide comes forty minutes later each day.")
    result = CliRunner().invoke(app, ["index", str(doc), "--dataset", "kb", "--home", str(home)])
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())  # rich wraps long lines
    assert "served by embedding model /models/other" in said
    assert "KBSTREAM_EMBEDDING_MODEL=/models/other" in said
    assert "kbstream rebuild --dataset kb --model" in said
    # nothing uploaded, published or started
    container = Container(Settings(home=home))
    try:
        with container.database.engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM payloads")).scalar() == 0
            assert conn.execute(text("SELECT count(*) FROM documents")).scalar() == 0
    finally:
        container.close()
    assert not (home / "broker.log").exists()


def test_the_serving_or_building_model_passes(home: Path) -> None:
    container = Container(Settings(home=home))
    try:
        provider, model, dim = container.model_identity
        mine = IndexTarget(provider, model, container.model_spec, dim, "kb_mine")
        check_model(container, "kb")  # an unregistered dataset: the first load registers it
        register(home, OTHER)
        with pytest.raises(ModelMismatch):
            check_model(container, "kb")
        register(home, mine, IndexState.BUILDING)  # a rebuild to this model is under way
        check_model(container, "kb")
    finally:
        container.close()


def test_beside_running_workers_the_clis_model_is_not_checked(home: Path) -> None:
    register(home, OTHER)
    container = Container(Settings(home=home, brokers="127.0.0.1:9"))
    try:
        check_model(container, "kb")  # their workers embed, with their own model
    finally:
        container.close()
