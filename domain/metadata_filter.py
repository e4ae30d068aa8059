"""Filtering search hits by their metadata with Dify's `metadata_condition`:

    {"logical_operator": "and" | "or" | null,
     "conditions": [{"name": "author" | ["title", ...], "comparison_operator": "contains",
                     "value": "kafka"}] | null}

The semantics are those of the SQL Dify runs over its own documents
(``DatasetRetrieval.process_metadata_filter_func``), so a dataset answers the
same whether it lives in Dify or behind kbstream:

- a field a hit does not have (or that is null) is SQL NULL: it matches no
  comparison, ``not contains`` and ``is not`` included; only ``empty`` holds;
- a condition whose value is null is left out (except ``empty``/``not
  empty``), as Dify leaves it out of its WHERE clause;
- ``in``/``not in`` take a list or a comma-separated string; against an empty
  list ``in`` never holds and ``not in`` always does;
- ``before``/``after`` (and ``<``, ``>``, ...) compare numbers: Dify's time
  fields are unix timestamps (an ISO 8601 value is read as one too);
- a text comparison sees a number as JSON writes it (3, 2.5);
- ``logical_operator`` null is Dify's ``or`` (its code: ``and_ if == "and"
  else or_``); absent, ``and``;
- a condition naming several fields (older Dify) holds if one of them does.

Pure: no infra imports. The same conditions are what an index that stores the
fields can evaluate itself."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from domain.errors import KbstreamError


class UnsupportedCondition(KbstreamError):
    """A metadata condition this filter cannot evaluate (a 400 over HTTP)."""


def as_text(v: Any) -> str:
    """A field as Dify's SQL reads it as a string (JSON ->>): 3, 2.5, true."""
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def as_number(v: Any) -> float | None:
    """A number, a numeric string or an ISO 8601 time (as a unix timestamp);
    None for anything else (no numeric comparison holds for it)."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, int | float):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, datetime):
        return _timestamp(v)
    if isinstance(v, str):
        text = v.strip()
        try:
            number = float(text)
        except ValueError:
            try:
                return _timestamp(datetime.fromisoformat(text))
            except ValueError:
                return None
        return number if math.isfinite(number) else None
    return None


def _timestamp(t: datetime) -> float:
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t.timestamp()


def _values(v: Any) -> tuple[str, ...]:
    """``in``'s list: a list, or a comma-separated string (Dify's UI)."""
    if isinstance(v, str):
        return tuple(p.strip() for p in v.split(",") if p.strip())
    if isinstance(v, list | tuple):
        return tuple(as_text(x) for x in v if x is not None)
    return (as_text(v),)


def _numeric(op: Callable[[float, float], bool]) -> Callable[[Any, Any], bool]:
    def check(field: Any, value: Any) -> bool:
        a, b = as_number(field), as_number(value)
        return a is not None and b is not None and op(a, b)

    return check


def _equal(field: Any, value: Any) -> bool:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return _numeric(lambda a, b: a == b)(field, value)
    return as_text(field) == as_text(value)


def _not_equal(field: Any, value: Any) -> bool:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return _numeric(lambda a, b: a != b)(field, value)
    return as_text(field) != as_text(value)


# each check sees a present, non-null field; a missing one matches none
_OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "is": _equal,
    "is not": _not_equal,
    "contains": lambda f, v: as_text(v) in as_text(f),
    "not contains": lambda f, v: as_text(v) not in as_text(f),
    "start with": lambda f, v: as_text(f).startswith(as_text(v)),
    "end with": lambda f, v: as_text(f).endswith(as_text(v)),
    "empty": lambda _f, _v: False,
    "not empty": lambda _f, _v: True,
    "in": lambda f, v: as_text(f) in v,
    "not in": lambda f, v: as_text(f) not in v,
    "=": _equal,
    "!=": _not_equal,
    ">": _numeric(lambda a, b: a > b),
    "<": _numeric(lambda a, b: a < b),
    ">=": _numeric(lambda a, b: a >= b),
    "<=": _numeric(lambda a, b: a <= b),
}
# Dify's UI sends the typographic forms and the time words
_ALIASES = {
    "≠": "!=",
    "≥": ">=",
    "≤": "<=",
    "before": "<",
    "after": ">",
    "starts with": "start with",
    "ends with": "end with",
}
OPERATORS = (*_OPERATORS, *_ALIASES)
NUMERIC = frozenset({">", "<", ">=", "<="})


@dataclass(frozen=True)
class Condition:
    """One condition, normalized: ``operator`` is a key of _OPERATORS; for
    ``in``/``not in`` ``value`` is a tuple of strings; for numeric
    comparisons, a float."""

    names: tuple[str, ...]
    operator: str
    value: Any = None

    def holds(self, metadata: Mapping[str, Any]) -> bool:
        if self.operator in ("in", "not in") and not self.value:
            return self.operator == "not in"  # Dify: literal(False) / literal(True)
        if self.operator == "empty":
            return any(metadata.get(n) is None for n in self.names)
        check = _OPERATORS[self.operator]
        return any(
            metadata.get(n) is not None and check(metadata[n], self.value) for n in self.names
        )


@dataclass(frozen=True)
class MetadataFilter:
    conditions: tuple[Condition, ...]
    logical_operator: Literal["and", "or"] = "and"

    def matches(self, metadata: Mapping[str, Any]) -> bool:
        if not self.conditions:
            return True
        results = (c.holds(metadata) for c in self.conditions)
        return all(results) if self.logical_operator == "and" else any(results)


def parse_condition(raw: Mapping[str, Any] | None) -> MetadataFilter | None:
    """A MetadataFilter from Dify's `metadata_condition` object (None: none);
    UnsupportedCondition for an operator or shape this filter cannot evaluate."""
    if raw is None:
        return None
    if "logical_operator" in raw and raw["logical_operator"] is None:
        logical = "or"  # Dify: and_(...) if logical_operator == "and" else or_(...)
    else:
        logical = str(raw.get("logical_operator") or "and").lower()
    if logical not in ("and", "or"):
        raise UnsupportedCondition(f"logical_operator must be 'and' or 'or', not {logical!r}")
    items = raw.get("conditions") or []
    if not isinstance(items, Sequence) or isinstance(items, str):
        raise UnsupportedCondition("conditions must be a list")
    conditions = []
    for item in items:
        condition = _parse_one(item)
        if condition is not None:
            conditions.append(condition)
    return MetadataFilter(tuple(conditions), "and" if logical == "and" else "or")


def _parse_one(item: Any) -> Condition | None:
    if not isinstance(item, Mapping):
        raise UnsupportedCondition("each condition must be an object")
    names = item.get("name")
    if isinstance(names, str):
        names = [names]
    if not names or not all(isinstance(n, str) and n for n in names):
        raise UnsupportedCondition("a condition's name must be a string or a list of strings")
    op = str(item.get("comparison_operator", "")).strip().lower()
    op = _ALIASES.get(op, op)
    if op not in _OPERATORS:
        raise UnsupportedCondition(
            f"unsupported comparison_operator {item.get('comparison_operator')!r}; "
            f"supported: {', '.join(OPERATORS)}"
        )
    value = item.get("value")
    if value is None and op not in ("empty", "not empty"):
        return None  # Dify leaves a condition without a value out of its query
    if op in ("in", "not in"):
        value = _values(value)
    elif op in NUMERIC:
        number = as_number(value)
        if number is None:
            raise UnsupportedCondition(
                f"{item.get('comparison_operator')!r} compares numbers (unix timestamps for "
                f"times), not {value!r}"
            )
        value = number
    elif isinstance(value, list | tuple | dict):
        raise UnsupportedCondition(f"{op!r} takes one value, not {type(value).__name__}")
    return Condition(tuple(names), op, value)
