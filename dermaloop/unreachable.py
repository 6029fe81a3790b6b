"""One line, never a traceback, when a command cannot reach Firebase (or localbase).

The end-user clients already raise ``dermaloop.errors.Unavailable`` with such a line. Server-side
commands go through firebase-admin and google-cloud-storage, whose failures surface as ``requests``,
``urllib3``, ``google.auth`` or firebase-admin errors; :func:`explain` finds one anywhere in an
exception's chain and says which service at which address, and what to do.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from dermaloop.errors import Unavailable
from dermaloop.settings import Settings, load_settings

LOCAL_HINT = "start the local system with 'dermaloop run' (in this folder, or set DERMALOOP_DATA_DIR)"
REMOTE_HINT = ("check the network; with no Firebase settings a command uses the local system that "
               "'dermaloop run' started here, else Google's servers (README: 'Using a real Firebase project')")
NO_CREDENTIALS = ("no backend to talk to: no local DermaLoop is running here (start one with 'dermaloop run') "
                  "and no GOOGLE_APPLICATION_CREDENTIALS is set for a real Firebase project (see README)")


def hint_for(address: str | None) -> str:
    host = urlsplit(address if address and "://" in address else f"http://{address}").hostname or ""
    local = host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")
    return LOCAL_HINT if local else REMOTE_HINT


def _service_of(address: str, settings: Settings) -> str:
    hosts = {
        "Realtime Database": [settings.database_emulator_host, urlsplit(settings.database_url).netloc],
        "Storage": [urlsplit(settings.storage_emulator_host or "").netloc, "storage.googleapis.com",
                    "firebasestorage.googleapis.com"],
        "Auth": [settings.auth_emulator_host, "identitytoolkit.googleapis.com", "securetoken.googleapis.com"],
    }
    netloc = urlsplit(address).netloc or address
    for service, candidates in hosts.items():
        if any(c and (c == netloc or netloc.endswith(c)) for c in candidates):
            return service
    return "Firebase"


def _address(exc: BaseException) -> str | None:
    request = getattr(exc, "request", None)
    url = getattr(request, "url", None)
    if isinstance(url, str):
        parts = urlsplit(url)
        return f"{parts.scheme}://{parts.netloc}"
    pool = getattr(exc, "pool", None)
    if pool is not None and getattr(pool, "host", None):
        return f"{getattr(pool, 'scheme', 'http')}://{pool.host}:{pool.port}"
    return None


def _chain(exc: BaseException):
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [current.__cause__, current.__context__, *(a for a in current.args if isinstance(a, BaseException))]


def explain(exc: BaseException, settings: Settings | None = None) -> str | None:
    """The one-line explanation if ``exc`` means "the backend cannot be reached", else None."""
    import requests

    try:
        from google.auth.exceptions import DefaultCredentialsError, TransportError
    except ImportError:  # pragma: no cover - google-auth comes with firebase-admin
        DefaultCredentialsError = TransportError = ()  # type: ignore[assignment,misc]  # noqa: N806
    address = None
    for item in _chain(exc):
        if isinstance(item, Unavailable):
            return str(item)
        if DefaultCredentialsError and isinstance(item, DefaultCredentialsError):
            return NO_CREDENTIALS
        address = address or _address(item)
        if isinstance(item, requests.ConnectionError | requests.Timeout | ConnectionError | TimeoutError) or (
                TransportError and isinstance(item, TransportError)):
            settings = settings or load_settings()
            where = address or "its address"
            service = _service_of(where, settings)
            reason = "timed out" if isinstance(item, requests.Timeout | TimeoutError) else "connection failed"
            return str(Unavailable(service=service, address=where, reason=reason, hint=hint_for(address)))
    return None
