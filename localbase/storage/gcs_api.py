"""The Cloud Storage JSON API as google-cloud-storage (and so firebase_admin.storage) uses it.

In emulator mode the client sends no credentials (firebase-protocols.md, gotcha 1), so this API is
admin and bypasses storage.rules, like the official emulator's; in secure mode it answers only
programs on this machine and callers presenting the admin credential (see localbase.storage).
Downloads carry ``resources.download_headers`` (never sniffed; only photos inline). Unlike that
emulator it implements chunked resumable uploads (308 + ``Range``), preconditions, PATCH,
copy/rewrite and the bucket resource the 3.x client polls.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from aiohttp import web

from localbase.storage import resources as res
from localbase.storage.store import (
    SETTABLE,
    InvalidName,
    NotFound,
    ObjectStore,
    PreconditionFailed,
    check_preconditions,
    validate_name,
)

MAX_OBJECT_BYTES = 5 * 1024**3
_RANGE = re.compile(r"^bytes (?:(\d+)-(\d+)|\*)/(\d+|\*)$")
_PRECONDITIONS = ("ifGenerationMatch", "ifGenerationNotMatch", "ifMetagenerationMatch", "ifMetagenerationNotMatch")


def gcs_error(status: int, message: str, reason: str) -> web.Response:
    body = {"error": {"code": status, "message": message,
                      "errors": [{"message": message, "domain": "global", "reason": reason}]}}
    return web.json_response(body, status=status)


def not_found(bucket: str, name: str) -> web.Response:
    return gcs_error(404, f"No such object: {bucket}/{name}", "notFound")


def precondition_failed() -> web.Response:
    return gcs_error(412, "At least one of the pre-conditions you specified did not hold.", "conditionNotMet")


def bad_request(message: str) -> web.Response:
    return gcs_error(400, message, "invalid")


def preconditions(query, prefix: str = "") -> dict[str, int]:
    out = {}
    for key in _PRECONDITIONS:
        name = prefix + (key[0].upper() + key[1:] if prefix else key)
        if name in query:
            try:
                out[key] = int(query[name])
            except ValueError:
                raise res.BadRequest(f"{name} must be an integer") from None
    return out


def bucket_resource(bucket: str) -> dict[str, Any]:
    return {"kind": "storage#bucket", "id": bucket, "name": bucket, "projectNumber": "123456789",
            "location": "US", "locationType": "multi-region", "storageClass": "STANDARD",
            "metageneration": "1", "etag": "CAE=", "timeCreated": "2026-01-01T00:00:00.000Z",
            "updated": "2026-01-01T00:00:00.000Z"}


class GcsApi:
    def __init__(self, store: ObjectStore, default_bucket: str):
        self.store = store
        self.default_bucket = default_bucket
        self._session_locks: dict[str, asyncio.Lock] = {}

    async def handle(self, request: web.Request, seg: list[str]) -> web.StreamResponse:
        """``seg`` are the decoded path segments; returns a response or raises web.HTTPNotFound."""
        try:
            return await self._route(request, seg)
        except res.BadRequest as exc:
            return bad_request(str(exc))
        except InvalidName as exc:
            return bad_request(f"Invalid object name: {exc}")
        except PreconditionFailed:
            return precondition_failed()
        except res.BodyTooLarge as exc:
            return gcs_error(413, f"Payload too large: {exc}", "uploadTooLarge")
        except RecursionError:
            return bad_request("Request body nested too deeply.")

    async def _route(self, request: web.Request, seg: list[str]) -> web.StreamResponse:
        method = "GET" if request.method == "HEAD" else request.method  # aiohttp drops HEAD bodies
        if seg[:1] == ["upload"] and seg[1:4] == ["storage", "v1", "b"] and len(seg) == 6 and seg[5] == "o":
            return await self.upload(request, seg[4])
        if seg[:1] == ["download"]:
            seg = seg[1:]
            if len(seg) == 6 and seg[:3] == ["storage", "v1", "b"] and seg[4] == "o" and method == "GET":
                return await self.download(request, seg[3], seg[5])
            raise web.HTTPNotFound()
        if seg[:2] == ["storage", "v1"]:
            seg = seg[2:]
        if seg == ["b"] and method == "GET":
            names = sorted({self.default_bucket, *self.store.buckets()})
            return web.json_response({"kind": "storage#buckets", "items": [bucket_resource(b) for b in names]})
        if len(seg) == 2 and seg[0] == "b" and method == "GET":
            return web.json_response(bucket_resource(seg[1]))
        if len(seg) == 3 and seg[0] == "b" and seg[2] == "o" and method == "GET":
            return self.list(request, seg[1])
        if len(seg) >= 4 and seg[0] == "b" and seg[2] == "o":
            bucket, name, rest = seg[1], seg[3], seg[4:]
            if not rest:
                if method == "GET":
                    if request.query.get("alt") == "media":
                        return await self.download(request, bucket, name)
                    return self.get(request, bucket, name)
                if method in ("PATCH", "PUT"):
                    return await self.patch(request, bucket, name, replace=method == "PUT")
                if method == "DELETE":
                    return self.delete(request, bucket, name)
            if rest == ["acl"] and method == "GET":
                return web.json_response({"kind": "storage#objectAccessControls", "items": []})
            if len(rest) == 5 and rest[0] in ("copyTo", "rewriteTo") and rest[1] == "b" and rest[3] == "o" \
                    and method == "POST":
                return await self.copy(request, bucket, name, rest[2], rest[4], rewrite=rest[0] == "rewriteTo")
        raise web.HTTPNotFound()

    # ---- reads ----------------------------------------------------------------------------------
    def _row(self, request: web.Request, bucket: str, name: str) -> dict[str, Any] | None:
        row = self.store.get(bucket, name)
        generation = request.query.get("generation")
        if row is not None and generation and generation != str(row["generation"]):
            return None  # only the live generation is kept
        if row is not None:
            check_preconditions(row, preconditions(request.query))
        return row

    def get(self, request: web.Request, bucket: str, name: str) -> web.Response:
        row = self._row(request, bucket, name)
        if row is None:
            return not_found(bucket, name)
        return web.json_response(res.gcs_object(row, res.base_url(request)))

    async def download(self, request: web.Request, bucket: str, name: str) -> web.StreamResponse:
        row = self._row(request, bucket, name)
        if row is None:
            return not_found(bucket, name)
        path = self.store.blob_path(row)
        if not path.exists():  # deleted between the lookup and now
            return not_found(bucket, name)
        return web.FileResponse(path, chunk_size=res.CHUNK, headers=res.download_headers(row))

    def list(self, request: web.Request, bucket: str) -> web.Response:
        q = request.query
        try:
            limit = int(q.get("maxResults", "1000"))
        except ValueError:
            raise res.BadRequest("maxResults must be an integer") from None
        limit = max(1, min(limit, 1000))
        try:
            items, prefixes, token = self.store.list(bucket, q.get("prefix", ""), q.get("delimiter", ""),
                                                     q.get("pageToken", ""), limit)
        except ValueError as exc:
            raise res.BadRequest(str(exc)) from None
        base = res.base_url(request)
        out: dict[str, Any] = {"kind": "storage#objects"}
        if items:
            out["items"] = [res.gcs_object(r, base) for r in items]
        if prefixes:
            out["prefixes"] = prefixes
        if token:
            out["nextPageToken"] = token
        return web.json_response(out)

    # ---- writes ---------------------------------------------------------------------------------
    async def patch(self, request: web.Request, bucket: str, name: str, replace: bool) -> web.Response:
        body = await res.json_object_body(request)  # blob.patch() with no changes sends no body
        changes = {k: v for k, v in body.items() if k in SETTABLE or k == "metadata"}
        if "metadata" in changes and changes["metadata"] is not None and not isinstance(changes["metadata"], dict):
            raise res.BadRequest("metadata must be an object")
        try:
            row = self.store.patch(bucket, name, changes, preconditions(request.query), replace=replace)
        except NotFound:
            return not_found(bucket, name)
        return web.json_response(res.gcs_object(row, res.base_url(request)))

    def delete(self, request: web.Request, bucket: str, name: str) -> web.Response:
        if self._row(request, bucket, name) is None:
            return not_found(bucket, name)
        try:
            self.store.delete(bucket, name, preconditions(request.query))
        except NotFound:
            return not_found(bucket, name)
        return web.Response(status=204)

    async def copy(self, request: web.Request, bucket: str, name: str, dst_bucket: str, dst_name: str,
                   rewrite: bool) -> web.Response:
        validate_name(dst_name)
        src = self.store.get(bucket, name)
        gen = request.query.get("sourceGeneration")
        if src is None or (gen and gen != str(src["generation"])):
            return not_found(bucket, name)
        check_preconditions(src, preconditions(request.query, prefix="ifSource"))
        overrides = await res.json_object_body(request)
        fields = {key: src[column] for key, column in SETTABLE.items()}
        fields["metadata"] = res.custom_metadata(src, with_tokens=False)
        fields.update({k: v for k, v in overrides.items() if k in SETTABLE or k == "metadata"})
        temp = await asyncio.to_thread(self.store.copy_blob, src)
        try:
            blob, digest = await asyncio.to_thread(self.store.prepare_blob, temp)
        finally:
            res.discard(temp)
        row = self.store.commit(dst_bucket, dst_name, blob, digest, fields, preconditions(request.query))
        resource = res.gcs_object(row, res.base_url(request))
        if not rewrite:
            return web.json_response(resource)
        return web.json_response({"kind": "storage#rewriteResponse", "totalBytesRewritten": str(row["size"]),
                                  "objectSize": str(row["size"]), "done": True, "resource": resource})

    async def upload(self, request: web.Request, bucket: str) -> web.StreamResponse:
        q = request.query
        if "upload_id" in q:
            if request.method in ("PUT", "POST"):
                return await self.resumable_chunk(request, bucket, q["upload_id"])
            if request.method == "DELETE":
                session = self.store.session(q["upload_id"])
                if session is not None and session["state"] == "active":
                    self.store.end_session(q["upload_id"], "cancelled")
                return web.Response(status=499 if session else 404)
            raise web.HTTPNotFound()
        if request.method == "DELETE":
            # BlobWriter's cancel targets the initiation URL (no upload id): nothing to do.
            return web.Response(status=204)
        if request.method != "POST":
            raise web.HTTPNotFound()
        kind = q.get("uploadType", "")
        pre = preconditions(q)
        if kind == "multipart":
            return await self.simple_upload(request, bucket, pre, multipart=True)
        if kind == "media":
            return await self.simple_upload(request, bucket, pre, multipart=False)
        if kind == "resumable":
            return await self.resumable_start(request, bucket, pre)
        raise res.BadRequest(f"unsupported uploadType {kind!r}")

    def _resource_fields(self, meta: dict[str, Any]) -> dict[str, Any]:
        fields = {k: meta[k] for k in SETTABLE if meta.get(k) is not None}
        if meta.get("metadata") is not None:
            if not isinstance(meta["metadata"], dict):
                raise res.BadRequest("metadata must be an object")
            fields["metadata"] = {k: str(v) for k, v in meta["metadata"].items() if v is not None}
        return fields

    async def _finish(self, request: web.Request, bucket: str, name: str, temp, fields: dict[str, Any],
                      pre: dict[str, int], expect: dict[str, str]) -> dict[str, Any]:
        """Hash, verify the client's checksums, and commit; the temp file is consumed either way."""
        try:
            blob, digest = await asyncio.to_thread(self.store.prepare_blob, temp)
        finally:
            res.discard(temp)
        for key, actual in (("crc32c", digest.crc32c), ("md5Hash", digest.md5)):
            if expect.get(key) and expect[key] != actual:
                self.store.blob_path({"blob": blob}).unlink(missing_ok=True)
                raise res.BadRequest(f"Provided {key} {expect[key]} does not match the data ({actual}); nothing stored.")
        return self.store.commit(bucket, name, blob, digest, fields, pre)

    async def simple_upload(self, request: web.Request, bucket: str, pre: dict[str, int], multipart: bool) -> web.Response:
        temp = self.store.temp_path()
        try:
            if multipart:
                meta = await res.read_multipart(request, temp, MAX_OBJECT_BYTES)
            else:
                meta = {"contentType": request.headers.get("Content-Type")}
                with open(temp, "wb") as fh:
                    await res.stream_body(request, fh, MAX_OBJECT_BYTES)
            name = validate_name(request.query.get("name") or meta.get("name") or "")
            fields = self._resource_fields(meta)
            expect = {k: meta[k] for k in ("crc32c", "md5Hash") if isinstance(meta.get(k), str)}
            row = await self._finish(request, bucket, name, temp, fields, pre, expect)
        finally:
            res.discard(temp)
        return web.json_response(res.gcs_object(row, res.base_url(request)))

    async def resumable_start(self, request: web.Request, bucket: str, pre: dict[str, int]) -> web.Response:
        meta = await res.json_object_body(request)
        name = validate_name(request.query.get("name") or meta.get("name") or "")
        if request.headers.get("x-upload-content-type") and not meta.get("contentType"):
            meta["contentType"] = request.headers["x-upload-content-type"]
        declared = request.headers.get("x-upload-content-length")
        try:
            declared_size = int(declared) if declared else None
        except ValueError:
            raise res.BadRequest("x-upload-content-length must be an integer") from None
        if declared_size is not None and declared_size > MAX_OBJECT_BYTES:
            raise res.BodyTooLarge(f"declared size {declared_size} exceeds {MAX_OBJECT_BYTES}")
        check_preconditions(self.store.get(bucket, name), pre)  # fail early; checked again at the end
        resource = {"fields": self._resource_fields(meta),
                    "expect": {k: meta[k] for k in ("crc32c", "md5Hash") if isinstance(meta.get(k), str)}}
        upload_id = self.store.create_session("gcs", bucket, name, resource, declared_size, pre, None)
        location = (f"{res.base_url(request)}/upload/storage/v1/b/{res.enc(bucket)}/o?uploadType=resumable"
                    f"&name={res.enc(name)}&upload_id={upload_id}")
        return web.json_response({}, headers={"Location": location, "X-GUploader-UploadID": upload_id})

    async def resumable_chunk(self, request: web.Request, bucket: str, upload_id: str) -> web.StreamResponse:
        # One request at a time per session: two racing PUTs must not interleave their bytes.
        lock = self._session_locks.setdefault(upload_id, asyncio.Lock())
        async with lock:
            response = await self._resumable_chunk(request, upload_id)
        if response.status != 308:
            self._session_locks.pop(upload_id, None)
        return response

    async def _resumable_chunk(self, request: web.Request, upload_id: str) -> web.StreamResponse:
        session = self.store.session(upload_id)
        if session is None or session["api"] != "gcs":
            return gcs_error(404, "No such upload session.", "notFound")
        if session["state"] == "final":
            row = self.store.get(session["bucket"], session["name"])
            if row is not None and row["generation"] == session["generation"]:
                return web.json_response(res.gcs_object(row, res.base_url(request)))
            return gcs_error(410, "The upload session already finished.", "gone")
        if session["state"] != "active":
            return gcs_error(499, "The upload session was cancelled.", "cancelled")
        received = session["received"]
        header = request.headers.get("Content-Range", "").strip()
        if header:
            m = _RANGE.match(header)
            if not m:
                raise res.BadRequest(f"bad Content-Range {header!r}")
            first = int(m.group(1)) if m.group(1) is not None else None
            last = int(m.group(2)) if m.group(2) is not None else None
            total = int(m.group(3)) if m.group(3) != "*" else None
        else:  # a single PUT with the whole object
            first, last, total = 0, None, None
        if first is not None:
            if first > received:
                return self._incomplete(received)  # a gap: tell the client where to resume
            received = await res.append_chunk(self.store.part_path(upload_id), request, received,
                                              MAX_OBJECT_BYTES - first, skip=received - first)
            if last is not None and received < last + 1:
                return self._incomplete(received)  # the chunk arrived short: the client resumes from Range
            if not header:
                total = received
        if total is None:
            return self._incomplete(received)
        if session["declared_size"] is not None and total != session["declared_size"]:
            raise res.BadRequest(f"total size {total} differs from the declared {session['declared_size']}")
        if received < total:
            return self._incomplete(received)
        if received > total:
            self.store.end_session(upload_id, "failed")
            raise res.BadRequest(f"received {received} bytes, more than the total {total}; upload discarded")
        return await self._finalize(request, session, upload_id)

    async def _finalize(self, request: web.Request, session: dict[str, Any], upload_id: str) -> web.Response:
        resource = session["resource"]
        expect = dict(resource.get("expect") or {})
        for item in request.headers.get("x-goog-hash", "").split(","):
            key, _, value = item.strip().partition("=")
            if key in ("crc32c", "md5") and value:
                expect["crc32c" if key == "crc32c" else "md5Hash"] = value
        temp = self.store.take_part(upload_id)
        try:
            row = await self._finish(request, session["bucket"], session["name"], temp, resource["fields"],
                                     session["preconditions"], expect)
        except (PreconditionFailed, res.BadRequest):
            self.store.end_session(upload_id, "failed")
            raise
        self.store.end_session(upload_id, "final", row["generation"])
        return web.json_response(res.gcs_object(row, res.base_url(request)))

    @staticmethod
    def _incomplete(received: int) -> web.Response:
        headers = {"Range": f"bytes=0-{received - 1}"} if received else {}
        return web.Response(status=308, headers=headers)

