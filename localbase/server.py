"""One localbase process: the Realtime Database, Storage and Auth services on their own ports.

Each service is an aiohttp application built by ``create_app(ctx)`` in its subpackage; they share a
:class:`~localbase.context.Context` (data directory, project id, the mode's security policy, token
checks), so a token revoked through Auth is refused by the database and storage rules at once.

The mode (localbase.security) is chosen here: secure when asked, or by default whenever localbase
listens beyond the loopback interface; emulator mode otherwise or when forced with ``--insecure``.
Secure mode adds the connection guard (localbase.netguard) and short timeouts for request heads.
"""

from __future__ import annotations

import asyncio
import importlib
import signal
import ssl
import sys
from collections.abc import Iterable
from pathlib import Path

from aiohttp import web

from localbase.config import DEFAULT_PROJECT_ID, PROJECT_ROOT, emulator_ports
from localbase.context import Context
from localbase.netguard import ConnectionGuard, GuardedSite
from localbase.security import Limits, Security, choose_secure, is_loopback_host

# service name (as in firebase.json) -> module with create_app(ctx)
SERVICES = {
    "database": "localbase.rtdb",
    "storage": "localbase.storage",
    "auth": "localbase.auth",
}


def ssl_context(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    """A server TLS context from a certificate chain and its key (both PEM), or None for plain HTTP."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ValueError("TLS needs both --cert and --key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert), str(key))
    return context


async def serve(ctx: Context, stop: asyncio.Event, announce=print, tls: ssl.SSLContext | None = None) -> None:
    """Run every service until ``stop`` is set; announce each address once it accepts connections."""
    ctx.data_dir.mkdir(parents=True, exist_ok=True)
    limits = ctx.security.limits
    guard = ConnectionGuard(limits, ctx.security.trust_local) if limits.guards_connections else None
    runner_options = {}
    if limits.header_timeout_s is not None:
        # aiohttp's keep-alive timeout runs from a connection's start and from each answer and is not
        # extended by partial data: a request head must arrive within it (slowloris).
        runner_options["keepalive_timeout"] = limits.header_timeout_s
    runners: list[web.AppRunner] = []
    try:
        for name, module_name in SERVICES.items():
            app = importlib.import_module(module_name).create_app(ctx)
            if guard is not None:
                app.middlewares.insert(0, guard.middleware())
            runner = web.AppRunner(app, handle_signals=False, access_log=None, **runner_options)
            await runner.setup()
            runners.append(runner)
            if guard is not None:
                site: web.BaseSite = GuardedSite(runner, ctx.host, ctx.ports[name], guard, ssl_context=tls)
            else:
                site = web.TCPSite(runner, ctx.host, ctx.ports[name], reuse_address=True, ssl_context=tls)
            await site.start()
            # A port of 0 asks the OS for a free one; report the real one.
            sockets = runner.addresses
            if sockets:
                ctx.ports[name] = sockets[0][1]
        if guard is not None:
            await guard.start()
        scheme = "https" if tls is not None else "http"
        for name in SERVICES:
            announce(f"localbase {name} listening on {scheme}://{ctx.host}:{ctx.ports[name]}", flush=True)
        await stop.wait()
    finally:
        if guard is not None:
            await guard.stop()
        for runner in reversed(runners):
            await runner.cleanup()


def _warn(lines: Iterable[str]) -> None:
    text = "\n".join(lines)
    print(f"{'!' * 78}\n{text}\n{'!' * 78}", file=sys.stderr, flush=True)


def make_security(data_dir: Path, host: str, project_id: str, secure: bool | None = None,
                  insecure: bool = False, cors_origins: Iterable[str] = (), trust_local: bool = True,
                  tls: bool = False) -> Security:
    """The mode's policy for these options, with the warnings an operator must see."""
    chosen = choose_secure(host, secure=bool(secure), insecure=insecure) if secure is not False else False
    beyond_loopback = not is_loopback_host(host)
    if not chosen:
        if beyond_loopback:
            _warn([f"localbase is in EMULATOR MODE on {host or 'every interface'}, reachable from the network:",
                   "anyone who can reach it is an administrator (unsigned tokens are accepted, 'owner' is",
                   "admin, the Storage GCS API needs no credential). Use this only on a network you fully",
                   "trust; drop --insecure to get secure mode."])
        return Security.emulator(Limits.for_mode(False), cors_origins)
    security = Security.secure_mode(data_dir, project_id, trust_local=trust_local, cors_origins=cors_origins,
                                    limits=Limits.for_mode(True), server_names=[host])
    key = security.signing_key
    print(f"localbase secure mode: tokens signed RS256 (kid {key.kid if key else '?'}); admin credential for "
          f"server programs on other machines: {security.admin_credential_path}", flush=True)
    if beyond_loopback and not tls:
        _warn([f"localbase secure mode on {host or 'every interface'} WITHOUT TLS: ID tokens, refresh tokens,",
               "passwords and the admin credential cross the network in clear. Start it with --cert and --key."])
    return security


def run(
    data_dir: Path,
    host: str = "127.0.0.1",
    ports: dict[str, int] | None = None,
    project_id: str = DEFAULT_PROJECT_ID,
    rules_dir: Path = PROJECT_ROOT,
    secure: bool | None = None,
    insecure: bool = False,
    cert: Path | None = None,
    key: Path | None = None,
    cors_origins: Iterable[str] = (),
    trust_local: bool = True,
) -> int:
    """Serve until SIGINT/SIGTERM. Ports not given come from firebase.json, so callers name only
    overrides. ``secure`` None (the default) means secure mode exactly when ``host`` is beyond the
    loopback interface, unless ``insecure``."""
    resolved = emulator_ports()
    resolved.update({k: v for k, v in (ports or {}).items() if v is not None})
    try:
        tls = ssl_context(cert, key)
        security = make_security(Path(data_dir), host, project_id, secure=secure, insecure=insecure,
                                 cors_origins=cors_origins, trust_local=trust_local, tls=tls is not None)
    except (ValueError, OSError, ssl.SSLError) as exc:
        print(f"localbase: cannot start: {exc}", file=sys.stderr)
        return 1
    ctx = Context(data_dir=Path(data_dir), project_id=project_id, host=host, ports=resolved, rules_dir=rules_dir,
                  security=security)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(ctx, stop, tls=tls)

    try:
        asyncio.run(main())
    except OSError as exc:
        print(f"localbase: cannot start: {exc}", file=sys.stderr)
        return 1
    print("localbase stopped", flush=True)
    return 0
