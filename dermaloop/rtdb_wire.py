"""What a Realtime Database client and server must agree on, byte for byte: push ids, ordering and
the array rule.

This module is a leaf (standard library only) so that both sides of the wire share one copy:
``dermaloop.database`` (the client, which re-sorts query answers because a JSON object's order is
not significant) and ``localbase`` (the server, which must not depend on the client layer; this is
the one ``dermaloop`` module it may import, enforced by the import-linter contracts in
pyproject.toml).

Ordering is Firebase's: by value or child, nulls first, then false, true, numbers ascending, strings
lexicographically, objects; ties by key. Keys that are 32-bit integers written canonically (``"7"``,
``"-3"``, not ``"07"``) sort numerically before every other key, which sort lexicographically.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Sequence
from typing import Any

_INT32 = 2**31
_PUSH_CHARS = "-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz"


def key_order(key: str) -> tuple:
    digits = key[1:] if key.startswith("-") else key
    if digits.isdigit() and digits.isascii() and (key == "0" or not digits.startswith("0")):
        n = int(key)
        if -_INT32 <= n < _INT32:
            return (0, n, "")
    return (1, 0, key)


def value_order(value: Any) -> tuple:
    if value is None:
        return (0, 0)
    if value is False:
        return (1, 0)
    if value is True:
        return (2, 0)
    if isinstance(value, int | float):
        return (3, value)
    if isinstance(value, str):
        return (4, value)
    return (5, 0)


def priority_order(prio: Any) -> tuple:
    if prio is None:
        return (0, 0)
    if isinstance(prio, int | float) and not isinstance(prio, bool):
        return (1, prio)
    return (2, str(prio))


def child_at(value: Any, path: Sequence[str]) -> Any:
    """The value at a child path (``orderBy="a/b"``), None where any step is missing."""
    for part in path:
        if not isinstance(value, dict):
            return None
        value = value.get(part)
        if value is None:
            return None
    return value


def sort_children(children: dict[str, Any], order_by: str) -> list[tuple[str, Any]]:
    """Children in query order for ``$key``, ``$value`` or a child path (priorities are not in a
    REST answer, so ``$priority`` is the server's business and keeps the given order)."""
    items = list(children.items())
    if order_by == "$key":
        return sorted(items, key=lambda kv: key_order(kv[0]))
    if order_by == "$priority":
        return items
    if order_by == "$value":
        return sorted(items, key=lambda kv: (value_order(kv[1]), key_order(kv[0])))
    path = [p for p in order_by.split("/") if p]
    return sorted(items, key=lambda kv: (value_order(child_at(kv[1], path)), key_order(kv[0])))


def _array_length(node: dict) -> int | None:
    """Length of the array Firebase would return for an object, or None if it stays an object."""
    top = -1
    for key in node:
        if not key.isdigit() or (len(key) > 1 and key[0] == "0") or len(key) > 9:
            return None
        top = max(top, int(key))
    return top + 1 if 2 * len(node) > top else None


def to_output(node: Any) -> Any:
    """The JSON the database answers for a stored value: an object whose keys are mostly 0..n
    comes back as an array (Firebase's documented array rule). The server answers with it, and a
    client's local copy shapes its values with it, so the copy equals a ``get()``."""
    if not isinstance(node, dict):
        return node
    out = {key: to_output(child) for key, child in node.items()}
    length = _array_length(out)
    if length is None:
        return out
    return [out.get(str(i)) for i in range(length)]


class PushIds:
    """Firebase push ids (what the SDKs' ``push()`` makes locally): 8 characters of millisecond
    timestamp and 12 random ones, incremented within one millisecond, so ids sort by creation time.
    Apps use them as case ids before anything reaches the server (offline capture)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = -1
        self._last_rand = [0] * 12

    def next(self, now_ms: int | None = None) -> str:
        now = int(time.time() * 1000) if now_ms is None else now_ms
        with self._lock:
            if now <= self._last_ms:
                now = self._last_ms
                for i in range(11, -1, -1):
                    if self._last_rand[i] != 63:
                        self._last_rand[i] += 1
                        break
                    self._last_rand[i] = 0
            else:
                self._last_ms = now
                self._last_rand = [secrets.randbelow(64) for _ in range(12)]
            stamp = []
            for _ in range(8):
                stamp.append(_PUSH_CHARS[now % 64])
                now //= 64
            return "".join(reversed(stamp)) + "".join(_PUSH_CHARS[i] for i in self._last_rand)
