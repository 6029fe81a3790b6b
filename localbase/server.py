"""One localbase process: the Realtime Database, Storage and Auth services on their own ports.

Each service is an aiohttp application built by ``create_app(ctx)`` in its subpackage; they share a
:class:`~localbase.context.Context` (data directory, project id, token checks), so a token revoked
through Auth is refused by the database and storage rules at once.
"""

from __future__ import annotations

import asyncio
import importlib
import signal
import sys
from pathlib import Path

from aiohttp import web

from localbase.config import DEFAULT_PROJECT_ID, PROJECT_ROOT, emulator_ports
from localbase.context import Context

# service name (as in firebase.json) -> module with create_app(ctx)
SERVICES = {
    "database": "localbase.rtdb",
    "storage": "localbase.storage",
    "auth": "localbase.auth",
}


async def serve(ctx: Context, stop: asyncio.Event, announce=print) -> None:
    """Run every service until ``stop`` is set; announce each address once it accepts connections."""
    ctx.data_dir.mkdir(parents=True, exist_ok=True)
    runners: list[web.AppRunner] = []
    try:
        for name, module_name in SERVICES.items():
            app = importlib.import_module(module_name).create_app(ctx)
            runner = web.AppRunner(app, handle_signals=False, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, ctx.host, ctx.ports[name], reuse_address=True)
            await site.start()
            runners.append(runner)
            # A port of 0 asks the OS for a free one; report the real one.
            sockets = runner.addresses
            if sockets:
                ctx.ports[name] = sockets[0][1]
        for name in SERVICES:
            announce(f"localbase {name} listening on http://{ctx.host}:{ctx.ports[name]}", flush=True)
        await stop.wait()
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


def run(
    data_dir: Path,
    host: str = "127.0.0.1",
    ports: dict[str, int] | None = None,
    project_id: str = DEFAULT_PROJECT_ID,
    rules_dir: Path = PROJECT_ROOT,
) -> int:
    """Serve until SIGINT/SIGTERM. Ports not given come from firebase.json, so callers name only overrides."""
    resolved = emulator_ports()
    resolved.update({k: v for k, v in (ports or {}).items() if v is not None})
    ctx = Context(data_dir=Path(data_dir), project_id=project_id, host=host, ports=resolved, rules_dir=rules_dir)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(ctx, stop)

    try:
        asyncio.run(main())
    except OSError as exc:
        print(f"localbase: cannot start: {exc}", file=sys.stderr)
        return 1
    print("localbase stopped", flush=True)
    return 0
