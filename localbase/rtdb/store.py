"""Durable tree storage: one SQLite row per leaf, the whole tree mirrored in memory.

Why this shape: rows keyed by ``ns`` + leaf path make a write touch only the leaves it changes (a
subtree is a contiguous key range, so replacing it is one range DELETE plus INSERTs), while reads,
queries, rules and listener snapshots are served from the in-memory mirror without touching disk.
SQLite runs in WAL mode with ``synchronous=NORMAL``: a commit is in the WAL before the client gets its
answer, so an acknowledged write survives ``kill -9`` of the process (not a power cut, which would
need ``synchronous=FULL``). All writes of one request are one SQLite transaction, so a multi-path
PATCH is all or nothing on disk and in memory.

The store is used only from the event loop thread: writes are serialised by the loop, which is also
what gives listeners their commit order.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path as FsPath
from typing import Any

from localbase.rtdb.values import Path, get_at

_SCHEMA = """
CREATE TABLE IF NOT EXISTS leaves (
    ns TEXT NOT NULL,
    path TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (ns, path)
) WITHOUT ROWID;
"""
PRIORITY = ".priority"


def _flatten(value: Any, prefix: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _flatten(child, f"{prefix}/{key}" if prefix else key)
    elif value is not None:
        yield prefix, json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _subtree_range(path: str) -> tuple[str, str, str]:
    # Keys never contain "/", so a subtree is the node itself plus [path + "/", path + "0").
    return path, path + "/", path + "0"


class Namespace:
    """The tree of one database namespace (``ns=``)."""

    def __init__(self, name: str):
        self.name = name
        self.root: Any = None
        self.priorities: dict[Path, Any] = {}

    def get(self, path: Path) -> Any:
        return get_at(self.root, path)

    def _set_memory(self, path: Path, value: Any) -> list[Path]:
        """Set in place; returns the ancestors pruned because they became empty."""
        if self.priorities:
            n = len(path)
            for p in [p for p in self.priorities if p[:n] == path]:
                del self.priorities[p]
        if not path:
            self.root = value
            return []
        if value is None:
            node = self.root
            trail: list[tuple[dict, str]] = []
            for key in path[:-1]:
                if not isinstance(node, dict) or key not in node:
                    return []
                trail.append((node, key))
                node = node[key]
            if not isinstance(node, dict) or path[-1] not in node:
                return []
            del node[path[-1]]
            pruned: list[Path] = []
            depth = len(path) - 1
            while not node and trail:
                parent, key = trail.pop()
                del parent[key]
                pruned.append(path[:depth])
                depth -= 1
                node = parent
            if isinstance(self.root, dict) and not self.root:
                self.root = None
            for p in pruned:
                self.priorities.pop(p, None)
            return pruned
        if not isinstance(self.root, dict):
            self.root = {}
        node = self.root
        for key in path[:-1]:
            child = node.get(key)
            if not isinstance(child, dict):
                child = {}
                node[key] = child
            node = child
        node[path[-1]] = value
        return []


class Store:
    def __init__(self, db_file: FsPath):
        self.db_file = db_file
        self.conn = sqlite3.connect(str(db_file), isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.executescript(_SCHEMA)
        self.namespaces: dict[str, Namespace] = {}
        self._load()

    def _load(self) -> None:
        for ns_name, path_text, value_text in self.conn.execute("SELECT ns, path, value FROM leaves"):
            ns = self.namespace(ns_name)
            path = tuple(path_text.split("/")) if path_text else ()
            value = json.loads(value_text)
            if path and path[-1] == PRIORITY:
                ns.priorities[path[:-1]] = value
            else:
                ns._set_memory(path, value)

    def namespace(self, name: str) -> Namespace:
        ns = self.namespaces.get(name)
        if ns is None:
            ns = self.namespaces[name] = Namespace(name)
        return ns

    def apply(self, ns: Namespace, ops: list[tuple[Path, Any]], priorities: dict[Path, Any] | None = None) -> None:
        """Write every (path, value) in order (None deletes) as one transaction; paths never overlap."""
        cur = self.conn.cursor()
        cur.execute("BEGIN")
        try:
            for path, value in ops:
                text = "/".join(path)
                # A primitive ancestor is replaced by an object: drop its leaf row.
                if value is not None and path:
                    node = ns.root
                    for depth in range(len(path)):
                        if node is None:
                            break
                        if not isinstance(node, dict):
                            cur.execute("DELETE FROM leaves WHERE ns=? AND path=?", (ns.name, "/".join(path[:depth])))
                            break
                        node = node.get(path[depth])
                if text:
                    exact, lo, hi = _subtree_range(text)
                    cur.execute(
                        "DELETE FROM leaves WHERE ns=? AND (path=? OR (path>=? AND path<?))", (ns.name, exact, lo, hi)
                    )
                else:
                    cur.execute("DELETE FROM leaves WHERE ns=?", (ns.name,))
                if value is not None:
                    cur.executemany(
                        "INSERT INTO leaves (ns, path, value) VALUES (?, ?, ?)",
                        ((ns.name, p, v) for p, v in _flatten(value, text)),
                    )
                elif path:
                    # Ancestors that become empty disappear; so does any priority they carried.
                    pruned = self._would_prune(ns, path)
                    for p in pruned:
                        if p in ns.priorities:
                            cur.execute("DELETE FROM leaves WHERE ns=? AND path=?", (ns.name, "/".join((*p, PRIORITY))))
            for path, prio in (priorities or {}).items():
                cur.execute(
                    "INSERT OR REPLACE INTO leaves (ns, path, value) VALUES (?, ?, ?)",
                    (ns.name, "/".join((*path, PRIORITY)), json.dumps(prio)),
                )
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        for path, value in ops:
            ns._set_memory(path, value)
        if priorities:
            ns.priorities.update(priorities)

    @staticmethod
    def _would_prune(ns: Namespace, path: Path) -> list[Path]:
        if not ns.priorities:
            return []
        pruned = []
        for depth in range(len(path) - 1, 0, -1):
            parent = ns.get(path[:depth])
            if isinstance(parent, dict) and len(parent) == 1 and path[depth] in parent:
                pruned.append(path[:depth])
            else:
                break
        return pruned

    def close(self) -> None:
        self.conn.close()
