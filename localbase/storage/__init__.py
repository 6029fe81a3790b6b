"""localbase Storage service: the GCS JSON API (admin) and the Firebase ``/v0`` API (rules) on one port.

Both APIs share one object namespace (``ObjectStore``: blobs on disk, metadata in SQLite under
``<data dir>/storage``). ``storage.rules`` is read from ``ctx.rules_dir`` at start-up; a missing
file means every ``/v0`` request is denied (admin still works), a malformed one stops the server.

The GCS JSON API is admin: in emulator mode for anyone (google-cloud-storage sends no credential to
an emulator), in secure mode only for programs on this machine or callers presenting the admin
credential (``Authorization: Bearer <token>``); everyone else gets 401. Unfinished resumable uploads
older than ``Limits.upload_ttl_s`` are removed at start-up and then every so often.
"""

from __future__ import annotations

import asyncio
import contextlib
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


def gcs_admin(ctx: Context, request: web.Request) -> bool:
    """Whether a GCS JSON API request is admin (the only kind that API serves)."""
    security = ctx.security
    if security.anonymous_admin(request):
        return True
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and security.admin_token(request, value.strip(), google_oauth=True)


def create_app(ctx: Context) -> web.Application:
    limits = ctx.security.limits
    store = ObjectStore(ctx.data_dir / "storage", session_ttl_ms=int(limits.upload_ttl_s * 1000))
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
        if not gcs_admin(ctx, request):
            message = "Anonymous caller does not have storage access: this API is for admin programs."
            return web.json_response({"error": {"code": 401, "message": message, "errors": [
                {"message": message, "domain": "global", "reason": "required"}]}}, status=401)
        return await gcs.handle(request, seg)

    app = web.Application(client_max_size=1024 * 1024)
    ctx.security.install(app)
    app.router.add_route("*", "/{tail:.*}", dispatch)
    ctx.extras["storage_store"] = store

    async def expire_uploads() -> None:
        interval = max(1.0, min(3600.0, limits.upload_ttl_s / 4))
        while True:
            await asyncio.sleep(interval)
            await asyncio.to_thread(store.expire_sessions)

    sweepers: list[asyncio.Task] = []

    async def start_sweeper(_app: web.Application) -> None:
        sweepers.append(asyncio.get_running_loop().create_task(expire_uploads()))

    async def close_store(_app: web.Application) -> None:
        for task in sweepers:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        store.close()

    app.on_startup.append(start_sweeper)
    app.on_cleanup.append(close_store)
    return app
