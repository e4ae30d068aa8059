"""Dify's external knowledge client, ported for tests: how Dify builds a
``POST {endpoint}/retrieval`` request and what it does with the answer.

From langgenius/dify, api/services/external_knowledge_service.py
(``ExternalDatasetService.fetch_external_knowledge_retrieval`` and
``process_external_api``) and api/core/rag/entities/metadata_entities.py
(``Condition``, ``MetadataCondition``), rewritten without Dify's database and
SSRF proxy. What matters is kept as Dify does it:

- the URL is the endpoint as the user saved it plus ``/retrieval`` (a
  trailing slash gives ``//retrieval``);
- the body is ``json.dumps`` of the parameters, sent as data with
  ``Content-Type: application/json``, redirects followed;
- ``top_k`` is sent as configured, null when unset; ``score_threshold`` is
  0.0 unless ``score_threshold_enabled``;
- ``metadata_condition`` is sent only when set, as ``model_dump()`` of Dify's
  pydantic model: ``logical_operator`` and ``conditions`` may be null;
- any status but 200 becomes an empty result, silently;
- each record becomes a document whose metadata gets ``score`` and ``title``
  (Dify's ``RetrievalService.external_retrieve``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal

import httpx
from pydantic import BaseModel, Field

SupportedComparisonOperator = Literal[
    # for string or array
    "contains",
    "not contains",
    "start with",
    "end with",
    "is",
    "is not",
    "empty",
    "not empty",
    "in",
    "not in",
    # for number
    "=",
    "≠",
    ">",
    "<",
    "≥",
    "≤",
    # for time
    "before",
    "after",
]


class Condition(BaseModel):
    name: str
    comparison_operator: SupportedComparisonOperator
    value: str | Sequence[str] | Sequence[int] | Sequence[float] | int | float | None = None


class MetadataCondition(BaseModel):
    logical_operator: Literal["and", "or"] | None = "and"
    conditions: list[Condition] | None = Field(default=None)


def fetch_external_knowledge_retrieval(
    endpoint: str,
    api_key: str | None,
    knowledge_id: str,
    query: str,
    external_retrieval_parameters: dict[str, Any],
    metadata_condition: MetadataCondition | None = None,
) -> list[dict[str, Any]]:
    """The records Dify gets: [] for any answer but a 200."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    score_threshold_enabled = external_retrieval_parameters.get("score_threshold_enabled") or False
    score_threshold = (
        external_retrieval_parameters.get("score_threshold", 0.0)
        if score_threshold_enabled
        else 0.0
    )
    request_params: dict[str, Any] = {
        "retrieval_setting": {
            "top_k": external_retrieval_parameters.get("top_k"),
            "score_threshold": score_threshold,
        },
        "query": query,
        "knowledge_id": knowledge_id,
    }
    if metadata_condition:
        request_params["metadata_condition"] = metadata_condition.model_dump()
    response = httpx.post(
        f"{endpoint}/retrieval",
        headers=headers,
        content=json.dumps(request_params),  # Dify: data=json.dumps(...)
        follow_redirects=True,
        timeout=60,
    )
    if response.status_code == 200:
        records: list[dict[str, Any]] = response.json().get("records", [])
        return records
    return []


def external_documents(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What Dify makes of the records (page_content, metadata with score and
    title); raises where a record is not what Dify can use."""
    out = []
    for record in records:
        metadata = record.get("metadata")
        if metadata is not None:
            metadata = dict(metadata)
            metadata["score"] = float(record["score"])
            metadata["title"] = record.get("title")
        out.append({"page_content": record.get("content"), "metadata": metadata})
    return out
