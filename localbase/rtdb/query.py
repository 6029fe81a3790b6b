"""RTDB REST queries: ``orderBy`` + range filters + limits with Firebase's ordering rules.

Ordering (``dermaloop.rtdb_wire``, the one copy the client re-applies too): by value or child, nulls first, then
false, true, numbers ascending, strings lexicographically, objects; ties by key. Keys order
32-bit-integer keys numerically before all other keys, which sort lexicographically.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dermaloop.rtdb_wire import key_order, priority_order, value_order
from localbase.rtdb.values import Path, bad_request, get_at

FILTERS = ("startAt", "endAt", "equalTo", "startAfter", "endBefore")
QUERY_PARAMS = (*FILTERS, "orderBy", "limitToFirst", "limitToLast")


@dataclass
class Query:
    order_by: str | None = None  # "$key", "$value", "$priority" or a child path
    child: Path = ()
    bounds: dict[str, Any] | None = None
    limit_first: int | None = None
    limit_last: int | None = None

    @property
    def active(self) -> bool:
        return self.order_by is not None or self.limit_first is not None or self.limit_last is not None

    def as_rules_variable(self) -> dict[str, Any]:
        b = self.bounds or {}
        return {
            "orderByKey": self.order_by == "$key",
            "orderByValue": self.order_by == "$value",
            "orderByPriority": self.order_by == "$priority",
            "orderByChild": None if self.order_by in (None, "$key", "$value", "$priority") else self.order_by,
            "startAt": b.get("startAt"), "endAt": b.get("endAt"), "equalTo": b.get("equalTo"),
            "startAfter": b.get("startAfter"), "endBefore": b.get("endBefore"),
            "limitToFirst": self.limit_first, "limitToLast": self.limit_last,
        }


def _json_param(name: str, raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        raise bad_request(f"Invalid {name}: {raw[:100]!r} is not valid JSON (strings must be quoted).") from None


def _limit(name: str, raw: str) -> int:
    value = _json_param(name, raw)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise bad_request(f"{name} must be a non-negative integer.")
    return value


def parse_query(params: Mapping[str, str]) -> Query:
    q = Query(bounds={})
    if "orderBy" in params:
        order = _json_param("orderBy", params["orderBy"])
        if not isinstance(order, str) or not order:
            raise bad_request("orderBy must be a JSON string: \"$key\", \"$value\", \"$priority\" or a child path.")
        q.order_by = order
        if not order.startswith("$"):
            q.child = tuple(p for p in order.split("/") if p)
            if not q.child or any(ch in order for ch in ".#$[]"):
                raise bad_request(f"Invalid orderBy child path {order!r}.")
        elif order not in ("$key", "$value", "$priority"):
            raise bad_request(f"orderBy {order!r} is not one of \"$key\", \"$value\", \"$priority\" or a child path.")
    for name in FILTERS:
        if name in params:
            value = _json_param(name, params[name])
            if isinstance(value, dict | list):
                raise bad_request(f"{name} must be a primitive JSON value.")
            if q.order_by == "$key" and not isinstance(value, str):
                raise bad_request(f"{name} must be a string when orderBy is \"$key\".")
            q.bounds[name] = value
    if "limitToFirst" in params:
        q.limit_first = _limit("limitToFirst", params["limitToFirst"])
    if "limitToLast" in params:
        q.limit_last = _limit("limitToLast", params["limitToLast"])
    if q.limit_first is not None and q.limit_last is not None:
        raise bad_request("limitToFirst and limitToLast cannot both be defined.")
    if q.order_by is None and (q.bounds or q.limit_first is not None or q.limit_last is not None):
        raise bad_request("orderBy must be defined when other query parameters are defined")
    if "equalTo" in q.bounds and len(q.bounds) > 1:
        raise bad_request("equalTo cannot be combined with startAt, endAt, startAfter or endBefore.")
    return q


def run_query(node: Any, q: Query, base: Path, priorities: dict[Path, Any]) -> Any:
    """The children of ``node`` that the query selects, as an object (clients re-sort it)."""
    if not isinstance(node, dict):
        # A primitive has no children: a filtered query returns nothing, an unfiltered one the value.
        return node if not (q.bounds or q.limit_first is not None or q.limit_last is not None) else None
    if q.order_by == "$key":
        def sort_key(item):
            return key_order(item[0])

        def bound_key(v):
            return key_order(v)
    elif q.order_by == "$priority":
        def sort_key(item):
            return (priority_order(priorities.get((*base, item[0]))), key_order(item[0]))

        def bound_key(v):
            return priority_order(v)
    elif q.order_by == "$value":
        def sort_key(item):
            return (value_order(item[1]), key_order(item[0]))

        def bound_key(v):
            return value_order(v)
    else:
        child = q.child

        def sort_key(item):
            return (value_order(get_at(item[1], child)), key_order(item[0]))

        def bound_key(v):
            return value_order(v)

    items = sorted(node.items(), key=sort_key)
    b = q.bounds or {}
    if b:
        primary = 0 if q.order_by == "$key" else None
        kept = []
        for item in items:
            k = sort_key(item)
            v = k if primary == 0 else k[0]
            if "equalTo" in b and v != bound_key(b["equalTo"]):
                continue
            if "startAt" in b and v < bound_key(b["startAt"]):
                continue
            if "startAfter" in b and v <= bound_key(b["startAfter"]):
                continue
            if "endAt" in b and v > bound_key(b["endAt"]):
                continue
            if "endBefore" in b and v >= bound_key(b["endBefore"]):
                continue
            kept.append(item)
        items = kept
    if q.limit_first is not None:
        items = items[: q.limit_first]
    elif q.limit_last is not None:
        items = items[len(items) - q.limit_last :] if q.limit_last else []
    return dict(items)
