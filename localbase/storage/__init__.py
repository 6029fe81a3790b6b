"""localbase storage service (placeholder until its issue lands: answers 501 on every route)."""

from aiohttp import web


def create_app(ctx) -> web.Application:
    async def not_built(request: web.Request) -> web.Response:
        return web.json_response({"error": "localbase storage service not built yet"}, status=501)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", not_built)
    return app
