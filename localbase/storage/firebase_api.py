"""The Firebase Storage end-user API (``/v0``) that the web and mobile SDKs use, under storage.rules.

Callers identify with ``Authorization: Firebase <ID token>`` (``Bearer`` works too); ``owner`` is
admin and bypasses rules (in secure mode only from a program on this machine; the admin credential
works from anywhere); no header means ``request.auth == null``. Unlike the official emulator, an
expired, revoked, malformed or (secure mode) unsigned token is refused with 401 instead of being
trusted. Rules are checked before existence (a denied read of a missing object is 403, as
production answers); a valid download token skips rules, as ``getDownloadURL()`` links need.
Downloads are never sniffed, and anything but a photo is served as an attachment
(``resources.download_headers``). One user holds at most ``Limits.uploads_per_user`` unfinished
resumable uploads (starting one more drops their oldest).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from localbase import tokens
from localbase.context import Context
from localbase.storage import resources as res
from localbase.storage.store import SETTABLE, InvalidName, NotFound, ObjectStore, validate_name
from localbase.storage_rules import StorageRules

MAX_SIMPLE_BYTES = 64 * 1024 * 1024  # multipart/raw bodies; bigger files go through resumable uploads
MAX_RESUMABLE_BYTES = 5 * 1024**3
GRANULARITY = 256 * 1024


class TokenRejected(Exception):
    pass


@dataclass
class Caller:
    admin: bool
    auth: dict[str, Any] | None  # what rules see as request.auth

    @property
    def uid(self) -> str | None:
        return self.auth["uid"] if self.auth else None


def v0_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"code": status, "message": message}}, status=status, headers=headers)


def denied(write: bool, upload: bool = False) -> web.Response:
    headers = {"x-goog-upload-status": "final"} if upload else None
    return v0_error(403, f"Permission denied. No {'WRITE' if write else 'READ'} permission.", headers)


def not_found() -> web.Response:
    return web.Response(status=404, text="Not Found")


class FirebaseApi:
    def __init__(self, store: ObjectStore, ctx: Context, rules: StorageRules):
        self.store = store
        self.ctx = ctx
        self.rules = rules
        self._session_locks: dict[str, asyncio.Lock] = {}

    # ---- identity and rules ---------------------------------------------------------------------
    def caller(self, request: web.Request) -> Caller:
        header = request.headers.get("Authorization", "").strip()
        if not header:
            return Caller(admin=False, auth=None)
        scheme, _, value = header.partition(" ")
        value = value.strip()
        if scheme.lower() not in ("firebase", "bearer") or not value:
            raise TokenRejected("Authorization must be 'Firebase <ID token>'")
        if self.ctx.security.admin_token(request, value):
            return Caller(admin=True, auth=None)
        if value == "owner":
            raise TokenRejected("'owner' is admin only from the server's own machine; "
                                "other machines present the admin credential")
        try:
            claims = self.ctx.verify_id_token(value)
        except tokens.InvalidToken as exc:
            raise TokenRejected(f"Invalid Firebase ID token: {exc}") from None
        return Caller(admin=False, auth={"uid": claims["sub"], "token": claims})

    def allowed(self, caller: Caller, method: str, bucket: str, name: str, resource: dict[str, Any] | None = None,
                request_resource: dict[str, Any] | None = None) -> bool:
        if caller.admin:
            return True
        return self.rules.check(method, bucket, name, caller.auth, resource, request_resource).allowed

    # ---- routing --------------------------------------------------------------------------------
    async def handle(self, request: web.Request, seg: list[str]) -> web.StreamResponse:
        try:
            caller = self.caller(request)
        except TokenRejected as exc:
            return v0_error(401, str(exc))
        try:
            return await self._route(request, seg[1:], caller)
        except InvalidName as exc:
            return v0_error(400, f"Invalid object name: {exc}")
        except res.BadRequest as exc:
            return v0_error(400, str(exc))
        except res.BodyTooLarge as exc:
            return v0_error(413, f"Upload too large: {exc}. Use a resumable upload for large files.")
        except RecursionError:
            return v0_error(400, "Request body nested too deeply.")

    async def _route(self, request: web.Request, seg: list[str], caller: Caller) -> web.StreamResponse:
        method = "GET" if request.method == "HEAD" else request.method  # aiohttp drops HEAD bodies
        if method == "PUT" and request.headers.get("X-HTTP-Method-Override", "").upper() == "PATCH":
            method = "PATCH"
        if seg in ([], [""]) and method == "GET":
            return web.json_response({"emulator": "storage", "server": "localbase"})
        if len(seg) < 3 or seg[0] != "b" or seg[2] != "o":
            raise web.HTTPNotFound()
        bucket = seg[1]
        if len(seg) == 3:
            if method == "POST":
                return await self.upload(request, bucket, caller)
            if method == "GET":
                return self.list(request, bucket, caller)
            raise web.HTTPMethodNotAllowed(method, ["GET", "POST"])
        name = validate_name("/".join(seg[3:]))
        if method == "GET":
            if request.query.get("alt") == "media":
                return await self.download(request, bucket, name, caller)
            return self.metadata(bucket, name, caller)
        if method == "PATCH":
            return await self.patch(request, bucket, name, caller)
        if method == "DELETE":
            return self.delete(bucket, name, caller)
        if method == "POST" and ("create_token" in request.query or "delete_token" in request.query):
            return self.tokens(request, bucket, name, caller)
        raise web.HTTPMethodNotAllowed(method, ["GET", "PATCH", "DELETE", "POST"])

    # ---- reads ----------------------------------------------------------------------------------
    def metadata(self, bucket: str, name: str, caller: Caller) -> web.Response:
        row = self.store.get(bucket, name)
        if not self.allowed(caller, "get", bucket, name, res.rules_resource(row)):
            return denied(write=False)
        if row is None:
            return not_found()
        row = self.store.ensure_download_token(row)
        return web.json_response(res.firebase_metadata(row))

    async def download(self, request: web.Request, bucket: str, name: str, caller: Caller) -> web.StreamResponse:
        row = self.store.get(bucket, name)
        token = request.query.get("token")
        by_token = bool(row and token and token in (row["download_tokens"] or "").split(","))
        if not by_token and not self.allowed(caller, "get", bucket, name, res.rules_resource(row)):
            return denied(write=False)
        if row is None:
            return not_found()
        path = self.store.blob_path(row)
        if not path.exists():
            return not_found()
        headers = res.download_headers(row, filename=name.rsplit("/", 1)[-1])
        headers["ETag"] = res.etag(row)
        return web.FileResponse(path, chunk_size=res.CHUNK, headers=headers)

    def list(self, request: web.Request, bucket: str, caller: Caller) -> web.Response:
        q = request.query
        prefix = q.get("prefix", "")
        if prefix and (not prefix.endswith("/") or prefix.endswith("//")):
            raise res.BadRequest("The prefix parameter is required to be empty or ends with a single / character.")
        delimiter = q.get("delimiter", "")
        if delimiter not in ("", "/"):
            raise res.BadRequest("The delimiter parameter must be empty or '/'.")
        try:
            limit = int(q.get("maxResults", "1000"))
        except ValueError:
            raise res.BadRequest("maxResults must be an integer") from None
        if not 1 <= limit <= 1000:
            raise res.BadRequest("maxResults must be between 1 and 1000")
        path = prefix.rstrip("/")
        if not self.allowed(caller, "list", bucket, path):
            return denied(write=False)
        try:
            items, prefixes, token = self.store.list(bucket, prefix, delimiter, q.get("pageToken", ""), limit)
        except ValueError as exc:
            raise res.BadRequest(str(exc)) from None
        out: dict[str, Any] = {"prefixes": prefixes, "items": [{"name": r["name"], "bucket": bucket} for r in items]}
        if token:
            out["nextPageToken"] = token
        return web.json_response(out)

    # ---- uploads --------------------------------------------------------------------------------
    @staticmethod
    def _fields(meta: dict[str, Any], content_type: str | None) -> dict[str, Any]:
        fields = {k: meta[k] for k in SETTABLE if isinstance(meta.get(k), str)}
        if content_type and "contentType" not in fields:
            fields["contentType"] = content_type
        custom = meta.get("metadata")
        if custom is not None:
            if not isinstance(custom, dict):
                raise res.BadRequest("metadata must be an object")
            fields["metadata"] = {k: str(v) for k, v in custom.items() if v is not None}
        return fields

    @staticmethod
    def _prospective(bucket: str, name: str, fields: dict[str, Any], size: int) -> dict[str, Any]:
        """``request.resource`` for rules: the object as it would be after the write."""
        return {"name": name, "bucket": bucket, "size": size,
                "contentType": fields.get("contentType") or "application/octet-stream",
                "metadata": dict(fields.get("metadata") or {}),
                "contentDisposition": fields.get("contentDisposition") or "inline",
                "contentEncoding": fields.get("contentEncoding") or "identity"}

    async def _commit_temp(self, bucket: str, name: str, temp, fields: dict[str, Any], caller: Caller) -> web.Response:
        """Check create rules against the real bytes, then publish them; the temp file is consumed."""
        try:
            size = os.path.getsize(temp)
            row = self.store.get(bucket, name)
            if not self.allowed(caller, "create", bucket, name, res.rules_resource(row),
                                self._prospective(bucket, name, fields, size)):
                return denied(write=True, upload=True)
            blob, digest = await asyncio.to_thread(self.store.prepare_blob, temp)
        finally:
            res.discard(temp)
        row = self.store.commit(bucket, name, blob, digest, fields, new_download_token=True)
        return web.json_response(res.firebase_metadata(row), headers={"X-Goog-Upload-Status": "final"})

    async def upload(self, request: web.Request, bucket: str, caller: Caller) -> web.StreamResponse:
        if "upload_id" in request.query:
            return await self.resumable_command(request, bucket, request.query["upload_id"], caller)
        protocol = request.headers.get("X-Goog-Upload-Protocol", "").lower()
        if protocol == "resumable":
            return await self.resumable_start(request, bucket, caller)
        name = validate_name(request.query.get("name", ""))
        temp = self.store.temp_path()
        try:
            if protocol == "multipart" or request.content_type == "multipart/related":
                meta = await res.read_multipart(request, temp, MAX_SIMPLE_BYTES)
                fields = self._fields(meta, None)
            else:
                with open(temp, "wb") as fh:
                    await res.stream_body(request, fh, MAX_SIMPLE_BYTES)
                fields = self._fields({}, request.headers.get("Content-Type"))
            return await self._commit_temp(bucket, name, temp, fields, caller)
        finally:
            res.discard(temp)

    async def resumable_start(self, request: web.Request, bucket: str, caller: Caller) -> web.Response:
        if request.headers.get("X-Goog-Upload-Command", "").lower() != "start":
            raise res.BadRequest("a resumable upload starts with X-Goog-Upload-Command: start")
        name = validate_name(request.query.get("name", ""))
        meta = await res.json_object_body(request)
        fields = self._fields(meta, request.headers.get("X-Goog-Upload-Header-Content-Type"))
        declared = request.headers.get("X-Goog-Upload-Header-Content-Length")
        try:
            size = int(declared) if declared is not None else None
        except ValueError:
            raise res.BadRequest("X-Goog-Upload-Header-Content-Length must be an integer") from None
        if size is None and not caller.admin:
            raise res.BadRequest("X-Goog-Upload-Header-Content-Length is required")
        if size is not None and not 0 <= size <= MAX_RESUMABLE_BYTES:
            raise res.BodyTooLarge(f"declared size {size} is outside 0..{MAX_RESUMABLE_BYTES}")
        # Refuse early what the rules would refuse at the end, so nobody uploads gigabytes to be told no.
        if size is not None and not self.allowed(caller, "create", bucket, name,
                                                 res.rules_resource(self.store.get(bucket, name)),
                                                 self._prospective(bucket, name, fields, size)):
            return denied(write=True, upload=True)
        owner = {"uid": caller.uid, "admin": caller.admin}
        holder = None if caller.admin else (f"uid:{caller.uid}" if caller.uid
                                            else f"ip:{self.ctx.security.client(request).ip}")
        quota = self.ctx.security.limits.uploads_per_user
        if holder is not None and quota is not None:
            # A user's unfinished uploads are bounded: the oldest makes room (an app that crashed
            # mid-upload starts over rather than being locked out until the sessions expire).
            unfinished = self.store.active_sessions(holder)
            for upload_id in unfinished[: max(0, len(unfinished) - quota + 1)]:
                self.store.drop_session(upload_id)
                self._session_locks.pop(upload_id, None)
        upload_id = self.store.create_session("v0", bucket, name, {"fields": fields}, size, {}, owner, holder)
        url = (f"{res.base_url(request)}/v0/b/{res.enc(bucket)}/o?name={res.enc(name)}&upload_id={upload_id}"
               "&upload_protocol=resumable")
        headers = {"X-Goog-Upload-Status": "active", "X-Goog-Upload-URL": url, "X-GUploader-UploadID": upload_id,
                   "X-Goog-Upload-Chunk-Granularity": str(GRANULARITY), "X-Goog-Upload-Control-URL": ""}
        return web.Response(text="OK", headers=headers)

    async def resumable_command(self, request: web.Request, bucket: str, upload_id: str, caller: Caller):
        lock = self._session_locks.setdefault(upload_id, asyncio.Lock())
        async with lock:
            response = await self._resumable_command(request, bucket, upload_id, caller)
        if response.headers.get("X-Goog-Upload-Status") != "active":
            self._session_locks.pop(upload_id, None)
        return response

    async def _resumable_command(self, request: web.Request, bucket: str, upload_id: str, caller: Caller):
        session = self.store.session(upload_id)
        if session is None or session["api"] != "v0" or session["bucket"] != bucket:
            return v0_error(404, "No such upload session.")
        owner = session["auth"] or {}
        if not caller.admin and (owner.get("admin") or owner.get("uid") != caller.uid):
            return denied(write=True, upload=True)
        commands = {c.strip().lower() for c in request.headers.get("X-Goog-Upload-Command", "").split(",") if c.strip()}
        if not commands or not commands <= {"upload", "finalize", "query", "cancel"}:
            raise res.BadRequest("X-Goog-Upload-Command must be upload, finalize, query or cancel")
        state, received = session["state"], session["received"]
        status = "active" if state == "active" else "final"
        if "query" in commands:
            return web.Response(text="", headers={"X-Goog-Upload-Status": status,
                                                  "X-Goog-Upload-Size-Received": str(received)})
        if state != "active":
            return v0_error(400, f"The upload session is already {state}.", {"X-Goog-Upload-Status": "final"})
        if "cancel" in commands:
            self.store.end_session(upload_id, "cancelled")
            return web.Response(text="", headers={"X-Goog-Upload-Status": "cancelled"})
        if "upload" in commands:
            try:
                offset = int(request.headers.get("X-Goog-Upload-Offset", ""))
            except ValueError:
                raise res.BadRequest("X-Goog-Upload-Offset must be an integer") from None
            if not 0 <= offset <= received:
                raise res.BadRequest(f"X-Goog-Upload-Offset {offset} is past the {received} bytes received")
            limit = (session["declared_size"] if session["declared_size"] is not None else MAX_RESUMABLE_BYTES) - offset
            received = await res.append_chunk(self.store.part_path(upload_id), request, received, limit,
                                              skip=received - offset)
        if "finalize" not in commands:
            return web.Response(text="", headers={"X-Goog-Upload-Status": "active",
                                                  "X-Goog-Upload-Size-Received": str(received)})
        if session["declared_size"] is not None and received != session["declared_size"]:
            raise res.BadRequest(f"finalize with {received} bytes, but {session['declared_size']} were declared")
        temp = self.store.take_part(upload_id)
        response = await self._commit_temp(bucket, session["name"], temp, session["resource"]["fields"], caller)
        if response.status == 200:
            row = self.store.get(bucket, session["name"])
            self.store.end_session(upload_id, "final", row["generation"] if row else None)
        else:
            self.store.end_session(upload_id, "failed")
        return response

    # ---- metadata writes and delete -------------------------------------------------------------
    async def patch(self, request: web.Request, bucket: str, name: str, caller: Caller) -> web.Response:
        body = await res.json_object_body(request, required=True)
        changes = {k: v for k, v in body.items() if k in SETTABLE or k == "metadata"}
        if changes.get("metadata") is not None and not isinstance(changes["metadata"], dict):
            raise res.BadRequest("metadata must be an object")
        row = self.store.get(bucket, name)
        after = None
        if row is not None:
            after = res.rules_resource(row)
            if "contentType" in changes:
                after["contentType"] = changes["contentType"] or "application/octet-stream"
            for key, value in (changes.get("metadata") or {}).items():
                if value is None:
                    after["metadata"].pop(key, None)
                else:
                    after["metadata"][key] = str(value)
        if not self.allowed(caller, "update", bucket, name, res.rules_resource(row), after):
            return denied(write=True)
        try:
            row = self.store.patch(bucket, name, changes)
        except NotFound:
            return not_found()
        meta = res.firebase_metadata(row)
        headers = {h: meta[k] for h, k in (("Content-Disposition", "contentDisposition"), ("Cache-Control", "cacheControl"),
                                           ("Content-Language", "contentLanguage"), ("Content-Encoding", "contentEncoding"))
                   if meta.get(k)}
        return web.json_response(meta, headers=headers)

    def delete(self, bucket: str, name: str, caller: Caller) -> web.Response:
        row = self.store.get(bucket, name)
        if not self.allowed(caller, "delete", bucket, name, res.rules_resource(row)):
            return denied(write=True)
        try:
            self.store.delete(bucket, name)
        except NotFound:
            return not_found()
        return web.Response(status=204)

    def tokens(self, request: web.Request, bucket: str, name: str, caller: Caller) -> web.Response:
        if not caller.admin:
            return v0_error(403, "Missing admin credentials.")
        row = self.store.get(bucket, name)
        if row is None:
            return not_found()
        current = [t for t in (row["download_tokens"] or "").split(",") if t]
        if request.query.get("create_token") == "true":
            current.append(str(uuid.uuid4()))
        elif "delete_token" in request.query:
            current = [t for t in current if t != request.query["delete_token"]] or [str(uuid.uuid4())]
        row = self.store.set_download_tokens(row, current)
        return web.json_response(res.firebase_metadata(row))



