"""Who is an administrator, which browser pages may read answers, and what one client may hold.

localbase runs in one of two modes (docs/ARCHITECTURE.md, "localbase trust model"):

* **Emulator mode** (tests, one developer's machine, bound to the loopback interface): the Firebase
  emulator protocols as firebase-admin and google-cloud-storage expect them. ID tokens are unsigned,
  ``owner`` is admin, the GCS JSON API needs no credential, CORS answers ``*``, no per-client limits.
* **Secure mode** (a clinic server that phones reach over the network; on by default whenever
  localbase listens beyond the loopback interface): tokens are RS256-signed by a key in the data
  directory (:class:`localbase.tokens.SigningKey`); admin power (``owner``, ``Bearer ya29.*``, the
  GCS JSON API, the ``/emulator/v1`` endpoints) is granted only to programs on this machine or to
  callers presenting the admin credential that localbase writes into its data directory
  (``admin-credential.json``, mode 0600); CORS answers only configured origins; and the limits below
  keep one device from taking the clinic down.

"On this machine" means the connection's peer is a loopback address or the very address it
connected to (a remote host cannot complete a TCP handshake from the server's own address), and the
request does not come from a browser page: it carries no ``Origin`` header and names the server by
an IP address, ``localhost`` or the name localbase listens on (a page that rebinds its own DNS name
to 127.0.0.1 names the server by that name). When a
reverse proxy on the same machine forwards network traffic, every request would look local: start
localbase with ``--no-local-trust`` there.
"""

from __future__ import annotations

import collections
import functools
import hmac
import ipaddress
import json
import logging
import os
import resource
import secrets
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aiohttp import web

from localbase import tokens

log = logging.getLogger("localbase.security")

ADMIN_CREDENTIAL_FILE = "admin-credential.json"
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}
DAY_S = 24 * 3600.0


# ---- binding ------------------------------------------------------------------------------------

def is_loopback_host(host: str | None) -> bool:
    """Whether listening on ``host`` keeps localbase reachable from this machine only.

    An empty host means every interface; a name counts as loopback only if every address it
    resolves to is a loopback address."""
    if not host:
        return False
    name = host.strip("[]").split("%", 1)[0]
    if name.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(name, None)
    except OSError:
        return False
    addresses = {info[4][0].split("%", 1)[0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)


def choose_secure(host: str | None, secure: bool = False, insecure: bool = False) -> bool:
    """Secure mode when asked for, or by default whenever localbase listens beyond loopback."""
    if secure and insecure:
        raise ValueError("--secure and --insecure contradict each other")
    if secure:
        return True
    if insecure:
        return False
    return not is_loopback_host(host)


# ---- limits -------------------------------------------------------------------------------------

def _fd_budget(reserve: int = 100) -> int:
    """Connections the process can hold at its open-file limit, keeping ``reserve`` descriptors for
    SQLite, blob files and listening sockets (so accept() never fails for lack of descriptors)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft > 20_000:
        return 20_000
    return max(32, soft - reserve)


_LIMIT_ENV = {
    "header_timeout_s": ("LOCALBASE_HEADER_TIMEOUT_S", float),
    "body_idle_s": ("LOCALBASE_BODY_IDLE_S", float),
    "max_connections": ("LOCALBASE_MAX_CONNECTIONS", int),
    "connections_per_client": ("LOCALBASE_CONNECTIONS_PER_CLIENT", int),
    "streams_per_client": ("LOCALBASE_STREAMS_PER_CLIENT", int),
    "uploads_per_user": ("LOCALBASE_UPLOADS_PER_USER", int),
    "anonymous_signups_per_hour": ("LOCALBASE_ANON_SIGNUPS_PER_HOUR", int),
    "upload_ttl_s": ("LOCALBASE_UPLOAD_TTL_S", float),
}


@dataclass(frozen=True)
class Limits:
    """What one client may hold. ``None`` means unlimited (emulator mode's default for all of them).

    * ``header_timeout_s``: a request's head must arrive within this many seconds of the connection
      opening or of the previous answer, and an idle keep-alive connection is closed after it
      (slowloris: connections that send a few bytes and then nothing);
    * ``body_idle_s``: a request body that stops arriving for this long ends the connection;
    * ``max_connections``: connections the whole process holds; at the limit the longest-idle
      connection that is not serving a request is dropped for the newcomer;
    * ``connections_per_client`` / ``streams_per_client``: per client IP address;
    * ``uploads_per_user``: unfinished ``/v0`` resumable uploads per user (the oldest is dropped);
    * ``anonymous_signups_per_hour``: anonymous accounts one IP address may create per hour;
    * ``upload_ttl_s``: unfinished resumable uploads older than this are removed.

    Programs on this machine (see the module docstring) are exempt from the per-client limits.
    Every value can be overridden by a ``LOCALBASE_*`` environment variable (see ``_LIMIT_ENV``).
    """

    header_timeout_s: float | None = None
    body_idle_s: float | None = None
    max_connections: int | None = None
    connections_per_client: int | None = None
    streams_per_client: int | None = None
    uploads_per_user: int | None = None
    anonymous_signups_per_hour: int | None = None
    upload_ttl_s: float = 7 * DAY_S  # as Cloud Storage's resumable sessions

    @classmethod
    def for_mode(cls, secure: bool, environ: Mapping[str, str] | None = None) -> Limits:
        environ = os.environ if environ is None else environ
        limits = cls()
        if secure:
            limits = cls(header_timeout_s=10.0, body_idle_s=30.0, max_connections=_fd_budget(),
                         connections_per_client=64, streams_per_client=16, uploads_per_user=8,
                         anonymous_signups_per_hour=20, upload_ttl_s=DAY_S)
        overrides: dict[str, Any] = {}
        for name, (variable, kind) in _LIMIT_ENV.items():
            raw = environ.get(variable)
            if raw:
                overrides[name] = None if raw.lower() in ("none", "off", "0") and name != "upload_ttl_s" else kind(raw)
        return replace(limits, **overrides)

    @property
    def guards_connections(self) -> bool:
        return any(v is not None for v in (self.max_connections, self.connections_per_client, self.body_idle_s))


class RateWindow:
    """Events per key in a sliding window (anonymous sign-ups per IP address per hour)."""

    def __init__(self, limit: int, window_s: float = 3600.0):
        self.limit, self.window_s = limit, window_s
        self._events: dict[str, collections.deque[float]] = {}

    def allow(self, key: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        events = self._events.setdefault(key, collections.deque())
        while events and events[0] <= now - self.window_s:
            events.popleft()
        if len(events) >= self.limit:
            return False
        events.append(now)
        if len(self._events) > 10_000:  # forget keys with nothing in the window
            self._events = {k: v for k, v in self._events.items() if v and v[-1] > now - self.window_s}
        return True


# ---- the policy ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Client:
    ip: str
    local: bool  # the connection comes from this machine (loopback, or to one of its own addresses)


def _ip(address: Any) -> str | None:
    if isinstance(address, tuple | list) and address:
        return str(address[0]).split("%", 1)[0]
    return None


@functools.lru_cache(maxsize=4096)
def connection_is_local(peer_ip: str | None, sock_ip: str | None) -> bool:
    if not peer_ip:
        return False
    try:
        if ipaddress.ip_address(peer_ip).is_loopback:
            return True
    except ValueError:
        return False
    return peer_ip == sock_ip


@functools.lru_cache(maxsize=4096)
def _names_server_by_address(host: str, server_names: frozenset[str] = frozenset()) -> bool:
    """True if a Host header names the server by IP address, ``localhost`` or a name it was told to
    listen on (not by some other DNS name, which a web page could have rebound to 127.0.0.1)."""
    name = host.strip()
    if name.startswith("["):
        name = name[1:].split("]", 1)[0]
    elif name.count(":") == 1:
        name = name.rsplit(":", 1)[0]
    if name.lower() in _LOOPBACK_NAMES or name.lower() in server_names:
        return True
    try:
        ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        return False
    return True


@dataclass
class Security:
    """The mode's policy, shared by the three services (held by :class:`localbase.context.Context`)."""

    secure: bool = False
    codec: tokens.TokenCodec = tokens.UNSIGNED
    admin_secret: str | None = None
    trust_local: bool = True
    cors_origins: frozenset[str] = frozenset()
    limits: Limits = field(default_factory=Limits)
    admin_credential_path: Path | None = None
    server_names: frozenset[str] = frozenset()  # host names localbase listens on (lower case)

    @classmethod
    def emulator(cls, limits: Limits | None = None, cors_origins: Iterable[str] = ()) -> Security:
        return cls(limits=limits or Limits.for_mode(False), cors_origins=frozenset(cors_origins))

    @classmethod
    def secure_mode(cls, data_dir: Path, project_id: str, trust_local: bool = True,
                    cors_origins: Iterable[str] = (), limits: Limits | None = None,
                    server_names: Iterable[str] = ()) -> Security:
        """Load (or make) the signing key and the admin credential in ``data_dir``."""
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        key = tokens.SigningKey.load_or_create(data_dir)
        path = data_dir / ADMIN_CREDENTIAL_FILE
        secret = load_or_create_admin_credential(path, project_id)
        return cls(secure=True, codec=key, admin_secret=secret, trust_local=trust_local,
                   cors_origins=frozenset(cors_origins), limits=limits or Limits.for_mode(True),
                   admin_credential_path=path, server_names=frozenset(n.lower() for n in server_names if n))

    @property
    def signing_key(self) -> tokens.SigningKey | None:
        return self.codec if isinstance(self.codec, tokens.SigningKey) else None

    # ---- who is calling -------------------------------------------------------------------------
    @staticmethod
    def client(request: web.BaseRequest) -> Client:
        transport = request.transport
        if transport is None:
            return Client(ip="", local=False)
        peer = _ip(transport.get_extra_info("peername"))
        sock = _ip(transport.get_extra_info("sockname"))
        return Client(ip=peer or "", local=connection_is_local(peer, sock))

    def exempt(self, request: web.BaseRequest) -> bool:
        """Whether per-client limits spare this request: always in emulator mode; in secure mode for
        programs on this machine (unless local trust is off)."""
        return not self.secure or (self.trust_local and self.client(request).local)

    def trusted_local(self, request: web.BaseRequest) -> bool:
        """A program on this machine (not a browser page) that may act as admin without the credential."""
        if not self.trust_local or "Origin" in request.headers:
            return False
        return self.client(request).local and _names_server_by_address(request.host, self.server_names)

    # ---- admin ----------------------------------------------------------------------------------
    def is_admin_secret(self, value: str | None) -> bool:
        return bool(self.secure and self.admin_secret and value
                    and hmac.compare_digest(value.encode(), self.admin_secret.encode()))

    def admin_token(self, request: web.BaseRequest, value: str | None, google_oauth: bool = False) -> bool:
        """Whether a presented admin token grants admin: the admin credential always (secure mode);
        ``owner`` (and ``ya29.*`` where ``google_oauth``) in emulator mode, and in secure mode from a
        program on this machine only."""
        if not value:
            return False
        if self.is_admin_secret(value):
            return True
        if value == "owner" or (google_oauth and value.startswith("ya29.")):
            return not self.secure or self.trusted_local(request)
        return False

    def anonymous_admin(self, request: web.BaseRequest) -> bool:
        """Admin without any credential (the GCS JSON API, the /emulator endpoints): always in emulator
        mode, where clients send none; in secure mode only for programs on this machine."""
        return not self.secure or self.trusted_local(request)

    # ---- CORS -----------------------------------------------------------------------------------
    def install(self, app: web.Application) -> None:
        """Secure mode: answers readable only by pages of the configured origins (``--cors-origin``);
        emulator mode keeps each service's own CORS behaviour (the database's ``*``)."""
        if not self.secure:
            return
        origins = self.cors_origins

        @web.middleware
        async def preflight(request: web.Request, handler):
            if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
                origin = request.headers.get("Origin", "")
                if origin not in origins:
                    return web.Response(status=403, text="origin not allowed")
                requested = request.headers.get("Access-Control-Request-Headers", "")
                headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin",
                           "Access-Control-Allow-Methods": "GET, PUT, POST, PATCH, DELETE, OPTIONS",
                           "Access-Control-Max-Age": "3600"}
                if requested:
                    headers["Access-Control-Allow-Headers"] = requested[:1000]
                return web.Response(status=204, headers=headers)
            return await handler(request)

        async def cors_headers(request: web.Request, response: web.StreamResponse) -> None:
            response.headers.pop("Access-Control-Allow-Origin", None)
            origin = request.headers.get("Origin")
            if origin and origin in origins:
                response.headers["Access-Control-Allow-Origin"] = origin
                response.headers["Access-Control-Expose-Headers"] = (
                    "ETag, X-Goog-Upload-URL, X-Goog-Upload-Status, X-Goog-Upload-Size-Received, "
                    "X-Goog-Upload-Chunk-Granularity, X-Goog-Upload-Control-URL, Location, Range")
                response.headers.add("Vary", "Origin")

        app.middlewares.insert(0, preflight)
        app.on_response_prepare.append(cors_headers)


def load_or_create_admin_credential(path: Path, project_id: str) -> str:
    """The admin bearer secret for server programs on other machines: kept across restarts (copy the
    file once), made on first start with mode 0600; delete the file to rotate it."""
    if path.exists():
        os.chmod(path, 0o600)
        try:
            data = json.loads(path.read_text())
            secret = data.get("token") if isinstance(data, dict) else None
        except ValueError:
            secret = None
        if isinstance(secret, str) and len(secret) >= 32:
            return secret
        log.warning("%s is unreadable; writing a new admin credential", path)
    secret = secrets.token_urlsafe(32)
    document = {
        "type": "localbase_admin_credential",
        "project_id": project_id,
        "token": secret,
        "usage": "Authorization: Bearer <token> on the database, Auth and Storage ports of this localbase; "
                 "keep it as secret as a service-account key",
    }
    tokens._write_private(path, (json.dumps(document, indent=2) + "\n").encode())
    return secret
