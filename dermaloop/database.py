"""The one way DermaLoop programs reach the Firebase Realtime Database.

* Server programs (cloud worker, retraining) act as admin through firebase-admin's ``db`` module:
  :func:`admin_reference`. Against an emulator (localbase) firebase-admin sends ``Bearer owner``.
* End-user apps (patient app, reviewer portal) act as the signed-in user through the documented REST
  API with ``?auth=<ID token>``, which is what the mobile and web SDKs do underneath:
  :class:`UserDatabase`. Rules (``database.rules.json``) then decide what the user may do, in
  production and in localbase alike.

Which backend answers is decided only by :class:`dermaloop.settings.Settings` (Firebase's standard
emulator variables).

For apps that must keep working through a flaky network: requests are retried where that is safe
(:mod:`dermaloop.http`), failures are :mod:`dermaloop.errors` classes (``DatabaseError`` is this
service's), a :class:`Listener` reconnects by itself and reports its state, and a :class:`Mirror`
keeps a local copy of a subtree up to date.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests
import urllib3.exceptions

from dermaloop.errors import (
    Conflict,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ServiceError,
    Unauthenticated,
    Unavailable,
    error_class,
)
from dermaloop.http import NO_RETRY, Endpoint, RetryPolicy, TokenSource, current_token, renew_token
from dermaloop.rtdb_wire import PushIds, sort_children, to_output
from dermaloop.settings import Settings, load_settings

log = logging.getLogger(__name__)

__all__ = [
    "SERVER_TIMESTAMP", "DatabaseError", "Event", "Listener", "LocalCopy", "Mirror", "PermissionDenied", "TokenSource",
    "Unauthenticated", "Unavailable", "UserDatabase", "admin_reference", "increment", "new_push_id",
]


def admin_reference(path: str = "/", settings: Settings | None = None, app_name: str = "[DEFAULT]"):
    """A firebase-admin ``db.Reference`` with admin rights (rules are bypassed)."""
    from firebase_admin import db

    from dermaloop.admin_app import get_app

    return db.reference(path, app=get_app(settings, name=app_name))


_push_ids = PushIds()


def new_push_id() -> str:
    return _push_ids.next()


SERVER_TIMESTAMP = {".sv": "timestamp"}


def increment(delta: float) -> dict:
    return {".sv": {"increment": delta}}


class DatabaseError(ServiceError):
    """A request the database refused or could not serve; ``status`` is the HTTP status and
    ``message`` Firebase's text. What is raised is also an instance of the kind of failure
    (:mod:`dermaloop.errors`): :class:`PermissionDenied` for a rules denial,
    :class:`Unauthenticated` for a bad, expired or revoked token (a kind of PermissionDenied, as
    both are HTTP 401 here), :class:`Unavailable` when the database cannot be reached."""

    service = "Realtime Database"


@dataclass(frozen=True)
class Event:
    """One change seen by a listener; same fields as firebase-admin's ``db.Event``."""

    event_type: str  # "put" or "patch"
    path: str
    data: Any


_KIND_BY_STATUS = {400: InvalidArgument, 403: PermissionDenied, 404: NotFound, 412: Conflict}


def _raise_for(response: requests.Response, address: str | None = None) -> None:
    if response.status_code < 400:
        return
    try:
        body = response.json()
        message = body.get("error", response.text) if isinstance(body, dict) else response.text
    except ValueError:
        message = response.text
    message = str(message)
    if response.status_code == 401:
        # One status for two things: the rules said no, or the token is not acceptable.
        kind = PermissionDenied if message.strip().lower() == "permission denied" else Unauthenticated
    else:
        kind = _KIND_BY_STATUS.get(response.status_code)
    cls = error_class(DatabaseError, kind)
    raise cls(f"{response.status_code}: {message}", message=message, status=response.status_code, address=address)


def _clean(path: str) -> str:
    return "/".join(p for p in path.split("/") if p)


def _has_increment(value: Any) -> bool:
    """True if a write holds ``{".sv": {"increment": n}}``: repeating it would count twice."""
    if isinstance(value, dict):
        sv = value.get(".sv")
        if isinstance(sv, dict) and "increment" in sv:
            return True
        return any(_has_increment(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_increment(v) for v in value)
    return False


class UserDatabase:
    """The Realtime Database as one signed-in end user sees it (REST + streaming, rules apply).

    ``id_token`` is the user's Firebase ID token, or a function returning a currently valid one
    (called before every request, so a session object can refresh it). When the server calls the
    token expired or revoked and the source can renew it (a :class:`~dermaloop.auth.UserSession`),
    the request is sent once more with a fresh token.

    Reads and writes that can safely be repeated (GET, PUT, PATCH, DELETE without an
    ``increment``) are retried on network errors, 5xx and 429 as ``retry`` says; ``push`` and
    conditional writes only when the request certainly never reached the server. Everything raises
    :mod:`dermaloop.errors` classes, never ``requests`` ones.
    """

    def __init__(self, id_token: TokenSource, settings: Settings | None = None,
                 session: requests.Session | None = None, timeout: float = 30.0,
                 retry: RetryPolicy | None = None):
        self.settings = settings or load_settings()
        self._token = id_token
        self.session = session or requests.Session()
        self.timeout = timeout
        if self.settings.database_emulator_host:
            self.base_url = f"http://{self.settings.database_emulator_host}"
            self._ns: dict[str, str] = {"ns": self.settings.database_namespace}
        else:
            self.base_url = self.settings.database_url.split("?")[0].rstrip("/")
            self._ns = {}
        self.endpoint = Endpoint(DatabaseError, self.base_url, self.session, timeout, retry)

    @property
    def retry(self) -> RetryPolicy:
        return self.endpoint.retry

    def token(self) -> str | None:
        """The token to send now (None: signed out, the rules see ``auth == null``)."""
        return current_token(self._token)

    def url(self, path: str) -> str:
        return f"{self.base_url}/{_clean(path)}.json"

    def _params(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        params = {**(extra or {}), **self._ns, "auth": self.token()}
        return params

    def _request(self, method: str, path: str, params: dict | None = None, body: Any = None,
                 headers: dict[str, str] | None = None, idempotent: bool | None = None) -> requests.Response:
        if idempotent is None:
            idempotent = method != "POST" and not _has_increment(body)
        data = None if body is None else json.dumps(body, separators=(",", ":"))
        renewed = False
        while True:
            response = self.endpoint.request(method, self.url(path), idempotent=idempotent,
                                             params=self._params(params), data=data, headers=headers)
            if response.status_code == 412:
                return response
            try:
                _raise_for(response, self.base_url)
            except Unauthenticated:
                # A 401 for the token means the request was not carried out: safe to send again.
                if renewed or not renew_token(self._token):
                    raise
                renewed = True
                continue
            return response

    # reads ---------------------------------------------------------------------------------

    def get(self, path: str, *, order_by: str | None = None, start_at: Any = None, end_at: Any = None,
            equal_to: Any = None, start_after: Any = None, end_before: Any = None,
            limit_to_first: int | None = None, limit_to_last: int | None = None, shallow: bool = False) -> Any:
        """The value at ``path`` (None if absent), optionally a query over its children.

        ``order_by`` is "$key", "$value", "$priority" or a child path. Query results come back as a
        dict in the query's order (the server's JSON object order is not significant)."""
        params: dict[str, Any] = {}
        if shallow:
            params["shallow"] = "true"
        bounds = {"startAt": start_at, "endAt": end_at, "equalTo": equal_to,
                  "startAfter": start_after, "endBefore": end_before}
        for name, value in bounds.items():
            if value is not None:
                params[name] = json.dumps(value)
        if limit_to_first is not None:
            params["limitToFirst"] = str(int(limit_to_first))
        if limit_to_last is not None:
            params["limitToLast"] = str(int(limit_to_last))
        if order_by is not None:
            params["orderBy"] = json.dumps(order_by)
        value = self.endpoint.json(self._request("GET", path, params))
        # Priorities are not in the answer, so "$priority" keeps the server's order.
        if order_by not in (None, "$priority") and isinstance(value, dict):
            value = dict(sort_children(value, order_by))
        return value

    def get_with_etag(self, path: str) -> tuple[Any, str]:
        response = self._request("GET", path, headers={"X-Firebase-ETag": "true"})
        return self.endpoint.json(response), response.headers.get("ETag", "")

    # writes --------------------------------------------------------------------------------

    def set(self, path: str, value: Any) -> None:
        if value is None:
            raise ValueError("set(None) would delete; call delete() to mean it")
        self._request("PUT", path, {"print": "silent"}, value)

    def set_if_match(self, path: str, value: Any, etag: str) -> tuple[bool, Any, str]:
        """Compare-and-set: ``(True, value, new_etag)`` or ``(False, current_value, current_etag)``.
        ``etag="null_etag"`` means "only if absent". Not repeated once it may have reached the
        server: a repeat of a write that succeeded would report a false conflict."""
        response = self._request("PUT", path, None, value, headers={"if-match": etag}, idempotent=False)
        ok = response.status_code != 412
        return ok, self.endpoint.json(response), response.headers.get("ETag", "")

    def update(self, path: str, values: dict[str, Any]) -> None:
        """Multi-path update: keys may be paths below ``path``; None deletes; all or nothing."""
        if not isinstance(values, dict) or not values:
            raise ValueError("update() needs a non-empty dict")
        self._request("PATCH", path, {"print": "silent"}, values)

    def push(self, path: str, value: Any = "") -> str:
        """Store ``value`` under a new server-made push id; returns the id. Not repeated once it may
        have reached the server (a repeat would store a second copy); to make an offline-safe
        create, write to ``new_push_id()`` with :meth:`set`, which is."""
        return self.endpoint.json(self._request("POST", path, None, value))["name"]

    def delete(self, path: str) -> None:
        self._request("DELETE", path, {"print": "silent"})

    # streaming -----------------------------------------------------------------------------

    def listen(self, path: str, callback: Callable[[Event], None],
               on_cancel: Callable[[str], None] | None = None, *,
               on_error: Callable[[ServiceError], None] | None = None,
               on_state: Callable[[str], None] | None = None) -> Listener:
        """Call ``callback`` with the initial value (``put`` at "/") and then every change under
        ``path``, in order, from a background thread; see :class:`Listener`."""
        return Listener(self, path, callback, on_cancel, on_error=on_error, on_state=on_state)

    def mirror(self, path: str, on_change: Callable[[Event], None] | None = None, *,
               on_cancel: Callable[[str], None] | None = None,
               on_error: Callable[[ServiceError], None] | None = None,
               on_state: Callable[[str], None] | None = None) -> Mirror:
        """A live local copy of the subtree at ``path`` (see :class:`Mirror`)."""
        return Mirror(self, path, on_change, on_cancel=on_cancel, on_error=on_error, on_state=on_state)


CONNECTING, CONNECTED, RECONNECTING, CLOSED = "connecting", "connected", "reconnecting", "closed"
STREAM_READ_TIMEOUT_S = 90  # production sends a keep-alive every ~30 s; silence this long is a dead link


class Listener:
    """A background SSE connection to ``path`` that outlives network trouble; ``close()`` stops it.

    * ``callback(event)`` gets the initial value (``put`` at "/") and every change, in order. A
      callback that raises is logged with its traceback and the listener carries on.
    * After a network error, a server restart or the end of the stream it reconnects with backoff,
      asking the token source for a token on every connection; after ``auth_revoked`` or a 401 for
      the token it first renews the token (a :class:`~dermaloop.auth.UserSession` refreshes). Every
      new connection starts with a full ``put`` at "/", so the callback sees the current value again.
    * ``state`` is "connecting", "connected" (live: the initial value has arrived), "reconnecting"
      or "closed"; ``on_state(state)`` hears every change, ``on_error(exc)`` every failure (an app
      shows "offline" on :class:`~dermaloop.errors.Unavailable`).
    * ``on_cancel(reason)`` is called once if the server ends access for good – the rules refuse
      the read, the token cannot be renewed, the request is invalid – and the listener closes.
    """

    def __init__(self, db: UserDatabase, path: str, callback: Callable[[Event], None],
                 on_cancel: Callable[[str], None] | None = None, *,
                 on_error: Callable[[ServiceError], None] | None = None,
                 on_state: Callable[[str], None] | None = None):
        self.db = db
        self.path = path
        self.callback = callback
        self.on_cancel = on_cancel
        self.on_error = on_error
        self.on_state = on_state
        self.state = CONNECTING
        self.reconnects = 0  # connections made after the first one
        self._renewed = False  # whether the current token is one renewed after a refusal
        self._stop = threading.Event()
        self._live = threading.Event()
        self._lock = threading.Lock()  # orders close() against the reader taking up a new response
        self._response: requests.Response | None = None
        # A connection pool of its own: close() and the reader never share a socket with other calls.
        self._http = requests.Session()
        # One attempt per connection: the reconnect loop below does the waiting, and reports it.
        self._endpoint = Endpoint(DatabaseError, db.base_url, self._http, (db.timeout, STREAM_READ_TIMEOUT_S),
                                  NO_RETRY)
        self.thread = threading.Thread(target=self._run, name=f"rtdb-listen:{path}", daemon=True)
        self.thread.start()

    # public ----------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Block until the stream is live (its initial value delivered); False on timeout or close."""
        return self._live.wait(timeout) and not self._stop.is_set()

    def close(self, timeout: float = 5.0) -> None:
        """Stop listening and wait for the thread to end. Safe to call at any moment, from any
        thread (also from inside the callback), and more than once."""
        self._stop.set()
        with self._lock:
            response = self._response
            if response is not None:
                _shutdown(response)  # the reader wakes up with EOF and closes the response itself
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout)

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # the thread ------------------------------------------------------------------------------
    def _set_state(self, state: str) -> None:
        if state == self.state:
            return
        self.state = state
        if state == CONNECTED:
            self._renewed = False  # the token in use was accepted
        if state != CONNECTED:
            self._live.clear()
        if self.on_state is not None:
            self._guarded(self.on_state, state)

    def _guarded(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("listener on %s: %s raised; the listener carries on", self.path,
                          getattr(fn, "__qualname__", fn))

    def _error(self, exc: ServiceError) -> None:
        if self.on_error is not None:
            self._guarded(self.on_error, exc)

    def _cancel(self, reason: str, exc: ServiceError | None = None) -> None:
        if exc is not None:
            self._error(exc)
        if self.on_cancel is not None and not self._stop.is_set():
            self._guarded(self.on_cancel, reason)
        self._stop.set()

    def _renew(self, refused: Unauthenticated | None) -> str | Unavailable | None:
        """Ask the token source for a new token: "renewed", an :class:`Unavailable` to wait on
        (offline: the refresh will be tried again on the next connection), or None when access
        has ended (the listener was cancelled)."""
        try:
            if renew_token(self.db._token):
                return "renewed"
        except Unavailable as exc:
            return exc
        except ServiceError as exc:  # the refresh token was revoked, the account disabled
            self._cancel(exc.message, exc)
            return None
        if refused is None:
            return "renewed"  # a fixed token: nothing to renew, try it again
        self._cancel(refused.message, refused)
        return None

    def _run(self) -> None:
        failures = 0
        try:
            while not self._stop.is_set():
                try:
                    outcome = self._stream_once()
                except Unauthenticated as exc:  # the token, not the rules: renew it once
                    if self._stop.is_set():
                        return
                    if self._renewed:  # a fresh token was refused too
                        self._cancel(exc.message, exc)
                        return
                    outcome = self._renew(exc)
                    if outcome is None:
                        return
                    if outcome == "renewed":
                        self._renewed = True
                        continue
                except PermissionDenied as exc:  # the rules refuse the read
                    self._cancel(exc.message, exc)
                    return
                except Unavailable as exc:
                    outcome = exc
                except ServiceError as exc:  # a bad request or an unknown namespace: retrying cannot help
                    self._cancel(exc.message, exc)
                    return
                except (requests.RequestException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
                    outcome = self._endpoint.translate(exc)
                if self._stop.is_set():
                    return
                if outcome == "cancel":
                    self._cancel("Permission denied")
                    return
                if outcome == "auth_revoked":  # the server says the token ran out: get a new one
                    outcome = self._renew(None)
                    if outcome is None:
                        return
                    if outcome == "renewed":
                        self._renewed = True
                        self._set_state(RECONNECTING)
                        self.reconnects += 1
                        continue
                was_live = self._live.is_set() or self.state == CONNECTED
                if was_live:
                    failures = 0  # this connection had worked
                failures += 1
                if isinstance(outcome, ServiceError):
                    log.log(logging.WARNING if was_live else logging.INFO,
                            "listener on %s: %s; reconnecting", self.path, outcome)
                    self._error(outcome)
                self._set_state(RECONNECTING)
                self._stop.wait(self.db.retry.delay(failures))
                self.reconnects += 1
        except Exception:
            if not self._stop.is_set():
                log.exception("listener on %s stopped by an unexpected error", self.path)
        finally:
            self._stop.set()
            self._set_state(CLOSED)
            self._http.close()

    def _stream_once(self) -> str:
        db = self.db
        response = self._endpoint.request(
            "GET", db.url(self.path), idempotent=True, params=db._params(), stream=True,
            headers={"Accept": "text/event-stream", "Cache-Control": "no-cache"})
        with self._lock:
            if self._stop.is_set():
                response.close()
                return "closed"
            self._response = response
        try:
            _raise_for(response, db.base_url)
            event, data_lines, buffer = None, [], b""
            for chunk in response.iter_content(chunk_size=None):
                if self._stop.is_set():
                    return "closed"
                buffer += chunk
                while b"\n" in buffer:
                    raw, buffer = buffer.split(b"\n", 1)
                    line = raw.decode("utf-8").rstrip("\r")
                    if line:
                        field, _, value = line.partition(":")
                        value = value[1:] if value.startswith(" ") else value
                        if field == "event":
                            event = value
                        elif field == "data":
                            data_lines.append(value)
                        continue
                    outcome = self._dispatch(event, "\n".join(data_lines))
                    event, data_lines = None, []
                    if outcome:
                        return outcome
            return "eof"
        finally:
            with self._lock:
                self._response = None
            response.close()

    def _dispatch(self, event: str | None, data: str) -> str | None:
        if self._stop.is_set():
            return "closed"
        if event in ("put", "patch"):
            payload = json.loads(data)
            parsed = Event(event, payload["path"], payload["data"])
            if self.state != CONNECTED:
                self._set_state(CONNECTED)
            try:
                self.callback(parsed)
            except Exception:
                log.exception("listener on %s: the callback raised on %s at %s; the listener carries on",
                              self.path, parsed.event_type, parsed.path)
            self._live.set()
        elif event == "cancel":
            return "cancel"
        elif event == "auth_revoked":
            return "auth_revoked"  # the next connection asks the token source for a fresh token
        return None


def _shutdown(response: requests.Response) -> None:
    """Shut the socket under a streaming response down, which wakes a thread blocked reading it.
    Only the reading thread closes the response itself (closing it from here raced the reader)."""
    sock = None
    with contextlib.suppress(AttributeError):
        sock = response.raw.connection.sock
    if sock is None:
        with contextlib.suppress(AttributeError):
            sock = response.raw._fp.fp.raw._sock
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


# ---- the local copy ----------------------------------------------------------------------------


def _normalise(value: Any) -> Any:
    """A value as the database stores it: arrays become objects keyed "0", "1"..., nulls and empty
    objects vanish (so a value that is all nulls is itself absent)."""
    if isinstance(value, list):
        value = {str(i): v for i, v in enumerate(value)}
    if isinstance(value, dict):
        out = {}
        for key, child in value.items():
            child = _normalise(child)
            if child is not None:
                out[key] = child
        return out or None
    return value


def _segments(path: str) -> list[str]:
    return [p for p in path.split("/") if p]


class LocalCopy:
    """A copy of one subtree that events are applied to, as Firebase defines them: a ``put`` at a
    path replaces the value there (null deletes it, and parents left empty vanish); a ``patch``
    sets each of its keys, which may be deeper paths (a multi-path update), below its path; a
    ``put`` at "/" replaces everything. ``value`` and ``get(subpath)`` return copies in the shape
    ``UserDatabase.get`` would (objects keyed mostly 0..n come back as arrays)."""

    def __init__(self, value: Any = None):
        self._lock = threading.Lock()
        self._root: Any = _normalise(value)
        self.events = 0  # events applied

    @property
    def value(self) -> Any:
        with self._lock:
            return to_output(copy.deepcopy(self._root))

    def get(self, subpath: str = "") -> Any:
        with self._lock:
            node = self._root
            for key in _segments(subpath):
                node = node.get(key) if isinstance(node, dict) else None
            return to_output(copy.deepcopy(node))

    def apply(self, event: Event) -> None:
        """Apply one listener event to the copy."""
        base = _segments(event.path)
        with self._lock:
            if event.event_type == "put":
                self._set(base, event.data)
            elif event.event_type == "patch" and isinstance(event.data, dict):
                for key, value in event.data.items():
                    self._set(base + _segments(key), value)
            self.events += 1

    def _set(self, segments: list[str], value: Any) -> None:
        value = _normalise(value)
        if not segments:
            self._root = value
            return
        if value is None:
            self._delete(segments)
            return
        if not isinstance(self._root, dict):
            self._root = {}
        node = self._root
        for key in segments[:-1]:
            child = node.get(key)
            if not isinstance(child, dict):
                child = node[key] = {}
            node = child
        node[segments[-1]] = value

    def _delete(self, segments: list[str]) -> None:
        trail: list[tuple[dict, str]] = []
        node = self._root
        for key in segments:
            if not isinstance(node, dict) or key not in node:
                return
            trail.append((node, key))
            node = node[key]
        for parent, key in reversed(trail):
            del parent[key]
            if parent:
                break
            # the parent is now empty: the next round removes it from its own parent
        if isinstance(self._root, dict) and not self._root:
            self._root = None


class Mirror(LocalCopy):
    """A live :class:`LocalCopy` of one subtree, kept by a :class:`Listener`, for apps that must
    show data while offline and react to changes without re-reading.

    Each (re)connection's initial ``put`` at "/" replaces the copy wholesale, so changes missed
    while offline cannot linger. ``on_change(event)`` runs after the event was applied;
    ``synced`` says the copy has been filled by the server at least once (before that, ``value``
    is None for "unknown"); ``state`` is the listener's.
    """

    def __init__(self, db: UserDatabase, path: str, on_change: Callable[[Event], None] | None = None, *,
                 on_cancel: Callable[[str], None] | None = None,
                 on_error: Callable[[ServiceError], None] | None = None,
                 on_state: Callable[[str], None] | None = None):
        super().__init__()
        self.path = path
        self.on_change = on_change
        self._synced = threading.Event()
        self.listener = Listener(db, path, self._apply, on_cancel, on_error=on_error, on_state=on_state)

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    @property
    def state(self) -> str:
        return self.listener.state

    def wait_synced(self, timeout: float | None = None) -> bool:
        return self._synced.wait(timeout)

    def close(self) -> None:
        self.listener.close()

    def __enter__(self) -> Mirror:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _apply(self, event: Event) -> None:
        self.apply(event)
        if event.event_type == "put" and event.path.strip("/") == "":
            self._synced.set()
        if self.on_change is not None:
            self.on_change(event)
