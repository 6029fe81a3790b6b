"""JSON shapes of the two Storage APIs and the request helpers they share."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import web

from localbase.storage.store import Digest

CHUNK = 256 * 1024
# The only stored types a browser may render in place: the photo formats the apps upload. Anything
# else is served as a download, so an object a user uploaded cannot run as a page of this origin.
INLINE_TYPES = frozenset({"image/jpeg", "image/png", "image/webp", "image/heic", "image/heif"})
_TOKEN = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
_MEDIA_TYPE = re.compile(rf"^{_TOKEN}/{_TOKEN}(?:\s*;\s*{_TOKEN}=(?:{_TOKEN}|\"[^\"\\\r\n]*\"))*\Z")
_ACTIVE = ("html", "xml", "svg", "script", "css", "x-mixed-replace")
SAFE_TYPE = "application/octet-stream"


class BodyTooLarge(Exception):
    pass


class BadRequest(ValueError):
    pass


async def append_chunk(part: Path, request: web.Request, received: int, limit: int, skip: int) -> int:
    """Append a resumable upload's chunk to its part file from byte ``received`` on; returns the new
    size. The part is fsynced even when the client drops mid-chunk, so the size the server then
    reports as received is what is on disk (both upload APIs resume from it)."""
    with open(part, "r+b") as fh:
        fh.seek(received)
        try:
            await stream_body(request, fh, limit, skip=skip)
        finally:
            fh.flush()
            await asyncio.to_thread(os.fsync, fh.fileno())
            received = fh.tell()
    return received


async def json_object_body(request: web.Request, required: bool = False) -> dict[str, Any]:
    """The request's JSON object body. No body is ``{}`` unless one is required: the clients send
    none for "no changes" (``blob.patch()``) or for a resumable start without metadata."""
    raw = await request.read()
    if not raw.strip():
        if required:
            raise BadRequest("body is not valid JSON")
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        raise BadRequest("body is not valid JSON") from None
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    return body


def rfc3339(ms: int) -> str:
    stamp = dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


def etag(row: dict[str, Any]) -> str:
    raw = hashlib.sha1(f"{row['generation']}/{row['metageneration']}/{row['md5']}".encode()).digest()
    return base64.b64encode(raw).decode().rstrip("=")


def base_url(request: web.Request) -> str:
    """Links use the Host the client used, so proxies and remapped ports keep working (gotcha 3)."""
    return f"{request.scheme}://{request.host}"


def enc(name: str) -> str:
    return quote(name, safe="")


def custom_metadata(row: dict[str, Any], with_tokens: bool) -> dict[str, str]:
    metadata = json.loads(row["metadata"])
    if with_tokens and row["download_tokens"]:
        metadata["firebaseStorageDownloadTokens"] = row["download_tokens"]
    return metadata


def gcs_object(row: dict[str, Any], base: str) -> dict[str, Any]:
    bucket, name, gen = row["bucket"], row["name"], row["generation"]
    created = rfc3339(row["time_created"])
    out: dict[str, Any] = {
        "kind": "storage#object",
        "id": f"{bucket}/{name}/{gen}",
        "selfLink": f"{base}/storage/v1/b/{enc(bucket)}/o/{enc(name)}",
        "mediaLink": f"{base}/download/storage/v1/b/{enc(bucket)}/o/{enc(name)}?generation={gen}&alt=media",
        "name": name,
        "bucket": bucket,
        "generation": str(gen),
        "metageneration": str(row["metageneration"]),
        "contentType": row["content_type"] or "application/octet-stream",
        "storageClass": "STANDARD",
        "size": str(row["size"]),
        "md5Hash": row["md5"],
        "crc32c": row["crc32c"],
        "etag": etag(row),
        "timeCreated": created,
        "updated": rfc3339(row["updated"]),
        "timeStorageClassUpdated": created,
    }
    for key, column in (("cacheControl", "cache_control"), ("contentDisposition", "content_disposition"),
                        ("contentEncoding", "content_encoding"), ("contentLanguage", "content_language"),
                        ("customTime", "custom_time")):
        if row[column]:
            out[key] = row[column]
    metadata = custom_metadata(row, with_tokens=True)
    if metadata:
        out["metadata"] = metadata
    return out


def firebase_metadata(row: dict[str, Any]) -> dict[str, Any]:
    """The ``/v0`` FirebaseMetadata shape (crc32c as a decimal string, as the emulator sends it)."""
    out: dict[str, Any] = {
        "name": row["name"],
        "bucket": row["bucket"],
        "generation": str(row["generation"]),
        "metageneration": str(row["metageneration"]),
        "contentType": row["content_type"] or "application/octet-stream",
        "timeCreated": rfc3339(row["time_created"]),
        "updated": rfc3339(row["updated"]),
        "storageClass": "STANDARD",
        "size": str(row["size"]),
        "md5Hash": row["md5"],
        "crc32c": str(Digest(row["size"], row["md5"], row["crc32c"]).crc32c_int),
        "etag": etag(row),
        "downloadTokens": row["download_tokens"] or "",
        "contentEncoding": row["content_encoding"] or "identity",
        "contentDisposition": row["content_disposition"] or "inline",
        "metadata": custom_metadata(row, with_tokens=False),
    }
    if row["cache_control"]:
        out["cacheControl"] = row["cache_control"]
    if row["content_language"]:
        out["contentLanguage"] = row["content_language"]
    return out


def rules_resource(row: dict[str, Any] | None) -> dict[str, Any] | None:
    """An object as security rules see it (``resource``): sizes and generations are numbers."""
    if row is None:
        return None
    meta = firebase_metadata(row)
    return {
        "name": row["name"], "bucket": row["bucket"], "generation": row["generation"],
        "metageneration": row["metageneration"], "size": row["size"], "timeCreated": meta["timeCreated"],
        "updated": meta["updated"], "md5Hash": row["md5"], "crc32c": row["crc32c"], "etag": meta["etag"],
        "contentDisposition": meta["contentDisposition"], "contentEncoding": meta["contentEncoding"],
        "contentType": meta["contentType"], "metadata": meta["metadata"],
    }


def served_type(stored: str | None) -> tuple[str, bool]:
    """(the Content-Type a download is served with, whether a browser may show it inline).

    A stored type that is not exactly one well-formed media type (say ``image/png, text/html``,
    which passes a rule like ``contentType.matches('image/.*')`` but which a browser reads as HTML)
    or one a browser would execute (HTML, SVG, XML, scripts, style sheets) is served as
    ``application/octet-stream``; only the photo types are shown inline."""
    raw = (stored or "").strip()
    if not raw:
        return SAFE_TYPE, False
    if len(raw) > 200 or not _MEDIA_TYPE.match(raw):
        return SAFE_TYPE, False
    essence = raw.split(";", 1)[0].strip().lower()
    if essence in INLINE_TYPES:
        return essence, True
    if any(marker in essence for marker in _ACTIVE):
        return SAFE_TYPE, False
    return raw, False


def download_headers(row: dict[str, Any], filename: str | None = None) -> dict[str, str]:
    """Headers of a media download (both APIs): never sniffed, and a download rather than a page
    unless the object is a photo. ``filename`` names the file in ``Content-Disposition``."""
    content_type, inline = served_type(row["content_type"])
    disposition = "inline" if inline else "attachment"
    if filename is not None:
        disposition += f"; filename*=utf-8''{quote(filename)}"
    headers = {
        "Content-Type": content_type,
        "X-Content-Type-Options": "nosniff",
        "x-goog-hash": f"crc32c={row['crc32c']},md5={row['md5']}",
        "x-goog-generation": str(row["generation"]),
        "x-goog-metageneration": str(row["metageneration"]),
        "x-goog-stored-content-length": str(row["size"]),
        "x-goog-storage-class": "STANDARD",
        "Accept-Ranges": "bytes",
    }
    if row["cache_control"]:
        headers["Cache-Control"] = row["cache_control"]
    if row["content_language"]:
        headers["Content-Language"] = row["content_language"]
    if filename is not None or not inline:
        headers["Content-Disposition"] = disposition
    return headers


async def stream_body(request: web.Request, fh, limit: int, skip: int = 0) -> int:
    """Copy the request body into ``fh`` (dropping the first ``skip`` bytes); bytes written.

    Raises BodyTooLarge past ``limit``; a broken connection propagates (the caller cleans up).
    """
    written = 0
    async for chunk in request.content.iter_chunked(CHUNK):
        if skip:
            drop = min(skip, len(chunk))
            chunk, skip = chunk[drop:], skip - drop
        written += len(chunk)
        if written > limit:
            raise BodyTooLarge(f"body larger than {limit} bytes")
        fh.write(chunk)
    return written


async def stream_part(part, fh, limit: int) -> int:
    written = 0
    while chunk := await part.read_chunk(CHUNK):
        written += len(chunk)
        if written > limit:
            raise BodyTooLarge(f"upload larger than {limit} bytes")
        fh.write(chunk)
    return written


async def read_multipart(request: web.Request, temp: Path, limit: int) -> dict[str, Any]:
    """Parse a ``multipart/related`` upload: JSON metadata part, then the bytes into ``temp``.

    Only a body that ends with its closing boundary is accepted, so a truncated upload is refused
    instead of being stored short.
    """
    try:
        reader = await request.multipart()
        meta_part = await reader.next()
        if meta_part is None:
            raise BadRequest("multipart body has no parts")
        raw = await meta_part.read()
        if len(raw) > 1024 * 1024:
            raise BadRequest("metadata part is too large")
        try:
            metadata = json.loads(raw) if raw.strip() else {}
        except (ValueError, RecursionError):
            raise BadRequest("metadata part is not valid JSON") from None
        if not isinstance(metadata, dict):
            raise BadRequest("metadata part must be a JSON object")
        data_part = await reader.next()
        if data_part is None:
            raise BadRequest("multipart body has no media part")
        media_type = data_part.headers.get("Content-Type")
        with open(temp, "wb") as fh:
            await stream_part(data_part, fh, limit)
        if await reader.next() is not None:
            raise BadRequest("multipart body has more than two parts")
    except (BadRequest, BodyTooLarge):
        raise
    except (ValueError, AssertionError, RuntimeError) as exc:
        raise BadRequest(f"malformed or truncated multipart body: {exc}") from None
    except Exception as exc:  # aiohttp's payload and header errors
        if type(exc).__name__ in ("InvalidHeader", "BadHttpMessage", "LineTooLong", "ContentLengthError",
                                  "TransferEncodingError", "ClientPayloadError"):
            raise BadRequest(f"malformed or truncated multipart body: {exc}") from None
        raise
    if media_type and "contentType" not in metadata:
        metadata["contentType"] = media_type
    return metadata


def discard(path: Path) -> None:
    Path(path).unlink(missing_ok=True)
