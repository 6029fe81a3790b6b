"""The one way DermaLoop programs reach the Firebase Realtime Database.

* Server programs (cloud worker, retraining) act as admin through firebase-admin's ``db`` module:
  :func:`admin_reference`. Against an emulator (localbase) firebase-admin sends ``Bearer owner``.
* End-user apps (patient app, reviewer portal) act as the signed-in user through the documented REST
  API with ``?auth=<ID token>``, which is what the mobile and web SDKs do underneath:
  :class:`UserDatabase`. Rules (``database.rules.json``) then decide what the user may do, in
  production and in localbase alike.

Which backend answers is decided only by :class:`dermaloop.settings.Settings` (Firebase's standard
emulator variables).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests

from dermaloop.rtdb_wire import PushIds, sort_children
from dermaloop.settings import Settings, load_settings

log = logging.getLogger(__name__)

TokenSource = str | Callable[[], str]


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


class DatabaseError(Exception):
    """A request the database refused; ``status`` is the HTTP status, ``message`` Firebase's text."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class PermissionDenied(DatabaseError):
    """The rules refused the read or write (HTTP 401 ``Permission denied``), or the token is bad."""


@dataclass(frozen=True)
class Event:
    """One change seen by a listener; same fields as firebase-admin's ``db.Event``."""

    event_type: str  # "put" or "patch"
    path: str
    data: Any


def _raise_for(response: requests.Response) -> None:
    if response.status_code < 400:
        return
    try:
        message = response.json().get("error", response.text)
    except ValueError:
        message = response.text
    cls = PermissionDenied if response.status_code == 401 else DatabaseError
    raise cls(response.status_code, str(message))


def _clean(path: str) -> str:
    return "/".join(p for p in path.split("/") if p)


class UserDatabase:
    """The Realtime Database as one signed-in end user sees it (REST + streaming, rules apply).

    ``id_token`` is the user's Firebase ID token, or a function returning a currently valid one
    (called before every request, so a session object can refresh it).
    """

    def __init__(self, id_token: TokenSource, settings: Settings | None = None,
                 session: requests.Session | None = None, timeout: float = 30.0):
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

    def token(self) -> str:
        return self._token() if callable(self._token) else self._token

    def url(self, path: str) -> str:
        return f"{self.base_url}/{_clean(path)}.json"

    def _params(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        params = {**(extra or {}), **self._ns, "auth": self.token()}
        return params

    def _request(self, method: str, path: str, params: dict | None = None, body: Any = None,
                 headers: dict[str, str] | None = None) -> requests.Response:
        data = None if body is None else json.dumps(body, separators=(",", ":"))
        response = self.session.request(method, self.url(path), params=self._params(params), data=data,
                                        headers=headers, timeout=self.timeout)
        if response.status_code != 412:
            _raise_for(response)
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
        value = self._request("GET", path, params).json()
        # Priorities are not in the answer, so "$priority" keeps the server's order.
        if order_by not in (None, "$priority") and isinstance(value, dict):
            value = dict(sort_children(value, order_by))
        return value

    def get_with_etag(self, path: str) -> tuple[Any, str]:
        response = self._request("GET", path, headers={"X-Firebase-ETag": "true"})
        return response.json(), response.headers["ETag"]

    # writes --------------------------------------------------------------------------------

    def set(self, path: str, value: Any) -> None:
        if value is None:
            raise ValueError("set(None) would delete; call delete() to mean it")
        self._request("PUT", path, {"print": "silent"}, value)

    def set_if_match(self, path: str, value: Any, etag: str) -> tuple[bool, Any, str]:
        """Compare-and-set: ``(True, value, new_etag)`` or ``(False, current_value, current_etag)``.
        ``etag="null_etag"`` means "only if absent"."""
        response = self._request("PUT", path, None, value, headers={"if-match": etag})
        ok = response.status_code != 412
        return ok, response.json(), response.headers.get("ETag", "")

    def update(self, path: str, values: dict[str, Any]) -> None:
        """Multi-path update: keys may be paths below ``path``; None deletes; all or nothing."""
        if not isinstance(values, dict) or not values:
            raise ValueError("update() needs a non-empty dict")
        self._request("PATCH", path, {"print": "silent"}, values)

    def push(self, path: str, value: Any = "") -> str:
        """Store ``value`` under a new server-made push id; returns the id."""
        return self._request("POST", path, None, value).json()["name"]

    def delete(self, path: str) -> None:
        self._request("DELETE", path, {"print": "silent"})

    # streaming -----------------------------------------------------------------------------

    def listen(self, path: str, callback: Callable[[Event], None],
               on_cancel: Callable[[str], None] | None = None) -> Listener:
        """Call ``callback`` with the initial value (``put`` at "/") and then every change under
        ``path``, in order, from a background thread. ``on_cancel`` gets a reason when the server
        refuses or ends access (rules). Reconnects on network errors and expired tokens."""
        return Listener(self, path, callback, on_cancel)


class Listener:
    """A background SSE connection; ``close()`` stops it."""

    def __init__(self, db: UserDatabase, path: str, callback: Callable[[Event], None],
                 on_cancel: Callable[[str], None] | None):
        self.db = db
        self.path = path
        self.callback = callback
        self.on_cancel = on_cancel
        self._stop = threading.Event()
        self._response: requests.Response | None = None
        self.thread = threading.Thread(target=self._run, name=f"rtdb-listen:{path}", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self._stop.set()
        response = self._response
        if response is not None:
            with contextlib.suppress(AttributeError, OSError):
                response.raw._fp.fp.raw._sock.shutdown(2)  # unblock the reading thread at once
            response.close()
        self.thread.join(timeout=5)

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                ended = self._stream_once()
                backoff = 0.5
                if ended == "cancel":
                    return
            except PermissionDenied as exc:
                if self.on_cancel:
                    self.on_cancel(exc.message)
                return
            except (requests.RequestException, OSError, ValueError) as exc:
                if self._stop.is_set():
                    return
                log.warning("listener on %s lost its connection (%s); reconnecting", self.path, exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    def _stream_once(self) -> str:
        db = self.db
        response = db.session.get(db.url(self.path), params=db._params(), stream=True, timeout=(db.timeout, 90),
                                  headers={"Accept": "text/event-stream", "Cache-Control": "no-cache"})
        self._response = response
        with response:
            _raise_for(response)
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

    def _dispatch(self, event: str | None, data: str) -> str | None:
        if event in ("put", "patch"):
            payload = json.loads(data)
            self.callback(Event(event, payload["path"], payload["data"]))
        elif event == "cancel":
            if self.on_cancel:
                self.on_cancel("Permission denied")
            return "cancel"
        elif event == "auth_revoked":
            return "reconnect"  # the next connection asks the token source for a fresh token
        return None
