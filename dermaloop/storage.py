"""The one way DermaLoop programs reach Firebase Storage.

* Server programs (cloud worker, retraining) act as admin through google-cloud-storage, via
  firebase-admin's ``storage`` module: :func:`admin_bucket`. Against localbase the client sends no
  credentials (``STORAGE_EMULATOR_HOST``) and rules are bypassed, as with production admin access.
* End-user apps act as the signed-in user through the Firebase Storage REST API (``/v0``) that the
  mobile and web SDKs use, with the user's ID token: :class:`UserStorage`. ``storage.rules`` decides
  what they may do, in production and in localbase alike.

Large uploads use the resumable protocol in chunks, so a dropped connection costs one chunk, not
the whole photo; :meth:`UserStorage.upload` resumes from what the server reports as received.
"""

from __future__ import annotations

import io
import json
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO
from urllib.parse import quote

import requests

from dermaloop.settings import Settings, load_settings

PRODUCTION_BASE = "https://firebasestorage.googleapis.com"
RESUMABLE_THRESHOLD = 5 * 1024 * 1024
CHUNK_BYTES = 1024 * 1024  # a multiple of 256 KiB, as the protocol wants
MAX_CHUNK_RETRIES = 5

TokenSource = str | Callable[[], str]


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


class StorageError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


class PermissionDenied(StorageError):
    """storage.rules refused the request (403)."""


class NotFound(StorageError):
    pass


def _raise_for(response: requests.Response) -> None:
    if response.ok:
        return
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:300] or response.reason
    kind = {403: PermissionDenied, 404: NotFound}.get(response.status_code, StorageError)
    raise kind(response.status_code, message)


@dataclass
class ListPage:
    items: list[str]
    prefixes: list[str]
    next_page_token: str | None


class UserStorage:
    """Firebase Storage as a signed-in user (``/v0`` with ``Authorization: Firebase <ID token>``)."""

    def __init__(self, id_token: TokenSource | None, settings: Settings | None = None,
                 bucket: str | None = None, http: requests.Session | None = None, timeout: float = 60):
        self.settings = settings or load_settings()
        self._token = id_token
        self.bucket = bucket or self.settings.storage_bucket
        self.http = http or requests.Session()
        self.timeout = timeout
        base = self.settings.storage_emulator_host or PRODUCTION_BASE
        self.base = f"{base.rstrip('/')}/v0/b/{quote(self.bucket, safe='')}/o"

    def _headers(self) -> dict[str, str]:
        if self._token is None:
            return {}
        token = self._token() if callable(self._token) else self._token
        return {"Authorization": f"Firebase {token}"}

    def object_url(self, path: str) -> str:
        return f"{self.base}/{quote(path, safe='')}"

    def _request(self, method: str, url: str, **kwargs) -> requests.Response:
        headers = {**self._headers(), **kwargs.pop("headers", {})}
        response = self.http.request(method, url, headers=headers, timeout=self.timeout, **kwargs)
        _raise_for(response)
        return response

    # uploads ---------------------------------------------------------------------------------
    def upload(self, path: str, data: bytes | BinaryIO, content_type: str,
               metadata: dict[str, str] | None = None, chunk_bytes: int = CHUNK_BYTES,
               resumable_threshold: int = RESUMABLE_THRESHOLD) -> dict[str, Any]:
        """Store ``data`` at ``path``; returns the object's metadata (with ``downloadTokens``)."""
        if isinstance(data, bytes | bytearray | memoryview):
            data = io.BytesIO(bytes(data))
        size = data.seek(0, io.SEEK_END)
        data.seek(0)
        if size <= resumable_threshold:
            return self._upload_multipart(path, data.read(), content_type, metadata)
        return self._upload_resumable(path, data, size, content_type, metadata, chunk_bytes)

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
        return self._request("POST", self.base, params={"name": path}, data=body, headers=headers).json()

    def _upload_resumable(self, path: str, stream: BinaryIO, size: int, content_type: str,
                          metadata: dict[str, str] | None, chunk_bytes: int) -> dict[str, Any]:
        start = self._request(
            "POST", self.base, params={"name": path},
            json={"name": path, "contentType": content_type, "metadata": metadata or {}},
            headers={"X-Goog-Upload-Protocol": "resumable", "X-Goog-Upload-Command": "start",
                     "X-Goog-Upload-Header-Content-Length": str(size),
                     "X-Goog-Upload-Header-Content-Type": content_type},
        )
        url = start.headers["X-Goog-Upload-URL"]
        offset, failures = 0, 0
        while True:
            stream.seek(offset)
            chunk = stream.read(chunk_bytes)
            last = offset + len(chunk) >= size
            command = "upload, finalize" if last else "upload"
            try:
                response = self._request("POST", url, data=chunk,
                                         headers={"X-Goog-Upload-Command": command, "X-Goog-Upload-Offset": str(offset)})
            except (requests.ConnectionError, requests.Timeout):
                failures += 1
                if failures > MAX_CHUNK_RETRIES:
                    raise
                time.sleep(min(2**failures * 0.1, 5))
                offset = self._received(url)  # resume from what the server kept
                continue
            if last:
                return response.json()
            offset += len(chunk)

    def _received(self, upload_url: str) -> int:
        response = self._request("POST", upload_url, headers={"X-Goog-Upload-Command": "query"})
        return int(response.headers.get("X-Goog-Upload-Size-Received", "0"))

    # reads -----------------------------------------------------------------------------------
    def download(self, path: str, start: int | None = None, end: int | None = None) -> bytes:
        """The object's bytes (``start``..``end`` inclusive when given)."""
        headers = {}
        if start is not None or end is not None:
            headers["Range"] = f"bytes={start or 0}-{'' if end is None else end}"
        return self._request("GET", self.object_url(path), params={"alt": "media"}, headers=headers).content

    def metadata(self, path: str) -> dict[str, Any]:
        return self._request("GET", self.object_url(path)).json()

    def download_url(self, path: str) -> str:
        """A ``getDownloadURL()``-style link that works without a token (keep it private)."""
        token = (self.metadata(path).get("downloadTokens") or "").split(",")[0]
        return f"{self.object_url(path)}?alt=media&token={token}"

    def update_metadata(self, path: str, changes: dict[str, Any]) -> dict[str, Any]:
        return self._request("PATCH", self.object_url(path), json=changes).json()

    def list(self, prefix: str = "", page_size: int | None = None, page_token: str | None = None) -> ListPage:
        """One page of a folder listing (``prefix`` empty or ending in ``/``)."""
        params: dict[str, Any] = {"prefix": prefix, "delimiter": "/"}
        if page_size:
            params["maxResults"] = page_size
        if page_token:
            params["pageToken"] = page_token
        body = self._request("GET", self.base, params=params).json()
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
        self._request("DELETE", self.object_url(path))
