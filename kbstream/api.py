"""The HTTP retrieval API `kbstream serve` runs (FastAPI; OpenAPI at /docs).

- POST /retrieval: Dify's external knowledge API (knowledge_id = dataset name).
- GET /v1/datasets, POST /v1/datasets/{dataset}/search,
  GET /v1/datasets/{dataset}/documents/{document_id}: kbstream's own.
- GET /healthz: no auth.

The container, and with it the model, is built once and warmed at start-up
(one embed, one jieba cut), so the first query is as fast as the rest; the
database and Milvus are read per request. Scores are relevances on [0, 1]
that mean the same for every query (kbstream/search.py, domain/fusion.py);
0.5 is the threshold they were calibrated for. Errors are Dify's
``{"error_code", "error_msg"}``: 1001 malformed Authorization header and 1002
wrong key (403), 2001 unknown dataset (404); others carry the HTTP status as
error_code (400 unsupported metadata condition or a query over the limit, 413
a body over the limit, 422 invalid request).
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC
from pathlib import PurePath, PurePosixPath, PureWindowsPath
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Receive, Scope, Send

from domain.documents import Document
from domain.metadata_filter import MetadataFilter, UnsupportedCondition, parse_condition
from kbstream import queries
from kbstream.bootstrap import Container
from kbstream.search import Hit, Mode, search

log = logging.getLogger(__name__)

MAX_TOP_K = 1000
DEFAULT_TOP_K = 5
# with a metadata filter or threshold, rank this many candidates, then filter
FILTER_DEPTH = 200


class ApiError(Exception):
    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


# -- request and response models ------------------------------------------------


class MetadataConditionItem(BaseModel):
    name: list[str] | str
    comparison_operator: str
    value: Any = None


class MetadataCondition(BaseModel):
    # Dify's model allows null for both and sends it (null logical_operator is its "or")
    logical_operator: str | None = "and"
    conditions: list[MetadataConditionItem] | None = None


class RetrievalSetting(BaseModel):
    # Dify sends null when the user set no Top K or threshold
    top_k: int | None = Field(default=None, ge=1, le=MAX_TOP_K, description="null: 5")
    score_threshold: float | None = Field(default=None, ge=0.0, le=1.0, description="null: 0")


class RetrievalRequest(BaseModel):
    knowledge_id: str
    query: str
    retrieval_setting: RetrievalSetting = Field(default_factory=RetrievalSetting)
    metadata_condition: MetadataCondition | None = None


class Record(BaseModel):
    content: str
    score: float = Field(description="relevance on [0, 1]")
    title: str
    metadata: dict[str, Any]


class RetrievalResponse(BaseModel):
    records: list[Record]


class SearchRequest(BaseModel):
    query: str
    mode: Literal["vector", "keyword", "hybrid"] = "hybrid"
    top_k: int = Field(default=5, ge=1, le=MAX_TOP_K)
    score_threshold: float = Field(default=0.0, ge=0.0, le=1.0)
    filter: MetadataCondition | None = Field(
        default=None, description="a Dify-style metadata_condition over hit metadata"
    )


class SearchHit(BaseModel):
    score: float = Field(description="relevance on [0, 1]")
    raw_score: float = Field(description="the mode's own score (cosine, BM25, fused rank)")
    title: str
    content: str
    metadata: dict[str, Any]


class SearchResponse(BaseModel):
    dataset: str
    mode: str
    hits: list[SearchHit]


# -- retrieval -------------------------------------------------------------------


def public_source(source: str, expose_paths: bool = False) -> str:
    """A document's source as a record shows it: an absolute path on this
    server is cut to its file name unless the operator opts in
    (KBSTREAM_API_EXPOSE_PATHS); URLs and relative names stay."""
    if expose_paths:
        return source
    if source.startswith("file://"):
        source = source[len("file://") :]
    if source.startswith("/"):
        return PurePosixPath(source).name
    if PureWindowsPath(source).drive:
        return PureWindowsPath(source).name
    return source


def hit_metadata(
    dataset: str, hit: Hit, document: Document | None, expose_paths: bool = False
) -> dict[str, Any]:
    """What a metadata filter sees, and what a record's `metadata` holds:
    Dify's built-in fields (document_name, source, last_update_date as a unix
    timestamp, doc_form) and kbstream's own."""
    source = public_source(hit.document, expose_paths)
    name = PurePath(hit.document).name
    meta: dict[str, Any] = {
        "dataset": dataset,
        "document_id": hit.document_id,
        "document": source,
        "document_name": name,
        "source": source,
        "title": name,
        "index_node_id": hit.index_node_id,
        "position": hit.position,
        "status": document.status.value if document else None,
        "mode": hit.mode,
    }
    if document is not None:
        meta["doc_form"] = document.doc_form
        if document.updated_at is not None:
            updated = document.updated_at
            if updated.tzinfo is None:
                updated = updated.replace(tzinfo=UTC)  # the database keeps UTC
            meta["last_update_date"] = int(updated.timestamp())
    if hit.answer is not None:
        meta["answer"] = hit.answer
    if hit.parent is not None:
        meta["parent"] = hit.parent
    if expose_paths:
        meta["path"] = hit.document
    return meta


def require_dataset(c: Container, dataset: str) -> None:
    with c.uow(readonly=True) as uow:
        if uow.documents.status_counts(c.settings.tenant, dataset):
            return
    if dataset not in queries.known_datasets(c):
        raise ApiError(404, 2001, f"The knowledge does not exist: {dataset!r}")


def retrieve(
    c: Container,
    dataset: str,
    query: str,
    mode: Mode,
    top_k: int,
    threshold: float,
    condition: MetadataFilter | None,
) -> list[tuple[float, Hit, dict[str, Any]]]:
    """(unit score, hit, metadata), best first, at most top_k, filtered."""
    depth = top_k if condition is None else max(top_k, FILTER_DEPTH)
    hits = search(c, dataset, query, mode, depth)
    with c.uow(readonly=True) as uow:
        docs = uow.documents.list(c.settings.tenant, dataset, sorted({h.document_id for h in hits}))
    by_id = {d.document_id: d for d in docs}
    out = []
    for h in hits:
        score = h.score
        if score < threshold:
            continue
        meta = hit_metadata(dataset, h, by_id.get(h.document_id), c.settings.api_expose_paths)
        if condition is not None and not condition.matches(meta):
            continue
        out.append((score, h, meta))
        if len(out) == top_k:
            break
    return out


def _condition(raw: MetadataCondition | None) -> MetadataFilter | None:
    try:
        return parse_condition(None if raw is None else raw.model_dump())
    except UnsupportedCondition as exc:
        raise ApiError(400, 400, str(exc)) from exc


# -- the app ----------------------------------------------------------------------


class CollapseSlashes:
    """``//retrieval`` and ``/retrieval/`` are ``/retrieval``: Dify appends
    ``/retrieval`` to the endpoint as the user typed it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = re.sub("/{2,}", "/", scope["path"])
            if len(path) > 1:
                path = path.rstrip("/")
            if path != scope["path"]:
                raw = re.sub(b"/{2,}", b"/", scope.get("raw_path") or path.encode())
                raw = raw.rstrip(b"/") if len(raw) > 1 else raw
                scope = {**scope, "path": path, "raw_path": raw}
        await self.app(scope, receive, send)


class BodyLimit:
    """A request whose declared body is over ``max_bytes`` is a 413 before it is
    read (the query limit is checked once it is parsed)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            length = dict(scope.get("headers") or []).get(b"content-length", b"0")
            if length.isdigit() and int(length) > self.max_bytes:
                response = JSONResponse(
                    {
                        "error_code": 413,
                        "error_msg": f"request body over {self.max_bytes} bytes",
                    },
                    413,
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def warm_up(c: Container) -> None:
    """Load the model, jieba, the database and Milvus before the first query."""
    c.provider.embed(["warm up"])
    c.keywords.query_terms("warm up 预热")
    _ = c.vectors
    c.keyword_index.search("warm up 预热", c.settings.tenant, "", 1)  # Milvus, the collection
    with c.uow(readonly=True):
        pass


def create_app(container: Container, api_key: str | None = None, warm: bool = True) -> FastAPI:
    """The API over ``container``; ``api_key`` None serves without auth."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if warm:
            warm_up(container)
        yield

    settings = container.settings
    docs_open = api_key is None or settings.api_docs_open
    app = FastAPI(
        title="kbstream retrieval API",
        summary="Search kbstream datasets; Dify external knowledge API at POST /retrieval.",
        version="1",
        lifespan=lifespan,
        # behind the key unless opened: routed below with the other endpoints
        docs_url="/docs" if docs_open else None,
        redoc_url="/redoc" if docs_open else None,
        openapi_url="/openapi.json" if docs_open else None,
    )
    # outermost first: a Dify endpoint saved with a trailing slash asks for //retrieval
    app.add_middleware(BodyLimit, max_bytes=4 * settings.max_query_chars + 64 * 1024)
    app.add_middleware(CollapseSlashes)

    def authorized(authorization: Annotated[str | None, Header()] = None) -> None:
        if api_key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(
                403,
                1001,
                "Invalid Authorization header format. Expected 'Bearer <api-key>' format.",
            )
        if not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(403, 1002, "Authorization failed")

    auth = [Depends(authorized)]

    def check_query(query: str) -> None:
        if len(query) > settings.max_query_chars:
            raise ApiError(
                400,
                400,
                f"query is {len(query)} characters; the limit is {settings.max_query_chars} "
                "(KBSTREAM_MAX_QUERY_CHARS)",
            )

    if not docs_open:

        @app.get("/openapi.json", dependencies=auth, include_in_schema=False)
        def openapi() -> JSONResponse:
            return JSONResponse(app.openapi())

        @app.get("/docs", dependencies=auth, include_in_schema=False)
        def docs() -> HTMLResponse:
            return get_swagger_ui_html(openapi_url="/openapi.json", title=app.title)

        @app.get("/redoc", dependencies=auth, include_in_schema=False)
        def redoc() -> HTMLResponse:
            return get_redoc_html(openapi_url="/openapi.json", title=app.title)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error_code": exc.code, "error_msg": exc.message}, exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()
        ]
        return JSONResponse({"error_code": 422, "error_msg": "; ".join(errors)}, 422)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/retrieval", dependencies=auth, response_model=RetrievalResponse)
    def retrieval(body: RetrievalRequest) -> RetrievalResponse:
        """Dify's external knowledge API: hybrid search of dataset `knowledge_id`."""
        check_query(body.query)
        condition = _condition(body.metadata_condition)
        require_dataset(container, body.knowledge_id)
        setting = body.retrieval_setting
        found = retrieve(
            container,
            body.knowledge_id,
            body.query,
            "hybrid",
            setting.top_k or DEFAULT_TOP_K,
            setting.score_threshold or 0.0,
            condition,
        )
        return RetrievalResponse(
            records=[
                Record(content=h.content, score=s, title=m["title"], metadata=m)
                for s, h, m in found
            ]
        )

    @app.get("/v1/datasets", dependencies=auth)
    def datasets() -> list[dict[str, Any]]:
        """Every dataset of this tenant with its document counts by status."""
        out = []
        for name in queries.known_datasets(container):
            with container.uow(readonly=True) as uow:
                counts = uow.documents.status_counts(container.settings.tenant, name)
            out.append(
                {
                    "dataset": name,
                    "documents": sum(v for k, v in counts.items() if k != "deleted"),
                    "by_status": counts,
                }
            )
        return out

    @app.post("/v1/datasets/{dataset}/search", dependencies=auth, response_model=SearchResponse)
    def dataset_search(dataset: str, body: SearchRequest) -> SearchResponse:
        """Search one dataset in any mode, with a score threshold and a metadata filter."""
        check_query(body.query)
        condition = _condition(body.filter)
        require_dataset(container, dataset)
        found = retrieve(
            container, dataset, body.query, body.mode, body.top_k, body.score_threshold, condition
        )
        return SearchResponse(
            dataset=dataset,
            mode=body.mode,
            hits=[
                SearchHit(
                    score=s,
                    raw_score=h.raw_score if h.raw_score is not None else s,
                    title=m["title"],
                    content=h.content,
                    metadata=m,
                )
                for s, h, m in found
            ],
        )

    @app.get("/v1/datasets/{dataset}/documents/{document_id}", dependencies=auth)
    def document_status(dataset: str, document_id: str) -> dict[str, Any]:
        """One document's indexing status, error and counters."""
        require_dataset(container, dataset)
        rows = queries.document_rows(container, dataset, [document_id])
        if not rows:
            raise ApiError(404, 404, f"no document {document_id!r} in dataset {dataset!r}")
        return rows[0]

    from kbstream.api_operations import add_routes

    add_routes(app, container, auth, ApiError)  # Dify's document and segment operations (issue 19)
    return app
