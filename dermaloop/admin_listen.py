"""Closing a firebase-admin database listener without hanging shutdown.

``ListenerRegistration.close()`` closes the SSE connection and then joins the listener's reader
thread, which can stay blocked on a dead connection (or keep reconnecting to a backend that is
gone). Every server program that listens (the cloud worker's job queue, the model registry's
followers) closes its listeners through :func:`close_listener`, so a stuck reader costs at most
``timeout`` seconds and never blocks a SIGTERM.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from typing import Any

log = logging.getLogger(__name__)


def close_listener(listener: Any, timeout: float = 3.0) -> None:
    """Close ``listener`` (a firebase-admin ``ListenerRegistration``, or None) in a helper thread and
    wait at most ``timeout`` seconds; a listener that does not close in time is left behind (its
    thread then only holds a dead connection) and a warning says so."""
    if listener is None:
        return

    def close() -> None:
        try:
            _end_stream(listener)
            listener.close()
        except Exception:
            log.exception("closing a database listener failed")

    closer = threading.Thread(target=close, name="close-listener", daemon=True)
    closer.start()
    closer.join(timeout)
    if closer.is_alive():
        log.warning("a database listener did not close in time; leaving it behind")


def _end_stream(listener: Any) -> None:
    """Let the reader thread end by itself before ``close()``: no reconnecting, then the socket shut
    down, so its read sees the end of the stream instead of a response closed under it (which
    firebase-admin does not catch: the thread dies with a traceback). Best effort: these are
    firebase-admin internals, and ``close()`` follows anyway."""
    sse = getattr(listener, "_sse", None)
    if sse is None:
        return
    sse.should_connect = False
    sse.retry = 0
    with contextlib.suppress(AttributeError, OSError):
        sse.resp.raw._fp.fp.raw._sock.shutdown(socket.SHUT_RDWR)
    thread = getattr(listener, "_thread", None)
    if thread is not None and thread is not threading.current_thread():
        thread.join(1.0)


def listener_alive(listener: Any) -> bool:
    """Whether a firebase-admin listener's reader thread still runs (it ends for good when the
    stream fails in a way firebase-admin does not retry, so callers poll this and listen again)."""
    thread = getattr(listener, "_thread", None)
    return thread is not None and thread.is_alive()
