"""Durable tree storage: one SQLite row per leaf, the whole tree mirrored in memory.

Why this shape: rows keyed by ``ns`` + leaf path make a write touch only the leaves it changes (a
subtree is a contiguous key range, so replacing it is one range DELETE plus INSERTs), while reads,
queries, rules and listener snapshots are served from the in-memory mirror without touching disk.

Write path: the event loop *stages* a write (computes its SQL and applies it to the in-memory tree at
once, so the next request, rule or transaction sees it: writes are serialised by the loop), then a
single writer thread commits everything staged meanwhile in one SQLite transaction (group commit),
and only then are clients answered and listeners notified, in staging order. SQLite runs in WAL
mode with ``synchronous=NORMAL``: an answered write is in the WAL, so it survives ``kill -9`` of the
process (not a power cut, which would need ``synchronous=FULL``). A request's statements always land
in one transaction, so a multi-path PATCH is all or nothing. Trade-off: another client can read a
staged write a few milliseconds before it is committed; if a commit ever fails, the service reloads
the tree from disk and refuses further writes (see :class:`Committer`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterator
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


Statement = tuple[str, Any, bool]  # (sql, params, executemany)

log = logging.getLogger("localbase.rtdb")


class Store:
    def __init__(self, db_file: FsPath):
        self.db_file = db_file
        self.conn = sqlite3.connect(str(db_file), isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL: a commit survives the process being killed (the WAL is in the OS page cache).
        # LOCALBASE_RTDB_SYNC=full also survives power loss, at one fsync per group commit.
        mode = "FULL" if os.environ.get("LOCALBASE_RTDB_SYNC", "").lower() == "full" else "NORMAL"
        self.conn.execute(f"PRAGMA synchronous={mode}")
        self.conn.executescript(_SCHEMA)
        self.namespaces: dict[str, Namespace] = {}
        self._load()

    def _load(self) -> None:
        self.namespaces = {}
        for ns_name, path_text, value_text in self.conn.execute("SELECT ns, path, value FROM leaves"):
            ns = self.namespace(ns_name)
            path = tuple(path_text.split("/")) if path_text else ()
            value = json.loads(value_text)
            if path and path[-1] == PRIORITY:
                ns.priorities[path[:-1]] = value
            else:
                ns._set_memory(path, value)

    def reload(self) -> None:
        """Replace the in-memory tree by what is committed on disk."""
        self._load()

    def namespace(self, name: str) -> Namespace:
        ns = self.namespaces.get(name)
        if ns is None:
            ns = self.namespaces[name] = Namespace(name)
        return ns

    def stage(self, ns: Namespace, ops: list[tuple[Path, Any]],
              priorities: dict[Path, Any] | None = None) -> list[Statement]:
        """Apply (path, value) ops (None deletes; paths never overlap) to memory and return the SQL
        that makes them durable, to be committed as one transaction."""
        sql: list[Statement] = []
        name = ns.name
        for path, value in ops:
            text = "/".join(path)
            # A primitive ancestor is replaced by an object: drop its leaf row.
            if value is not None and path:
                node = ns.root
                for depth in range(len(path)):
                    if node is None:
                        break
                    if not isinstance(node, dict):
                        sql.append(("DELETE FROM leaves WHERE ns=? AND path=?", (name, "/".join(path[:depth])), False))
                        break
                    node = node.get(path[depth])
            if text:
                exact, lo, hi = _subtree_range(text)
                # Two statements, not one with OR: SQLite answers ``path=? OR (range)`` by scanning
                # the whole namespace, which made every write cost time proportional to the data.
                sql.append(("DELETE FROM leaves WHERE ns=? AND path=?", (name, exact), False))
                sql.append(("DELETE FROM leaves WHERE ns=? AND path>=? AND path<?", (name, lo, hi), False))
            else:
                sql.append(("DELETE FROM leaves WHERE ns=?", (name,), False))
            if value is not None:
                rows = [(name, p, v) for p, v in _flatten(value, text)]
                sql.append(("INSERT INTO leaves (ns, path, value) VALUES (?, ?, ?)", rows, True))
            elif path:
                # Ancestors that become empty disappear; so does any priority they carried.
                for p in self._would_prune(ns, path):
                    if p in ns.priorities:
                        sql.append(("DELETE FROM leaves WHERE ns=? AND path=?", (name, "/".join((*p, PRIORITY))), False))
            ns._set_memory(path, value)
        for path, prio in (priorities or {}).items():
            sql.append(("INSERT OR REPLACE INTO leaves (ns, path, value) VALUES (?, ?, ?)",
                        (name, "/".join((*path, PRIORITY)), json.dumps(prio)), False))
        if priorities:
            ns.priorities.update(priorities)
        return sql

    def commit_now(self, statements: list[Statement]) -> None:
        """Commit one group of statements (used by the writer thread, and directly at start-up)."""
        cur = self.conn.cursor()
        cur.execute("BEGIN")
        try:
            for sql, params, many in statements:
                if many:
                    cur.executemany(sql, params)
                else:
                    cur.execute(sql, params)
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise

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


class Committer:
    """The writer thread: commits whatever was staged while the previous commit ran in one
    transaction (group commit), then runs each write's completion in staging order on the loop.

    SQLite releases the GIL while it writes, so the loop keeps parsing requests meanwhile. After a
    failed commit nothing more is written: ``failure`` is set and every later write fails, because
    memory and disk may differ until the service reloads the tree."""

    def __init__(self, store: Store, loop: asyncio.AbstractEventLoop, on_failure: Callable[[BaseException], None]):
        self.store = store
        self.loop = loop
        self.on_failure = on_failure
        self.failure: BaseException | None = None
        self._outstanding = 0  # submitted to the thread and not finished yet (touched on the loop only)
        self._inline_recent = False  # a write was committed inline in this loop iteration
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="rtdb-writer", daemon=True)
        self._thread.start()

    def submit(self, statements: list[Statement], on_commit: Callable[[], None]) -> asyncio.Future:
        """Commit ``statements``; ``on_commit`` runs on the loop once they are durable, then the
        returned future resolves (or fails with the commit error).

        The first write of a loop iteration with nothing outstanding (a lone writer, e.g. the cloud
        worker) is committed right here: handing it to the thread would cost two context switches
        and gain no batching. Writes arriving together, or while commits are outstanding, queue for
        the thread (group commit), which keeps commits and events in staging order."""
        future = self.loop.create_future()
        if self._outstanding == 0 and not self._inline_recent and self.failure is None:
            self._inline_recent = True
            self.loop.call_soon(self._clear_inline_recent)
            try:
                self.store.commit_now(statements)
            except BaseException as exc:  # noqa: BLE001 - reported to the writer
                log.exception("committing a write failed")
                self.failure = exc
                self.on_failure(exc)
                future.set_exception(exc)
                return future
            on_commit()
            future.set_result(None)
            return future
        self._outstanding += 1
        self._queue.put((statements, on_commit, future))
        return future

    def _clear_inline_recent(self) -> None:
        self._inline_recent = False

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while True:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    break
                batch.append(more)
            error: BaseException | None = self.failure
            if error is None:
                try:
                    self.store.commit_now([st for statements, _, _ in batch for st in statements])
                except BaseException as exc:  # noqa: BLE001 - reported to every waiting writer
                    log.exception("committing %d writes failed", len(batch))
                    error = self.failure = exc
            try:
                self.loop.call_soon_threadsafe(self._finish, batch, error)
            except RuntimeError:  # the loop is closed (shutdown)
                return

    def _finish(self, batch, error: BaseException | None) -> None:
        self._outstanding -= len(batch)
        if error is not None:
            self.on_failure(error)
        for _, on_commit, future in batch:
            if error is None:
                on_commit()
                if not future.done():
                    future.set_result(None)
            elif not future.done():
                future.set_exception(error)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)
