"""Serving a Flet app the way every DermaLoop web app is served: Flet's bundled web client with no
CDN (nothing here reaches the internet), never a desktop window, and a "NAME ready at URL" line that
``dermaloop run`` and the browser tests wait for."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any


def serve(main: Callable[[Any], None], name: str, host: str, port: int) -> int:
    import flet as ft

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ["FLET_FORCE_WEB_SERVER"] = "1"
    os.environ["FLET_DISPLAY_URL_PREFIX"] = f"{name} ready at"
    ft.run(main, host=host, port=port, view=ft.AppView.WEB_BROWSER, no_cdn=True)
    return 0
