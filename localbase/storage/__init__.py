"""localbase Storage service: the GCS JSON API (admin) and the Firebase ``/v0`` API (rules) on one port.

Both APIs share one object namespace (``ObjectStore``: blobs on disk, metadata in SQLite under
``<data dir>/storage``). ``storage.rules`` is read from ``ctx.rules_dir`` at start-up; a missing
file means every ``/v0`` request is denied (admin still works), a malformed one stops the server.
"""

from __future__ import annotations

import sys
from urllib.parse import unquote

from aiohttp import web

from localbase.context import Context
from localbase.storage.firebase_api import FirebaseApi
from localbase.storage.gcs_api import GcsApi
from localbase.storage.store import ObjectStore
from localbase.storage_rules import StorageRules

RULES_FILE = "storage.rules"


def load_rules(ctx: Context) -> StorageRules:
    path = ctx.rules_dir / RULES_FILE
    if not path.is_file():
        print(f"localbase storage: {path} not found: every /v0 request will be denied", file=sys.stderr, flush=True)
        return StorageRules.deny_all()
    return StorageRules.from_file(path)


def segments(request: web.Request) -> list[str]:
    """Path segments decoded once each, so ``%2F`` inside an object name stays inside it."""
    raw = request.rel_url.raw_path
    return [unquote(s, errors="strict") for s in raw.split("/")[1:]]


def create_app(ctx: Context) -> web.Application:
    store = ObjectStore(ctx.data_dir / "storage")
    default_bucket = f"{ctx.project_id}.appspot.com"
    gcs = GcsApi(store, default_bucket)
    firebase = FirebaseApi(store, ctx, load_rules(ctx))

    async def dispatch(request: web.Request) -> web.StreamResponse:
        try:
            seg = segments(request)
        except UnicodeDecodeError:
            return web.json_response({"error": {"code": 400, "message": "path is not valid UTF-8"}}, status=400)
        if seg[:1] == ["v0"]:
            return await firebase.handle(request, seg)
        return await gcs.handle(request, seg)

    app = web.Application(client_max_size=1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", dispatch)
    ctx.extras["storage_store"] = store

    async def close_store(_app: web.Application) -> None:
        store.close()

    app.on_cleanup.append(close_store)
    return app
