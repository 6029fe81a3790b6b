"""The Realtime Database REST + SSE endpoint: parses requests, applies rules, writes, notifies.

Everything from the moment a request body is in memory to the staging of its write (rules, ETag
check, in-memory apply, event frames) runs without an ``await``, so each write is atomic with
respect to every other request and listener; the answer and the events wait for the group commit.

Admin is ``Authorization: Bearer owner`` or ``?access_token=owner`` (what firebase-admin sends to an
emulator) and, in secure mode, the admin credential; in secure mode ``owner`` counts only from a
program on this machine (localbase.security). Any other access token is refused, never admin.
Namespaces (``?ns=``) come into being with their first write and go when their last data is
deleted: reading an unknown namespace reads an empty one without creating it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
from typing import Any

from aiohttp import web

from localbase import tokens
from localbase.rtdb import events
from localbase.rtdb.query import QUERY_PARAMS, Query, parse_query, run_query
from localbase.rtdb.rules import LOCKED, Rules, auth_variable, load_rules
from localbase.rtdb.store import Committer, Namespace, Store
from localbase.rtdb.values import (
    INVALID_JSON,
    MAX_WRITE_BYTES,
    FirebaseError,
    Normaliser,
    Path,
    PushIds,
    bad_request,
    check_key,
    dumps,
    etag,
    export,
    loads,
    parse_path,
    to_output,
)
from localbase.rules_expr import RuleSyntaxError

log = logging.getLogger("localbase.rtdb")

KNOWN_PARAMS = {
    "auth", "access_token", "auth_variable_override", "ns", "print", "shallow", "format", "callback",
    "download", "timeout", "writeSizeLimit", "disableTriggers", *QUERY_PARAMS,
}
_NS = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_HEADERS = {"Cache-Control": "no-cache", "Access-Control-Allow-Origin": "*"}
DEFAULT_KEEPALIVE_S = 30.0
# A stream re-checks its token (expiry, revocation, user deleted or disabled) before each event and
# at least this often; Auth also pushes revocations, which end the stream at once.
DEFAULT_RECHECK_S = 5.0
# Namespaces that end-user writes may create (emulator mode); admin writes always may.
DEFAULT_MAX_NAMESPACES = 1000


def _json_response(status: int, text: str | None, extra: dict[str, str] | None = None) -> web.Response:
    headers = dict(_HEADERS)
    if extra:
        headers.update(extra)
    if text is None:
        return web.Response(status=status, headers=headers, content_type="application/json", charset="utf-8")
    return web.Response(status=status, text=text, headers=headers, content_type="application/json", charset="utf-8")


def error_response(status: int, message: str) -> web.Response:
    # Production pretty-prints errors exactly like this.
    return _json_response(status, '{\n  "error" : ' + json.dumps(message) + "\n}\n")


class Caller:
    """Who sends a request: admin (rules skipped) or an end user (rules with this ``auth``)."""

    def __init__(self, admin: bool, auth: Any = None, token: str | None = None, expires_at: float | None = None):
        self.admin = admin
        self.auth = auth
        self.token = token
        self.expires_at = expires_at


class Database:
    def __init__(self, ctx):
        self.ctx = ctx
        self.default_ns = f"{ctx.project_id}-default-rtdb"
        ctx.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(ctx.data_dir / "rtdb.sqlite3")
        self.rules_file = ctx.rules_dir / "database.rules.json"
        if self.rules_file.is_file():
            self.rules_text = self.rules_file.read_text()
            try:
                self.rules = Rules(load_rules(self.rules_text))
            except RuleSyntaxError as exc:  # a broken rules file stops start-up, saying where
                raise RuleSyntaxError(f"{self.rules_file}: {exc}") from None
        else:
            log.warning("no %s: every end-user read and write is denied", self.rules_file)
            self.rules_text = '{"rules": {".read": false, ".write": false}}'
            self.rules = Rules(LOCKED)
        self.security = ctx.security
        self.hub = events.Hub()
        self.push_ids = PushIds()
        # Production sends a keep-alive about every 30 s; tests shorten it with this variable.
        self.keepalive_s = float(os.environ.get("LOCALBASE_RTDB_KEEPALIVE_S", DEFAULT_KEEPALIVE_S))
        self.recheck_s = float(os.environ.get("LOCALBASE_RTDB_RECHECK_S", DEFAULT_RECHECK_S))
        self.max_namespaces = int(os.environ.get("LOCALBASE_RTDB_MAX_NAMESPACES", DEFAULT_MAX_NAMESPACES))
        self.streams_per_ip: dict[str, int] = {}
        ctx.on_auth_change(self._auth_changed)

    # ----------------------------------------------------------------------------------- requests

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._handle(request)
        except FirebaseError as exc:
            return error_response(exc.status, exc.message)

    def _caller(self, request: web.Request) -> Caller:
        params = request.query
        header = request.headers.get("Authorization", "")
        bearer = header[7:].strip() if header.lower().startswith("bearer ") else None
        presented = bearer if bearer is not None else params.get("access_token")
        if presented is not None:
            # An admin credential or nothing: a token that is not one is refused, not ignored.
            if not self.security.admin_token(request, presented):
                raise FirebaseError(401, "Unauthorized request.")
            if "auth_variable_override" in params:
                try:
                    override = json.loads(params["auth_variable_override"])
                except ValueError:
                    raise bad_request("auth_variable_override must be JSON (an object or null).") from None
                if override is not None and not isinstance(override, dict):
                    raise bad_request("auth_variable_override must be JSON (an object or null).")
                return Caller(admin=False, auth=override)
            return Caller(admin=True)
        token = params.get("auth")
        if token is None:
            return Caller(admin=False, auth=None)
        try:
            claims = self.ctx.verify_id_token(token)
        except tokens.InvalidToken as exc:
            reason = str(exc)
            if "expired" in reason:
                msg = "Auth token is expired"
            elif "revoked" in reason:
                msg = "Auth token is revoked"
            else:
                msg = "Could not parse auth token."
            raise FirebaseError(401, msg) from None
        return Caller(admin=False, auth=auth_variable(claims), token=token, expires_at=float(claims["exp"]))

    def _namespace_name(self, request: web.Request) -> str:
        name = request.query.get("ns") or self.default_ns
        if not _NS.match(name):
            raise FirebaseError(404, f"Invalid namespace {name[:100]!r}.")
        return name

    def _lookup(self, name: str) -> Namespace:
        """A namespace to read: an unknown one reads as empty and is not created."""
        ns = self.store.namespaces.get(name)
        return ns if ns is not None else Namespace(name)

    def _for_write(self, name: str, caller: Caller) -> Namespace:
        """The namespace a write goes to, created by it if new (admin writes always may; end users
        only in emulator mode and while there are fewer than ``max_namespaces``)."""
        ns = self.store.namespaces.get(name)
        if ns is not None:
            return ns
        if not caller.admin and name != self.default_ns and (
                self.security.secure or len(self.store.namespaces) >= self.max_namespaces):
            raise FirebaseError(404, f"Namespace {name!r} does not exist; only an admin write creates one.")
        return self.store.namespace(name)

    def _drop_if_empty(self, ns: Namespace) -> None:
        """A namespace whose last data was deleted disappears (reads and streams see it empty)."""
        if ns.root is None and not ns.priorities and self.store.namespaces.get(ns.name) is ns:
            del self.store.namespaces[ns.name]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        method = request.method
        if method == "OPTIONS":
            return web.Response(status=200, headers={
                **_HEADERS, "Access-Control-Allow-Methods": "GET, PUT, POST, PATCH, DELETE, OPTIONS",
                "Access-Control-Allow-Headers": "*", "Access-Control-Max-Age": "3600"})
        if method == "POST" and "X-HTTP-Method-Override" in request.headers:
            method = request.headers["X-HTTP-Method-Override"].upper()
            if method not in ("GET", "PUT", "PATCH", "DELETE", "POST"):
                raise bad_request(f"Unsupported X-HTTP-Method-Override: {method[:20]}")
        if not KNOWN_PARAMS.issuperset(request.query):
            unknown = sorted(set(request.query) - KNOWN_PARAMS)
            raise bad_request(f"Invalid parameter: {unknown[0][:100]!r} is not a Realtime Database REST parameter.")
        self._check_output_params(request.query)
        raw_path = request.path
        if raw_path.startswith("/.settings/rules"):
            return await self._rules_endpoint(request, method)
        if raw_path.startswith("/.inspect/databases"):
            if self.security.secure and not self._caller(request).admin:
                raise FirebaseError(401, "Permission denied")
            return _json_response(200, dumps([{"name": n} for n in sorted(self.store.namespaces)]))
        if not raw_path.endswith(".json"):
            raise FirebaseError(404, "Not found: Realtime Database REST paths end in .json.")
        path = parse_path(raw_path[: -len(".json")])
        name = self._namespace_name(request)
        caller = self._caller(request)
        if method == "GET":
            if "text/event-stream" in request.headers.get("Accept", ""):
                return await self._stream(request, name, path, caller)
            return self._get(request, self._lookup(name), path, caller)
        if method in ("PUT", "PATCH", "POST", "DELETE"):
            body = b"" if method == "DELETE" else await self._read_body(request)
            return await self._write(request, method, name, path, caller, body)
        raise FirebaseError(405, f"Method {method} is not supported.")

    @staticmethod
    def _check_output_params(params) -> None:
        """Refuse bad output options before anything is written (a write must not be stored and
        then answered with an error)."""
        if params.get("print") not in (None, "pretty", "silent"):
            raise bad_request("print must be pretty or silent.")
        if params.get("format") not in (None, "export"):
            raise bad_request("format must be export.")
        if params.get("shallow") not in (None, "true"):
            raise bad_request("shallow must be true.")
        callback = params.get("callback")
        if callback is not None and not re.fullmatch(r"[A-Za-z_$][\w$.]{0,100}", callback):
            raise bad_request("Invalid callback name.")

    @staticmethod
    async def _read_body(request: web.Request) -> bytes:
        too_big = bad_request(
            f"Data to write exceeds the maximum size that can be modified with a single request "
            f"({MAX_WRITE_BYTES // (1024 * 1024)} MB).")
        if request.content_length is not None and request.content_length > MAX_WRITE_BYTES:
            raise too_big
        if request.content_length is not None:
            return await request.read()  # bounded by the check above (and client_max_size)
        body = bytearray()
        async for chunk in request.content.iter_chunked(1 << 16):
            body += chunk
            if len(body) > MAX_WRITE_BYTES:
                raise too_big
        return bytes(body)

    # ---------------------------------------------------------------------------------------- read

    def _check_read(self, ns: Namespace, path: Path, caller: Caller, query: Query | None = None) -> None:
        if caller.admin:
            return
        qvar = query.as_rules_variable() if query is not None and query.active else None
        if not self.rules.can_read(path, caller.auth, ns.get, qvar):
            raise FirebaseError(401, "Permission denied")

    def _check_index(self, path: Path, q: Query) -> None:
        if q.order_by in (None, "$key", "$priority"):
            return
        name = ".value" if q.order_by == "$value" else "/".join(q.child)
        if not self.rules.index_defined(path, name):
            raise bad_request(
                f'Index not defined, add ".indexOn": "{name}", for path "/{"/".join(path)}", to the rules')

    def _get(self, request: web.Request, ns: Namespace, path: Path, caller: Caller) -> web.Response:
        params = request.query
        q = parse_query(params)
        self._check_read(ns, path, caller, q)
        if q.active:
            self._check_index(path, q)
        value = ns.get(path)
        headers: dict[str, str] = {}
        tag = None
        if request.headers.get("X-Firebase-ETag", "").lower() == "true" or "if-none-match" in request.headers:
            tag = etag(value)
            headers["ETag"] = tag
            if request.headers.get("if-none-match") == tag:
                return web.Response(status=304, headers={**_HEADERS, **headers})
        if q.active:
            value = run_query(value, q, path, ns.priorities)
        shallow = params.get("shallow")
        if shallow is not None:
            if shallow != "true":
                raise bad_request("shallow must be true.")
            if isinstance(value, dict):
                value = dict.fromkeys(value, True)
        elif params.get("format") == "export":
            value = export(value, path, ns.priorities)
        elif "format" in params:
            raise bad_request("format must be export.")
        else:
            value = to_output(value)
        return self._body_response(request, 200, value, headers)

    def _body_response(self, request: web.Request, status: int, value: Any, headers: dict[str, str]) -> web.Response:
        printing = request.query.get("print")
        if printing == "silent":
            return web.Response(status=204, headers={**_HEADERS, **headers})
        if printing not in (None, "pretty"):
            raise bad_request("print must be pretty or silent.")
        text = dumps(value, pretty=printing == "pretty")
        callback = request.query.get("callback")
        if callback is not None and request.method == "GET":
            if not re.fullmatch(r"[A-Za-z_$][\w$.]{0,100}", callback):
                raise bad_request("Invalid callback name.")
            return web.Response(status=status, text=f"{callback}({text});", content_type="application/javascript",
                                headers={**_HEADERS, **headers})
        download = request.query.get("download")
        if download is not None and request.method == "GET":
            safe = re.sub(r"[^\w.-]", "_", download)[:100] or "download.json"
            headers = {**headers, "Content-Disposition": f'attachment; filename="{safe}"'}
        return _json_response(status, text, headers)

    # --------------------------------------------------------------------------------------- write

    async def _write(self, request: web.Request, method: str, name: str, path: Path, caller: Caller,
                     body: bytes) -> web.Response:
        if self.committer.failure is not None:
            raise FirebaseError(503, "Service unavailable: localbase could not store data; restart it.")
        ns = self._lookup(name)  # a refused write must not create its namespace
        norm = Normaliser(old_root=ns.root)
        if method == "DELETE":
            raw: Any = None
        else:
            if not body.strip():
                raise bad_request(INVALID_JSON)
            raw = loads(body)
        patch_base: Path | None = None
        if method == "PATCH":
            if not isinstance(raw, dict):
                raise bad_request("Invalid data; PATCH needs a JSON object of paths to values.")
            ops, sent = self._patch_ops(path, raw, norm)
            patch_base = path
        elif method == "POST":
            key = self.push_ids.next(norm.now_ms)
            path = (*path, key)
            value = norm.value(raw, path)
            ops, sent = [(path, value)], value
        else:
            value = norm.value(raw, path)
            ops, sent = [(path, value)], value
        if not caller.admin and not self.rules.can_write(ops, caller.auth, ns.get):
            raise FirebaseError(401, "Permission denied")
        if self.store.namespaces.get(name) is not ns:
            ns = self._for_write(name, caller)
        headers: dict[str, str] = {}
        if_match = request.headers.get("if-match")
        if if_match is not None:
            if method not in ("PUT", "DELETE"):
                raise bad_request("if-match is supported on PUT and DELETE only.")
            current = ns.get(path)
            current_tag = etag(current)
            if if_match != current_tag:
                return _json_response(412, dumps(to_output(current)), {"ETag": current_tag})
            headers["ETag"] = etag(ops[0][1])
        old_values = {lp: ns.get(lp) for lp in self.hub.below(ns.name, ops)}
        statements = self.store.stage(ns, ops, norm.priorities)
        frames = self.hub.frames(ns.name, ops, patch_base, ns.get, old_values)
        self._drop_if_empty(ns)

        def committed() -> None:
            self.hub.deliver(frames)
            self._recheck_listeners(name)

        try:
            await self.committer.submit(statements, committed)
        except Exception:
            raise FirebaseError(500, "Internal error: the write was not stored.") from None
        if method == "POST":
            return self._body_response(request, 200, {"name": path[-1]}, headers)
        if method == "DELETE":
            return self._body_response(request, 200, None, headers)
        return self._body_response(request, 200, to_output(sent), headers)

    @staticmethod
    def _patch_ops(path: Path, raw: dict, norm: Normaliser) -> tuple[list[tuple[Path, Any]], dict]:
        ops: list[tuple[Path, Any]] = []
        sent: dict[str, Any] = {}
        for key, child in raw.items():
            rel = tuple(k for k in key.split("/") if k)
            if not rel:
                raise bad_request("Invalid data; PATCH keys must be non-empty paths.")
            for k in rel:
                check_key(k)
            full = (*path, *rel)
            value = norm.value(child, full)
            ops.append((full, value))
            sent[key] = value
        ordered = sorted(p for p, _ in ops)
        for a, b in zip(ordered, ordered[1:], strict=False):
            if b[: len(a)] == a:
                raise bad_request(f"Invalid data; path /{'/'.join(a)} is an ancestor of /{'/'.join(b)} in one update.")
        return ops, sent

    def _recheck_listeners(self, name: str) -> None:
        """End users whose read rule depends on data lose their stream when it stops allowing them."""
        if not self.hub.rechecked:
            return
        ns = self._lookup(name)
        for listener in self.hub.listeners(name):
            if listener.recheck_reads and not self.rules.can_read(listener.path, listener.auth, ns.get):
                listener.close(events.CANCEL)
                self.hub.remove(listener)

    # -------------------------------------------------------------------------------------- stream

    async def _stream(self, request: web.Request, name: str, path: Path, caller: Caller) -> web.StreamResponse:
        unsupported = set(request.query) & set(QUERY_PARAMS)
        if unsupported:
            raise bad_request("Queries are not supported on streaming requests in localbase.")
        ns = self._lookup(name)
        self._check_read(ns, path, caller)
        cap = self.security.limits.streams_per_client
        client = None if cap is None or self.security.exempt(request) else self.security.client(request).ip
        if client is not None:
            if self.streams_per_ip.get(client, 0) >= cap:
                raise FirebaseError(429, f"Too many streams from this client (at most {cap}).")
            self.streams_per_ip[client] = self.streams_per_ip.get(client, 0) + 1
        listener = events.Listener(
            ns=name, path=path, auth=None if caller.admin else caller.auth, token=caller.token,
            uid=caller.auth.get("uid") if caller.token is not None and caller.auth else None,
            expires_at=caller.expires_at, epoch=self.ctx.auth_epoch,
            recheck_reads=not caller.admin and self.rules.read_uses_data(path))
        # Snapshot and registration in one loop step: no write can slip in between.
        listener.send(events.initial_frame(ns.root, path))
        self.hub.add(listener)
        response = web.StreamResponse(status=200, headers={**_HEADERS, "Content-Type": "text/event-stream"})
        try:
            await response.prepare(request)
            await self._pump(listener, response)
        except (ConnectionResetError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            listener.closed = True
            self.hub.remove(listener)
            if client is not None:
                left = self.streams_per_ip.get(client, 1) - 1
                if left > 0:
                    self.streams_per_ip[client] = left
                else:
                    self.streams_per_ip.pop(client, None)
        return response

    async def _pump(self, listener: events.Listener, response: web.StreamResponse) -> None:
        """Write the listener's frames; an end user's token is re-checked before every delivery and
        at least every ``recheck_s``, and a token that stopped being valid ends the stream with
        ``auth_revoked`` instead of the frames waiting for it."""
        queue = listener.queue
        next_keepalive = time.monotonic() + self.keepalive_s
        while True:
            now = time.monotonic()
            deadline = next_keepalive
            if listener.token is not None:
                deadline = min(deadline, now + self.recheck_s)
                if listener.expires_at is not None:
                    deadline = min(deadline, now + max(0.0, listener.expires_at - time.time()))
            try:
                data = await asyncio.wait_for(queue.get(), max(0.0, deadline - now))
            except TimeoutError:
                if not self._listener_valid(listener, full=True):
                    await response.write(events.AUTH_REVOKED)
                    return
                if time.monotonic() >= next_keepalive:
                    await response.write(events.KEEP_ALIVE)
                    next_keepalive = time.monotonic() + self.keepalive_s
                continue
            chunks = [data]
            while not queue.empty() and chunks[-1] != events.CLOSE:
                chunks.append(queue.get_nowait())
            done = chunks[-1] == events.CLOSE
            payload = b"".join(chunks)
            if payload and not self._listener_valid(listener):
                await response.write(events.AUTH_REVOKED)
                return
            if payload:
                await response.write(payload)
                next_keepalive = time.monotonic() + self.keepalive_s
            if done:
                return

    def _listener_valid(self, listener: events.Listener, full: bool = False) -> bool:
        """Whether an end user's stream may still receive data. Cheap unless something changed: a
        full check (signature, expiry, revocation, user deleted or disabled) runs when Auth reported
        a change since the last one, when the token may have expired, or when ``full``."""
        if listener.token is None:
            return True
        if (not full and listener.epoch == self.ctx.auth_epoch
                and (listener.expires_at is None or time.time() < listener.expires_at)):
            return True
        epoch = self.ctx.auth_epoch
        try:
            self.ctx.verify_id_token(listener.token)
        except tokens.InvalidToken:
            return False
        listener.epoch = epoch
        return True

    def _auth_changed(self, uid: str | None) -> None:
        """Auth deleted, disabled or revoked a user (or reset everything): that user's streams end
        now with ``auth_revoked``, without waiting for the next event or the timer."""
        for listener in self.hub.all_listeners():
            if listener.token is not None and (uid is None or listener.uid == uid) \
                    and not self._listener_valid(listener, full=True):
                listener.close(events.AUTH_REVOKED)
                self.hub.remove(listener)

    # --------------------------------------------------------------------------------------- rules

    async def _rules_endpoint(self, request: web.Request, method: str) -> web.Response:
        """Read or replace the rules: admin only (``owner`` from this machine, or the credential)."""
        if not self._caller(request).admin:
            raise FirebaseError(401, "Permission denied")
        if method == "GET":
            return web.Response(status=200, text=self.rules_text, content_type="application/json",
                                headers=_HEADERS)
        if method == "PUT":
            text = (await self._read_body(request)).decode("utf-8", "replace")
            try:
                rules = load_rules(text)
            except RuleSyntaxError as exc:
                raise bad_request(str(exc)) from None
            self.rules, self.rules_text = Rules(rules), text
            return _json_response(200, '{"status":"ok"}')
        raise FirebaseError(405, f"Method {method} is not supported on rules.")

    async def on_startup(self, app: web.Application) -> None:
        self.committer = Committer(self.store, asyncio.get_running_loop(), self._storage_failed)

    def _storage_failed(self, error: BaseException) -> None:
        """A commit failed (disk full, I/O error): memory may be ahead of disk. Go back to what is
        on disk, drop every stream (clients reconnect to a true snapshot) and refuse writes."""
        log.critical("RTDB storage failed (%s): writes are refused until localbase restarts", error)
        self.store.reload()
        self.hub.close_all()

    async def on_shutdown(self, app: web.Application) -> None:
        self.hub.close_all()

    async def on_cleanup(self, app: web.Application) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.committer.close)
        with contextlib.suppress(Exception):
            self.store.close()


def create_app(ctx) -> web.Application:
    database = Database(ctx)
    app = web.Application(client_max_size=MAX_WRITE_BYTES + 1024)
    ctx.security.install(app)
    app["database"] = database
    app.router.add_route("*", "/{tail:.*}", database.handle)
    app.on_startup.append(database.on_startup)
    app.on_shutdown.append(database.on_shutdown)
    app.on_cleanup.append(database.on_cleanup)
    return app
