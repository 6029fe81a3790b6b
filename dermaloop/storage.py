"""The one way DermaLoop programs reach Firebase Storage.

* Server programs (cloud worker, retraining) act as admin through google-cloud-storage, via
  firebase-admin's ``storage`` module: :func:`admin_bucket`. Against localbase the client sends no
  credentials (``STORAGE_EMULATOR_HOST``) and rules are bypassed, as with production admin access.
* End-user apps act as the signed-in user through the Firebase Storage REST API (``/v0``) that the
  mobile and web SDKs use, with the user's ID token: :class:`UserStorage`. ``storage.rules`` decides
  what they may do, in production and in localbase alike.

Uploads use the resumable protocol in chunks, so a dropped connection costs one chunk, not the
whole photo, and – given an :class:`UploadSessionStore` such as :class:`FileSessionStore` – an
upload started by a process that died is finished by the next one from the byte the server reports
as received. Errors are :mod:`dermaloop.errors` classes (``StorageError`` is this service's).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol
from urllib.parse import parse_qs, quote, urlsplit

import requests

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
from dermaloop.settings import Settings, load_settings

__all__ = [
    "CHUNK_BYTES", "FileSessionStore", "ListPage", "NotFound", "PermissionDenied", "StorageError",
    "UploadSessionStore", "UserStorage", "admin_bucket",
]

PRODUCTION_BASE = "https://firebasestorage.googleapis.com"
CHUNK_BYTES = 1024 * 1024  # a multiple of 256 KiB, as the protocol wants


def admin_bucket(settings: Settings | None = None, app_name: str | None = None):
    """The project's default bucket as a google-cloud-storage ``Bucket`` with admin rights.

    Against an emulator the endpoint is passed to the client explicitly (what
    ``STORAGE_EMULATOR_HOST`` would do), so one process can hold buckets of two backends.
    """
    settings = settings or load_settings()
    if settings.storage_emulator_host:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage as gcs

        client = gcs.Client(
            project=settings.project_id,
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": settings.storage_emulator_host},
        )
        return client.bucket(settings.storage_bucket)
    from firebase_admin import storage

    from dermaloop.admin_app import get_app

    return storage.bucket(app=get_app(settings, name=app_name))


class StorageError(ServiceError):
    """A request Storage refused or could not serve; ``status`` is the HTTP status and ``message``
    the server's text. What is raised is also an instance of the kind of failure
    (:mod:`dermaloop.errors`: PermissionDenied for storage.rules, NotFound, Unauthenticated,
    Unavailable ...)."""

    service = "Storage"


_KIND_BY_STATUS = {400: InvalidArgument, 401: Unauthenticated, 403: PermissionDenied, 404: NotFound,
                   409: Conflict, 410: NotFound, 412: Conflict, 413: InvalidArgument}


def _raise_for(response: requests.Response, address: str | None = None) -> None:
    if response.ok:
        return
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:300] or response.reason
    cls = error_class(StorageError, _KIND_BY_STATUS.get(response.status_code))
    raise cls(f"HTTP {response.status_code}: {message}", message=str(message), status=response.status_code,
              address=address)


class UploadSessionStore(Protocol):
    """Where an upload keeps its resumable session URL so that another process can finish it.

    Use one store per upload (per photo). The URL lets its holder add bytes to the upload, so keep
    it as private as the photo."""

    def load(self) -> str | None: ...

    def save(self, url: str) -> None: ...

    def clear(self) -> None: ...


class FileSessionStore:
    """An :class:`UploadSessionStore` in a small JSON file, replaced atomically (write, fsync,
    rename), so a crash at any moment leaves either the old URL or the new one."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    def load(self) -> str | None:
        try:
            url = json.loads(self.path.read_text()).get("url")
        except (OSError, ValueError, AttributeError):
            return None
        return url if isinstance(url, str) and url else None

    def save(self, url: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.tmp")
        with open(temp, "w") as fh:
            json.dump({"url": url}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, self.path)

    def clear(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


@dataclass
class ListPage:
    items: list[str]
    prefixes: list[str]
    next_page_token: str | None


class UserStorage:
    """Firebase Storage as a signed-in user (``/v0`` with ``Authorization: Firebase <ID token>``).

    Reads, metadata calls, resumable starts, chunks (sent at the offset the server confirmed) and
    deletes are retried on network errors, 5xx and 429 as ``retry`` says. When the server calls
    the token expired or revoked and the source can renew it (a UserSession), the request is sent
    once more with a fresh token."""

    def __init__(self, id_token: TokenSource | None, settings: Settings | None = None,
                 bucket: str | None = None, http: requests.Session | None = None, timeout: float = 60,
                 retry: RetryPolicy | None = None):
        self.settings = settings or load_settings()
        self._token = id_token
        self.bucket = bucket or self.settings.storage_bucket
        self.http = http or requests.Session()
        self.timeout = timeout
        address = (self.settings.storage_emulator_host or PRODUCTION_BASE).rstrip("/")
        self.base = f"{address}/v0/b/{quote(self.bucket, safe='')}/o"
        self.endpoint = Endpoint(StorageError, address, self.http, timeout, retry)

    def _headers(self) -> dict[str, str]:
        token = current_token(self._token)
        return {} if token is None else {"Authorization": f"Firebase {token}"}

    def object_url(self, path: str) -> str:
        return f"{self.base}/{quote(path, safe='')}"

    def _request(self, method: str, url: str, *, idempotent: bool = True, retry: RetryPolicy | None = None,
                 **kwargs: Any) -> requests.Response:
        extra = kwargs.pop("headers", {})
        renewed = False
        while True:
            response = self.endpoint.request(method, url, idempotent=idempotent, retry=retry,
                                             headers={**self._headers(), **extra}, **kwargs)
            try:
                _raise_for(response, self.endpoint.address)
            except Unauthenticated:
                # A 401 means nothing was done: safe to send again with a renewed token.
                if renewed or not renew_token(self._token):
                    raise
                renewed = True
                continue
            return response

    # uploads ---------------------------------------------------------------------------------
    def upload(self, path: str, data: bytes | BinaryIO, content_type: str,
               metadata: dict[str, str] | None = None, chunk_bytes: int = CHUNK_BYTES, *,
               session_store: UploadSessionStore | None = None,
               on_progress: Callable[[int, int], None] | None = None,
               multipart: bool = False) -> dict[str, Any]:
        """Store ``data`` at ``path``; returns the object's metadata (with ``downloadTokens``).

        The resumable protocol is used (``multipart=True`` sends one request instead, which cannot
        resume). With a ``session_store`` the session URL is saved as soon as the server made it
        and cleared when the upload is done; an upload whose URL is found there continues from
        the byte the server reports as received, so a process killed mid-upload loses nothing
        when the next one calls ``upload`` again with the same store (an expired or unknown session
        starts afresh). ``on_progress(bytes_on_server, total)`` is called when the starting point
        is known and after every chunk."""
        if isinstance(data, bytes | bytearray | memoryview):
            data = io.BytesIO(bytes(data))
        size = data.seek(0, io.SEEK_END)
        data.seek(0)
        if multipart:
            return self._upload_multipart(path, data.read(), content_type, metadata)
        if chunk_bytes <= 0:
            raise ValueError("chunk_bytes must be positive")
        return self._upload_resumable(path, data, size, content_type, metadata, chunk_bytes, session_store,
                                      on_progress)

    def _upload_multipart(self, path: str, payload: bytes, content_type: str,
                          metadata: dict[str, str] | None) -> dict[str, Any]:
        boundary = secrets.token_hex(16)
        meta = {"name": path, "contentType": content_type, "metadata": metadata or {}}
        body = b"".join([
            f"--{boundary}\r\nContent-Type: application/json; charset=utf-8\r\n\r\n".encode(),
            json.dumps(meta).encode(),
            f"\r\n--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode(),
            payload,
            f"\r\n--{boundary}--".encode(),
        ])
        headers = {"X-Goog-Upload-Protocol": "multipart", "Content-Type": f"multipart/related; boundary={boundary}"}
        return self.endpoint.json(self._request("POST", self.base, idempotent=False, params={"name": path},
                                                data=body, headers=headers))

    def _start(self, path: str, size: int, content_type: str, metadata: dict[str, str] | None) -> str:
        # Repeating a start is harmless: an unused session just expires.
        start = self._request(
            "POST", self.base, params={"name": path},
            json={"name": path, "contentType": content_type, "metadata": metadata or {}},
            headers={"X-Goog-Upload-Protocol": "resumable", "X-Goog-Upload-Command": "start",
                     "X-Goog-Upload-Header-Content-Length": str(size),
                     "X-Goog-Upload-Header-Content-Type": content_type},
        )
        url = start.headers.get("X-Goog-Upload-URL")
        if not url:
            raise error_class(StorageError, None)("the resumable start answered without X-Goog-Upload-URL",
                                                  status=start.status_code, address=self.endpoint.address)
        return url

    def _ours(self, url: str, path: str) -> bool:
        """Whether a saved session URL belongs to an upload of ``path`` to this bucket and backend."""
        saved, base = urlsplit(url), urlsplit(self.base)
        names = parse_qs(saved.query).get("name")
        return (saved.netloc == base.netloc and saved.path.rstrip("/") == base.path.rstrip("/")
                and "upload_id" in parse_qs(saved.query) and (names is None or names[0] == path))

    def _resume_point(self, url: str, path: str, size: int) -> int | dict[str, Any] | None:
        """Where a saved session stands: the bytes received (an int), the finished object's
        metadata (a dict) or None if it cannot be continued."""
        if not self._ours(url, path):
            return None
        try:
            status, received = self._query(url)
        except Unauthenticated:
            raise
        except (NotFound, PermissionDenied):  # 404 / 410: expired or unknown; 403: another user's
            return None
        if status == "active":
            return received if received <= size else None
        with contextlib.suppress(NotFound):  # "final": did it finish with our bytes?
            meta = self.metadata(path)
            if int(meta.get("size", -1)) == size:
                return meta
        return None

    def _upload_resumable(self, path: str, stream: BinaryIO, size: int, content_type: str,
                          metadata: dict[str, str] | None, chunk_bytes: int,
                          store: UploadSessionStore | None,
                          on_progress: Callable[[int, int], None] | None) -> dict[str, Any]:
        url, offset = None, 0
        saved = store.load() if store is not None else None
        if saved:
            point = self._resume_point(saved, path, size)
            if isinstance(point, dict):
                store.clear()
                if on_progress:
                    on_progress(size, size)
                return point
            if point is not None:
                url, offset = saved, point
        if url is None:
            url = self._start(path, size, content_type, metadata)
            if store is not None:
                store.save(url)
        if on_progress:
            on_progress(offset, size)
        policy, failures, restarted = self.endpoint.retry, 0, False
        while True:
            stream.seek(offset)
            chunk = stream.read(chunk_bytes)
            last = offset + len(chunk) >= size
            command = "upload, finalize" if last else "upload"
            try:
                # One attempt: after a failure the server is asked how much it kept (query), as
                # the protocol wants, instead of sending the same bytes blindly.
                response = self._request("POST", url, retry=NO_RETRY, data=chunk,
                                         headers={"X-Goog-Upload-Command": command,
                                                  "X-Goog-Upload-Offset": str(offset)})
            except Unavailable as exc:
                failures += 1
                if failures >= policy.attempts:
                    raise
                self.endpoint.sleep(policy.delay(failures, exc.retry_after))
                point = self._resume_point(url, path, size)
                if isinstance(point, dict):  # the lost answer was the final one
                    if store is not None:
                        store.clear()
                    return point
                if point is not None:
                    offset = point
                    continue
            except NotFound:
                pass
            else:
                failures = 0
                if last:
                    if store is not None:
                        store.clear()
                    if on_progress:
                        on_progress(size, size)
                    return self.endpoint.json(response)
                offset += len(chunk)
                if on_progress:
                    on_progress(offset, size)
                continue
            # The session expired or ended under us: start again, once.
            if restarted:
                raise error_class(StorageError, NotFound)(
                    "the resumable upload session ended twice before the upload was done",
                    status=404, address=self.endpoint.address)
            restarted, offset = True, 0
            url = self._start(path, size, content_type, metadata)
            if store is not None:
                store.save(url)

    def _query(self, upload_url: str) -> tuple[str, int]:
        """``(status, bytes received)`` of a resumable session (status "active" or "final")."""
        response = self._request("POST", upload_url, headers={"X-Goog-Upload-Command": "query"})
        status = response.headers.get("X-Goog-Upload-Status", "active").lower()
        return status, int(response.headers.get("X-Goog-Upload-Size-Received", "0"))

    def _received(self, upload_url: str) -> int:
        return self._query(upload_url)[1]

    # reads -----------------------------------------------------------------------------------
    def download(self, path: str, start: int | None = None, end: int | None = None) -> bytes:
        """The object's bytes (``start``..``end`` inclusive when given)."""
        headers = {}
        if start is not None or end is not None:
            headers["Range"] = f"bytes={start or 0}-{'' if end is None else end}"
        return self._request("GET", self.object_url(path), params={"alt": "media"}, headers=headers).content

    def metadata(self, path: str) -> dict[str, Any]:
        return self.endpoint.json(self._request("GET", self.object_url(path)))

    def download_url(self, path: str) -> str:
        """A ``getDownloadURL()``-style link that works without a token (keep it private)."""
        token = (self.metadata(path).get("downloadTokens") or "").split(",")[0]
        return f"{self.object_url(path)}?alt=media&token={token}"

    def update_metadata(self, path: str, changes: dict[str, Any]) -> dict[str, Any]:
        return self.endpoint.json(self._request("PATCH", self.object_url(path), json=changes))

    def list(self, prefix: str = "", page_size: int | None = None, page_token: str | None = None) -> ListPage:
        """One page of a folder listing (``prefix`` empty or ending in ``/``)."""
        params: dict[str, Any] = {"prefix": prefix, "delimiter": "/"}
        if page_size:
            params["maxResults"] = page_size
        if page_token:
            params["pageToken"] = page_token
        body = self.endpoint.json(self._request("GET", self.base, params=params))
        return ListPage([i["name"] for i in body.get("items", [])], body.get("prefixes", []), body.get("nextPageToken"))

    def list_all(self, prefix: str = "", page_size: int = 1000) -> Iterator[str]:
        token = None
        while True:
            page = self.list(prefix, page_size, token)
            yield from page.items
            if not page.next_page_token:
                return
            token = page.next_page_token

    def delete(self, path: str) -> None:
        """Delete the object (:class:`~dermaloop.errors.NotFound` if there is none)."""
        self._request("DELETE", self.object_url(path))
