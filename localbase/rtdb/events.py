"""Server-sent event listeners: who listens where, and which frames a committed write sends them.

Frames are computed when a write is applied in memory and delivered, in the same order, once it is
committed, so every listener receives frames in commit order. A listener is registered in the same loop step that takes its initial
snapshot, so no write can fall between the snapshot and the first change.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from localbase.rtdb.values import Path, get_at, to_output

KEEP_ALIVE = b"event: keep-alive\ndata: null\n\n"
CANCEL = b"event: cancel\ndata: null\n\n"
# Unquoted: the only form that makes firebase-admin's SSE client reconnect with a fresh token.
AUTH_REVOKED = b"event: auth_revoked\ndata: credential is no longer valid\n\n"
CLOSE = b""  # sentinel: end the stream without a frame

# A listener that falls this far behind is disconnected; its client reconnects and gets a fresh
# snapshot, instead of the server buffering without bound.
MAX_BACKLOG = 10_000


def frame(event: str, path: Path, data: Any) -> bytes:
    body = json.dumps({"path": "/" + "/".join(path), "data": data}, separators=(",", ":"), ensure_ascii=False)
    return f"event: {event}\ndata: {body}\n\n".encode()


@dataclass(eq=False)
class Listener:
    ns: str
    path: Path
    auth: Any = None  # rules `auth` of an end user; None for admin (no rules re-checks)
    token: str | None = None  # the end user's ID token, re-verified before events and on a timer
    uid: str | None = None  # whose token it is, so a revocation ends exactly that user's streams
    expires_at: float | None = None
    epoch: int = 0  # the Auth change counter when the token was last fully checked
    recheck_reads: bool = False
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    closed: bool = False

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        if self.queue.qsize() >= MAX_BACKLOG:
            self.close()
            return
        self.queue.put_nowait(data)

    def close(self, final: bytes = CLOSE) -> None:
        if not self.closed:
            self.closed = True
            if final:
                self.queue.put_nowait(final)
            self.queue.put_nowait(CLOSE)


class Hub:
    def __init__(self) -> None:
        self._by_ns: dict[str, dict[Path, set[Listener]]] = {}
        self.rechecked = 0  # listeners whose read rule depends on data (re-checked after writes)

    def __len__(self) -> int:
        return sum(len(s) for paths in self._by_ns.values() for s in paths.values())

    def add(self, listener: Listener) -> None:
        group = self._by_ns.setdefault(listener.ns, {}).setdefault(listener.path, set())
        if listener not in group:
            group.add(listener)
            self.rechecked += listener.recheck_reads

    def remove(self, listener: Listener) -> None:
        paths = self._by_ns.get(listener.ns, {})
        group = paths.get(listener.path)
        if group is not None and listener in group:
            group.discard(listener)
            self.rechecked -= listener.recheck_reads
            if not group:
                del paths[listener.path]
                if not paths:
                    del self._by_ns[listener.ns]

    def close_all(self) -> None:
        for paths in self._by_ns.values():
            for group in paths.values():
                for listener in group:
                    listener.close()

    def listeners(self, ns: str) -> list[Listener]:
        return [ls for group in self._by_ns.get(ns, {}).values() for ls in group]

    def all_listeners(self) -> list[Listener]:
        return [ls for paths in self._by_ns.values() for group in paths.values() for ls in group]

    def below(self, ns: str, ops: list[tuple[Path, Any]]) -> list[Path]:
        """Listened paths strictly below some written path: they need their old value kept."""
        paths = self._by_ns.get(ns)
        if not paths:
            return []
        return [lp for lp in paths if any(len(lp) > len(w) and lp[: len(w)] == w for w, _ in ops)]

    def frames(
        self, ns: str, ops: list[tuple[Path, Any]], patch_base: Path | None,
        get_new: Callable[[Path], Any], old_values: dict[Path, Any],
    ) -> list[tuple[list[Listener], bytes]]:
        """The frames one write sends, computed right after it is applied in memory (so later
        writes cannot leak into them) and delivered once it is committed. ``patch_base`` is the
        PATCH location (its ops are the update's keys), or None for a set/delete (exactly one op)."""
        paths = self._by_ns.get(ns)
        if not paths:
            return []
        out = []
        for lp, group in paths.items():
            data = self._frame_for(lp, ops, patch_base, get_new, old_values)
            if data is not None:
                out.append((list(group), data))
        return out

    @staticmethod
    def deliver(frames: list[tuple[list[Listener], bytes]]) -> None:
        for group, data in frames:
            for listener in group:
                listener.send(data)

    @staticmethod
    def _frame_for(lp: Path, ops, patch_base, get_new, old_values) -> bytes | None:
        n = len(lp)
        if patch_base is not None and patch_base[:n] == lp:
            rel = patch_base[n:]
            base_len = len(patch_base)
            return frame("patch", rel, {"/".join(w[base_len:]): to_output(v) for w, v in ops})
        touched_below = [(w, v) for w, v in ops if w[:n] == lp]
        if touched_below and patch_base is None:
            w, v = touched_below[0]
            return frame("put", w[n:], to_output(v))
        if touched_below and all(len(w) > n for w, _ in touched_below):
            # A PATCH above this listener whose keys reach below it: the same update, re-rooted.
            return frame("patch", (), {"/".join(w[n:]): to_output(v) for w, v in touched_below})
        if touched_below or any(lp[: len(w)] == w for w, _ in ops):
            new = get_new(lp)
            if not touched_below and lp in old_values and old_values[lp] == new:
                return None
            return frame("put", (), to_output(new))
        return None


def initial_frame(root: Any, path: Path) -> bytes:
    return frame("put", (), to_output(get_at(root, path)))
