"""Filtering search hits by their metadata with Dify's `metadata_condition`:

    {"logical_operator": "and" | "or",
     "conditions": [{"name": ["title"], "comparison_operator": "contains", "value": "kafka"}]}

A condition naming several fields holds if it holds for any of them; a field a
hit does not have counts as empty. Pure: no infra imports."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from domain.errors import KbstreamError


class UnsupportedCondition(KbstreamError):
    """A metadata condition this filter cannot evaluate (a 400 over HTTP)."""


def _text(v: Any) -> str:
    return "" if v is None else str(v)


def _number(v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError("a boolean is not a number")
    return float(v)


def _compare(op: Callable[[float, float], bool]) -> Callable[[Any, Any], bool]:
    def check(field: Any, value: Any) -> bool:
        try:
            return op(_number(field), _number(value))
        except (TypeError, ValueError):
            return False  # a non-numeric field never matches a numeric comparison

    return check


def _equal(field: Any, value: Any) -> bool:
    if isinstance(field, int | float) and not isinstance(field, bool):
        try:
            return float(field) == _number(value)
        except (TypeError, ValueError):
            return False
    return _text(field) == _text(value)


_OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "is": _equal,
    "is not": lambda f, v: not _equal(f, v),
    "contains": lambda f, v: _text(v) in _text(f),
    "not contains": lambda f, v: _text(v) not in _text(f),
    "start with": lambda f, v: _text(f).startswith(_text(v)),
    "end with": lambda f, v: _text(f).endswith(_text(v)),
    "empty": lambda f, _v: _text(f) == "",
    "not empty": lambda f, _v: _text(f) != "",
    "=": _compare(lambda a, b: a == b),
    "!=": _compare(lambda a, b: a != b),
    ">": _compare(lambda a, b: a > b),
    "<": _compare(lambda a, b: a < b),
    ">=": _compare(lambda a, b: a >= b),
    "<=": _compare(lambda a, b: a <= b),
}
# Dify's UI sends the typographic forms
_ALIASES = {"≠": "!=", "≥": ">=", "≤": "<=", "starts with": "start with", "ends with": "end with"}
OPERATORS = tuple(_OPERATORS)


@dataclass(frozen=True)
class Condition:
    names: tuple[str, ...]
    operator: str
    value: Any = None

    def holds(self, metadata: Mapping[str, Any]) -> bool:
        check = _OPERATORS[self.operator]
        return any(check(metadata.get(n), self.value) for n in self.names)


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
    logical = str(raw.get("logical_operator") or "and").lower()
    if logical not in ("and", "or"):
        raise UnsupportedCondition(f"logical_operator must be 'and' or 'or', not {logical!r}")
    items = raw.get("conditions") or []
    if not isinstance(items, Sequence) or isinstance(items, str):
        raise UnsupportedCondition("conditions must be a list")
    conditions = []
    for item in items:
        if not isinstance(item, Mapping):
            raise UnsupportedCondition("each condition must be an object")
        names = item.get("name")
        if isinstance(names, str):
            names = [names]
        if not names or not all(isinstance(n, str) for n in names):
            raise UnsupportedCondition("a condition's name must be a non-empty list of strings")
        op = str(item.get("comparison_operator", "")).strip().lower()
        op = _ALIASES.get(op, op)
        if op not in _OPERATORS:
            raise UnsupportedCondition(
                f"unsupported comparison_operator {item.get('comparison_operator')!r}; "
                f"supported: {', '.join(OPERATORS)}"
            )
        conditions.append(Condition(tuple(names), op, item.get("value")))
    return MetadataFilter(tuple(conditions), "and" if logical == "and" else "or")
