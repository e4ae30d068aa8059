"""The HTTP retrieval API `kbstream serve` runs (FastAPI; OpenAPI at /docs).

- POST /retrieval: Dify's external knowledge API (knowledge_id = dataset name).
- GET /v1/datasets, POST /v1/datasets/{dataset}/search,
  GET /v1/datasets/{dataset}/documents/{document_id}: kbstream's own.
- GET /healthz: no auth.

The container, and with it the model, is built once and warmed at start-up
(one embed, one jieba cut), so the first query is as fast as the rest; the
database and Milvus are read per request. Scores are on [0, 1]
(domain.fusion.unit_score): vector = cosine clamped at 0, keyword =
1 - exp(-score), hybrid = the fused score (weighted RRF scaled so 1.0 is a
node ranked first by every weighted side). Errors are Dify's
``{"error_code", "error_msg"}``: 1001 malformed Authorization header and 1002
wrong key (403), 2001 unknown dataset (404); others carry the HTTP status as
error_code (400 unsupported metadata condition, 422 invalid request).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from domain.fusion import unit_score
from domain.metadata_filter import MetadataFilter, UnsupportedCondition, parse_condition
from kbstream import queries
from kbstream.bootstrap import Container
from kbstream.search import Hit, Mode, search

log = logging.getLogger(__name__)

MAX_TOP_K = 1000
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
    logical_operator: str = "and"
    conditions: list[MetadataConditionItem] = Field(default_factory=list)


class RetrievalSetting(BaseModel):
    top_k: int = Field(default=5, ge=1, le=MAX_TOP_K)
    score_threshold: float = Field(default=0.0, ge=0.0, le=1.0)


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
    raw_score: float = Field(description="the mode's own score (cosine, keyword sum, fused)")
    title: str
    content: str
    metadata: dict[str, Any]


class SearchResponse(BaseModel):
    dataset: str
    mode: str
    hits: list[SearchHit]


# -- retrieval -------------------------------------------------------------------


def hit_metadata(dataset: str, hit: Hit, status: str | None) -> dict[str, Any]:
    """What a metadata filter sees, and what a record's `metadata` holds."""
    meta: dict[str, Any] = {
        "dataset": dataset,
        "document_id": hit.document_id,
        "document": hit.document,
        "source": hit.document,
        "title": Path(hit.document).name,
        "index_node_id": hit.index_node_id,
        "position": hit.position,
        "status": status,
        "mode": hit.mode,
    }
    if hit.answer is not None:
        meta["answer"] = hit.answer
    if hit.parent is not None:
        meta["parent"] = hit.parent
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
    status = {d.document_id: d.status.value for d in docs}
    out = []
    for h in hits:
        score = round(unit_score(mode, h.score), 6)
        if score < threshold:
            continue
        meta = hit_metadata(dataset, h, status.get(h.document_id))
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

    app = FastAPI(
        title="kbstream retrieval API",
        summary="Search kbstream datasets; Dify external knowledge API at POST /retrieval.",
        version="1",
        lifespan=lifespan,
    )

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
        condition = _condition(body.metadata_condition)
        require_dataset(container, body.knowledge_id)
        setting = body.retrieval_setting
        found = retrieve(
            container,
            body.knowledge_id,
            body.query,
            "hybrid",
            setting.top_k,
            setting.score_threshold,
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
                    score=s, raw_score=h.score, title=m["title"], content=h.content, metadata=m
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
