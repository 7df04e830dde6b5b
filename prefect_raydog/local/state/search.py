"""Finding the platform's entities: by id, by name, and by search (query parameters, filters
and pages of results)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, Protocol, TypeVar

from prefect_raydog.local.state.errors import InvalidRequest, NotFound
from prefect_raydog.local.wire import parse_time

DEFAULT_PAGE = 100
MAX_PAGE = 1000


class Named(Protocol):
    namespace: str
    name: str
    created: datetime


T = TypeVar("T")
N = TypeVar("N", bound=Named)


def by_id(entities: dict[str, T], entity_id: str, what: str) -> T:
    """The entity with `entity_id`, or NotFound naming `what` it is."""
    try:
        return entities[entity_id]
    except KeyError:
        raise NotFound(f"{what} '{entity_id}' not found") from None


def newest_by_name(entities: Iterable[N], namespace: str, name: str, what: str) -> N:
    """The newest entity named `namespace/name` (names are reused once an entity has ended)."""
    found = [e for e in entities if (e.namespace, e.name) == (namespace, name)]
    if not found:
        raise NotFound(f"{what} '{namespace}/{name}' not found")
    return max(found, key=lambda entity: entity.created)


class Query:
    """A search's query parameters: repeated keys, `x.min`/`x.max` ranges, `True`/`False`. An
    empty value (`name=`) is no filter, as YellowDog's CLI sends it."""

    def __init__(self, params: dict[str, list[str]]) -> None:
        self.params = {key: [v for v in values if v != ""] for key, values in params.items()}

    def one(self, key: str) -> str | None:
        values = self.params.get(key)
        return values[-1] if values else None

    def many(self, key: str) -> set[str] | None:
        values = self.params.get(key)
        return set(values) if values else None

    def flag(self, key: str) -> bool | None:
        value = self.one(key)
        return None if value is None else value.lower() == "true"

    def in_range(self, key: str, moment: datetime | None) -> bool:
        low, high = self.one(f"{key}.min"), self.one(f"{key}.max")
        if low is None and high is None:
            return True
        if moment is None:
            return False
        try:
            return (low is None or moment >= parse_time(low)) and (
                high is None or moment <= parse_time(high)
            )
        except ValueError:
            raise InvalidRequest(f"Search field '{key}': not an ISO-8601 date-time") from None

    def page(self, items: Iterable[Any], render: Callable[[Any], dict]) -> dict[str, Any]:
        """One slice of the matched items, in creation order unless `sortField` names a field
        of the rendered documents; `sortDirection=DESCENDING` reverses either order."""
        matched: list[Any] = list(items)
        sort_field = self.one("sortField")
        if sort_field is not None:
            matched = sorted(map(render, matched), key=lambda doc: _sort_key(doc, sort_field))
            render = _as_is
        if self.one("sortDirection") == "DESCENDING":
            matched.reverse()
        try:
            start = int(self.one("sliceId") or 0)
            size = int(self.one("size") or DEFAULT_PAGE)
        except ValueError:
            raise InvalidRequest("Search: 'sliceId' and 'size' must be integers") from None
        if not 1 <= size <= MAX_PAGE:
            raise InvalidRequest(f"Search: field 'size' must be between 1 and {MAX_PAGE}")
        end = start + size
        return {
            "items": [render(item) for item in matched[start:end]],
            "nextSliceId": str(end) if end < len(matched) else None,
        }


def _as_is(document: dict) -> dict:
    return document


def _sort_key(document: dict[str, Any], field: str) -> tuple[int, Any]:
    value: Any = document
    for part in field.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None or isinstance(value, (dict, list)):
        return (1, "")
    return (0, value if isinstance(value, (int, float)) else str(value))


def matches(query: Query, key: str, value: Any) -> bool:
    """`value` is one of the values given for `key` (or `key` is not given)."""
    wanted = query.many(key)
    return wanted is None or value in wanted


def contains(query: Query, key: str, value: str | None) -> bool:
    """`value` contains the text given for `key`, case-sensitively (or `key` is not given): how
    YellowDog matches names and tags in searches."""
    wanted = query.one(key)
    return wanted is None or (value is not None and wanted in value)


def in_namespaces(query: Query, namespace: str) -> bool:
    """`namespace` is the deprecated `namespace` given and one of `namespaces` (each if given)."""
    return matches(query, "namespace", namespace) and matches(query, "namespaces", namespace)


def healthy(query: Query, is_healthy: bool) -> bool:
    wanted = query.flag("isHealthy")
    return wanted is None or wanted == is_healthy
