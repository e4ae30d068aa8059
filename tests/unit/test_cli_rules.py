"""`kbstream index` / `sync` refuse a processing rule the pipeline would refuse,
before anything is published (no broker, database or model is touched)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from kbstream.cli import app


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        # issue 20 item 10: 9,267 segments from 61,000 characters
        (["--max-tokens", "16", "--chunk-overlap", "15"], "more than half of max_tokens 16"),
        (["--separator", "\\x"], "does not decode"),
    ],
)
@pytest.mark.parametrize("verb", ["index", "sync"])
def test_a_rule_the_pipeline_would_refuse(
    tmp_path: Path, verb: str, options: list[str], reason: str
) -> None:
    (tmp_path / "a.txt").write_text("text")
    result = CliRunner().invoke(
        app,
        [verb, str(tmp_path / "a.txt"), "--dataset", "d", "--home", str(tmp_path), *options],
    )
    assert result.exit_code == 2
    assert "invalid processing rule" in result.output and reason in result.output
    assert "validation error" not in result.output  # one line, not pydantic's report
