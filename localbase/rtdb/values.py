"""Realtime Database data model: paths, keys, limits, server values, push ids, arrays and ETags.

The tree held in memory is plain JSON-like Python: ``dict`` for objects (never empty), ``str``,
``int``/``float``, ``bool``; ``None`` means absent. Priorities live beside the tree, keyed by path,
because almost no data has one. Input is normalised into that form once, when it arrives, so every
limit Firebase enforces is checked before anything is stored.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

from dermaloop.rtdb_wire import PushIds, to_output  # noqa: F401 - the same push ids and array rule as the apps

Path = tuple[str, ...]

MAX_DEPTH = 32
MAX_KEY_BYTES = 768
MAX_STRING_BYTES = 10 * 1024 * 1024
# Production accepts REST writes up to 256 MB. localbase holds the tree in memory and serves one
# machine, so it refuses bodies above this (documented in docs/BENCHMARKS.md / the RTDB module).
MAX_WRITE_BYTES = 32 * 1024 * 1024

INVALID_JSON = "Invalid data; couldn't parse JSON object, array, or value."


class FirebaseError(Exception):
    """An error answered as ``{"error": message}`` with an HTTP status, as Firebase does."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def bad_request(message: str) -> FirebaseError:
    return FirebaseError(400, message)


_BAD_KEY = re.compile(r"[.$#\[\]/\x00-\x1f\x7f]")
_BAD_PATH = re.compile(r"(?:^|/)\.|[.$#\[\]\x00-\x1f\x7f]")


def check_key(key: str) -> None:
    if not isinstance(key, str) or not key:
        raise bad_request("Invalid data; keys must be non-empty strings.")
    if len(key) > MAX_KEY_BYTES // 4 and len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise bad_request(f"Invalid data; key longer than {MAX_KEY_BYTES} bytes: {key[:40]!r}...")
    if _BAD_KEY.search(key):
        raise bad_request(
            f'Invalid data; key {key[:80]!r} contains ".", "#", "$", "/", "[", "]" or a control character.'
        )


def parse_path(text: str) -> Path:
    """Keys of a ``/``-separated path (already URL-decoded); empty segments are ignored."""
    if _BAD_PATH.search(text):
        raise bad_request(
            f'Invalid path "{text[:200]}". Paths must be non-empty strings and can\'t contain '
            '".", "#", "$", "[", or "]".'
        )
    parts = tuple(p for p in text.split("/") if p)
    if len(parts) > MAX_DEPTH:
        raise bad_request(f"Invalid path: deeper than {MAX_DEPTH} levels.")
    for key in parts:
        if len(key) > MAX_KEY_BYTES // 4:
            check_key(key)
    return parts


def path_str(path: Path) -> str:
    return "/" + "/".join(path)


def loads(body: bytes | str) -> Any:
    """Parse a JSON request body the way Firebase accepts it (no NaN/Infinity)."""

    def reject(name: str) -> Any:
        raise ValueError(name)

    try:
        return json.loads(body, parse_constant=reject)
    except (ValueError, RecursionError):
        raise bad_request(INVALID_JSON) from None


def dumps(value: Any, pretty: bool = False) -> str:
    if pretty:
        return json.dumps(value, indent=2, ensure_ascii=False)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def get_at(root: Any, path: Path) -> Any:
    node = root
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
        if node is None:
            return None
    return node


@dataclass
class Normaliser:
    """Turns one request's parsed JSON into stored form: resolves server values against the old
    tree, converts arrays, drops nulls and empty objects, extracts priorities, enforces limits."""

    old_root: Any
    now_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    priorities: dict[Path, Any] = field(default_factory=dict)

    def value(self, raw: Any, path: Path) -> Any:
        if len(path) > MAX_DEPTH:
            raise bad_request(f"Invalid data; data is nested deeper than {MAX_DEPTH} levels at {path_str(path[:MAX_DEPTH])}.")
        if raw is None or isinstance(raw, bool):
            return raw
        if isinstance(raw, int | float):
            if isinstance(raw, float) and not math.isfinite(raw):
                raise bad_request(INVALID_JSON)
            return raw
        if isinstance(raw, str):
            if len(raw) > MAX_STRING_BYTES // 4 and len(raw.encode("utf-8", "surrogatepass")) > MAX_STRING_BYTES:
                raise bad_request(f"Invalid data; string value at {path_str(path)} is longer than 10 MB.")
            return raw
        if isinstance(raw, list):
            raw = {str(i): v for i, v in enumerate(raw)}
        if not isinstance(raw, dict):
            raise bad_request(INVALID_JSON)
        if ".sv" in raw:
            if len(raw) != 1:
                raise bad_request('Invalid data; ".sv" must be the only key of a server value.')
            return self._server_value(raw[".sv"], path)
        if ".value" in raw:
            extra = set(raw) - {".value", ".priority"}
            if extra:
                raise bad_request(f'Invalid data; ".value" cannot sit beside other keys ({sorted(extra)[0]!r}).')
            inner = self.value(raw[".value"], path)
            if isinstance(inner, dict):
                raise bad_request('Invalid data; ".value" must hold a primitive.')
            if ".priority" in raw and inner is not None:
                self._priority(raw[".priority"], path)
            return inner
        out: dict[str, Any] = {}
        for key, child in raw.items():
            if key == ".priority":
                continue
            check_key(key)
            value = self.value(child, (*path, key))
            if value is not None:
                out[key] = value
        if not out:
            return None
        if ".priority" in raw:
            self._priority(raw[".priority"], path)
        return out

    def _priority(self, priority: Any, path: Path) -> None:
        if priority is None:
            return
        if isinstance(priority, bool) or not isinstance(priority, int | float | str):
            raise bad_request('Invalid data; ".priority" must be a number, a string or null.')
        self.priorities[path] = priority

    def _server_value(self, spec: Any, path: Path) -> Any:
        if spec == "timestamp":
            return self.now_ms
        if isinstance(spec, dict) and set(spec) == {"increment"}:
            delta = spec["increment"]
            if isinstance(delta, bool) or not isinstance(delta, int | float):
                raise bad_request("Invalid data; increment needs a number.")
            current = get_at(self.old_root, path)
            if isinstance(current, bool) or not isinstance(current, int | float):
                return delta
            return current + delta
        raise bad_request(f"Invalid data; unknown server value {dumps(spec)[:80]}.")


def export(node: Any, path: Path, priorities: dict[Path, Any]) -> Any:
    """``format=export``: values with their ``.priority`` (primitives as ``.value``)."""
    if not priorities:
        return to_output(node)
    prio = priorities.get(path)
    if isinstance(node, dict):
        out = {key: export(child, (*path, key), priorities) for key, child in node.items()}
        if prio is not None:
            out[".priority"] = prio
        return out
    if prio is not None and node is not None:
        return {".value": node, ".priority": prio}
    return node


def etag(value: Any) -> str:
    if value is None:
        return "null_etag"
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return base64.b64encode(hashlib.sha1(canonical.encode("utf-8", "surrogatepass")).digest()).decode()
