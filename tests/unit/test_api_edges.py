"""kbstream/api.py at its edges, without a search behind it (FastAPI's
TestClient, in process): where the API documentation is served, a Dify
endpoint saved with a trailing slash, and records without server paths."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from kbstream.api import create_app, public_source
from kbstream.bootstrap import Container
from kbstream.settings import Settings


def _client(tmp_path: Path, key: str | None, **settings: object) -> TestClient:
    container = Container(Settings(home=tmp_path, **settings))  # type: ignore[arg-type]
    return TestClient(create_app(container, api_key=key, warm=False))


@pytest.mark.parametrize("path", ["/openapi.json", "/docs", "/redoc"])
def test_api_documentation_is_behind_the_key_unless_opened(tmp_path: Path, path: str) -> None:
    closed = _client(tmp_path, "k")
    assert closed.get(path).status_code == 403
    assert closed.get(path, headers={"Authorization": "Bearer k"}).status_code == 200
    opened = _client(tmp_path, "k", api_docs_open=True)
    assert opened.get(path).status_code == 200
    assert _client(tmp_path, None).get(path).status_code == 200  # --no-auth


def test_slashes_are_collapsed(tmp_path: Path) -> None:
    client = _client(tmp_path, None)
    for path in ("//healthz", "/healthz/", "///healthz//"):
        # a full URL: a bare "//x" would be read as a host
        assert client.get(f"http://testserver{path}").json() == {"status": "ok"}, path


@pytest.mark.parametrize(
    ("source", "shown"),
    [
        ("/srv/kb/hr/vacation.md", "vacation.md"),
        ("file:///srv/kb/vacation.md", "vacation.md"),
        ("C:\\kb\\vacation.md", "vacation.md"),
        ("vacation.md", "vacation.md"),
        ("hr/vacation.md", "hr/vacation.md"),
        ("https://wiki.example/vacation", "https://wiki.example/vacation"),
    ],
)
def test_records_show_no_absolute_server_path(source: str, shown: str) -> None:
    assert public_source(source) == shown
    assert public_source(source, expose_paths=True) == source
