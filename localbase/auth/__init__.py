"""localbase Auth service: the Identity Toolkit and Secure Token subset, on the emulator's routes.

``create_app`` also registers ``ctx.extras["is_revoked"]``, which :meth:`Context.verify_id_token`
consults, so the RTDB and Storage rules refuse tokens of deleted or disabled users and tokens issued
before ``validSince`` (``revoke_refresh_tokens``), and reports every such change through
``Context.auth_changed`` so open database streams end at once.
"""

from __future__ import annotations

from aiohttp import web

from localbase.auth.service import AuthService, build_routes
from localbase.auth.store import AuthStore
from localbase.context import Context

DEFAULT_CONFIG = {"signIn": {"allowDuplicateEmails": False}, "emailPrivacyConfig": {"enableImprovedEmailPrivacy": False}}


def create_app(ctx: Context) -> web.Application:
    store = AuthStore(ctx.data_dir / "auth.sqlite3")
    service = AuthService(store, ctx)
    ctx.extras["is_revoked"] = service.is_revoked
    ctx.extras["auth_service"] = service
    app = web.Application(client_max_size=1024 * 1024)
    ctx.security.install(app)
    app.router.add_route("*", "/{tail:.*}", build_routes(service, DEFAULT_CONFIG))

    async def close_store(_app: web.Application) -> None:
        store.close()

    app.on_cleanup.append(close_store)
    return app
