"""Serving a Flet app the way every DermaLoop web app is served: Flet's bundled web client with no
CDN (nothing here reaches the internet), never a desktop window, and a "NAME ready at URL" line that
``dermaloop run`` and the browser tests wait for."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any


def serve(main: Callable[[Any], None], name: str, host: str, port: int) -> int:
    import flet as ft

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ["FLET_FORCE_WEB_SERVER"] = "1"
    os.environ["FLET_DISPLAY_URL_PREFIX"] = f"{name} ready at"
    ft.run(main, host=host, port=port, view=ft.AppView.WEB_BROWSER, no_cdn=True)
    return 0


def off_loop(page: Any, fn: Callable[..., None], *args: Any,
             guard: threading.Lock | None = None) -> Callable[[Any], None]:
    """A click handler that runs ``fn(*args)`` on a thread of its own, one run at a time.

    Flet 1.0 runs a plain (not async) handler on its event loop, which serves every session of the
    process: a handler that waits on the network there holds up every other user, and the
    "Saving..." it shows cannot reach the browser before it returns. A click while the previous run
    is still going does nothing (a double click must not save or send twice); handlers given the
    same ``guard`` exclude each other the same way."""
    busy = guard or threading.Lock()

    def run() -> None:
        if not busy.acquire(blocking=False):
            return
        try:
            fn(*args)
        finally:
            busy.release()

    return lambda e: page.run_thread(run)
