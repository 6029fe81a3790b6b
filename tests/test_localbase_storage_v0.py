"""The Firebase Storage ``/v0`` API under storage.rules, as two patients, a dermatologist and an admin.

Users are created with firebase-admin (``dermaloop.auth.create_user``, role claim) and sign in over
REST; uploads and reads go through ``dermaloop.storage.UserStorage`` (the SDKs' wire calls) or raw
``requests`` where a test needs a malformed request.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import pytest
import requests

from dermaloop import auth as dl_auth
from dermaloop.storage import PermissionDenied, StorageError, UserStorage, admin_bucket

KB, MB = 1024, 1024 * 1024
JPEG = b"\xff\xd8\xff\xe0" + os.urandom(40 * KB)


@dataclass
class Person:
    uid: str
    session: dl_auth.UserSession
    storage: UserStorage


@pytest.fixture(scope="module")
def people(localbase) -> dict[str, Person]:
    settings = localbase.settings()
    client = dl_auth.AuthClient(settings)
    out = {}
    for tag, role in (("alice", "patient"), ("bob", "patient"), ("derm", "dermatologist"), ("ops", "admin")):
        email = f"{tag}-{uuid.uuid4().hex[:8]}@example.com"
        user, created = dl_auth.create_user(email, "secret123", role, settings=settings)
        assert created and user.custom_claims == {"role": role}
        session = client.sign_in(email, "secret123")
        out[tag] = Person(user.uid, session, UserStorage(session, settings))
    out["anon"] = Person("", None, UserStorage(None, settings))  # type: ignore[arg-type]
    return out


@pytest.fixture(scope="module")
def seeded(localbase, people) -> dict[str, str]:
    """One case photo per patient, a heatmap and a model file, written by admin (GCS API)."""
    bucket = admin_bucket(localbase.settings())
    paths = {
        "alice_img": f"cases/{people['alice'].uid}/c1/image.jpg",
        "bob_img": f"cases/{people['bob'].uid}/c1/image.jpg",
        "alice_heat": f"cases/{people['alice'].uid}/c1/heatmap.png",
        "model": "models/device/v1/model.tflite",
    }
    for key, path in paths.items():
        bucket.blob(path).upload_from_string(JPEG if "img" in key else b"\x89PNG" + key.encode(),
                                             content_type="image/png" if key != "model" else "application/octet-stream")
    return paths


def allowed(call) -> bool:
    try:
        call()
    except PermissionDenied:
        return False
    return True


def test_deny_matrix(people, seeded):
    a, b, d, ops, anon = (people[k].storage for k in ("alice", "bob", "derm", "ops", "anon"))
    alice, bob = people["alice"].uid, people["bob"].uid
    new_a = f"cases/{alice}/c2/image.jpg"
    matrix = [
        ("alice uploads her photo", lambda: a.upload(new_a, JPEG, "image/jpeg"), True),
        ("alice reads her photo", lambda: a.download(seeded["alice_img"]), True),
        ("alice reads her heatmap", lambda: a.download(seeded["alice_heat"]), True),
        ("alice reads bob's photo", lambda: a.download(seeded["bob_img"]), False),
        ("alice reads bob's metadata", lambda: a.metadata(seeded["bob_img"]), False),
        ("alice writes into bob's folder", lambda: a.upload(f"cases/{bob}/c9/image.jpg", JPEG, "image/jpeg"), False),
        ("alice uploads a non-image", lambda: a.upload(f"cases/{alice}/c3/image.jpg", b"hi", "text/plain"), False),
        ("alice writes a heatmap", lambda: a.upload(f"cases/{alice}/c1/heatmap.png", JPEG, "image/png"), False),
        ("alice lists her cases", lambda: a.list(f"cases/{alice}/"), True),
        ("alice lists bob's cases", lambda: a.list(f"cases/{bob}/"), False),
        ("alice lists all cases", lambda: a.list("cases/"), False),
        ("alice reads a model", lambda: a.download(seeded["model"]), True),
        ("alice publishes a model", lambda: a.upload("models/device/v2/m.tflite", b"m", "image/png"), False),
        ("alice deletes bob's photo", lambda: a.delete(seeded["bob_img"]), False),
        ("alice patches bob's metadata", lambda: a.update_metadata(seeded["bob_img"], {"metadata": {"x": "1"}}), False),
        ("bob reads alice's photo", lambda: b.download(seeded["alice_img"]), False),
        ("derm reads alice's photo", lambda: d.download(seeded["alice_img"]), True),
        ("derm reads bob's photo", lambda: d.download(seeded["bob_img"]), True),
        ("derm lists all cases", lambda: d.list("cases/"), True),
        ("derm uploads into a case", lambda: d.upload(f"cases/{alice}/c1/image.jpg", JPEG, "image/jpeg"), False),
        ("derm deletes a photo", lambda: d.delete(seeded["alice_img"]), False),
        # the admin role claim reads like a dermatologist; heatmaps and models come with admin credentials
        ("admin role reads bob's photo", lambda: ops.download(seeded["bob_img"]), True),
        ("admin role reads a heatmap", lambda: ops.download(seeded["alice_heat"]), True),
        ("admin role lists all cases", lambda: ops.list("cases/"), True),
        ("admin role reads a model", lambda: ops.download(seeded["model"]), True),
        ("admin role writes a heatmap", lambda: ops.upload(f"cases/{bob}/c1/heatmap.png", JPEG, "image/png"), False),
        ("admin role writes a photo", lambda: ops.upload(f"cases/{bob}/c9/image.jpg", JPEG, "image/jpeg"), False),
        ("admin role deletes a photo", lambda: ops.delete(seeded["bob_img"]), False),
        ("admin role publishes a model", lambda: ops.upload("models/device/v2/m.tflite", b"m", "application/x-tflite"), False),
        ("admin role deletes a model", lambda: ops.delete(seeded["model"]), False),
        ("signed-out reads a model", lambda: anon.download(seeded["model"]), False),
        ("signed-out reads a photo", lambda: anon.download(seeded["alice_img"]), False),
        ("signed-out uploads", lambda: anon.upload(f"cases/{alice}/c4/image.jpg", JPEG, "image/jpeg"), False),
        ("alice deletes her own photo", lambda: a.delete(new_a), True),
    ]
    wrong = [(label, expected) for label, call, expected in matrix if allowed(call) is not expected]
    assert wrong == [], f"rules disagreed (label, expected allowed): {wrong}"
    # the denied writes left nothing behind
    bucket_names = set(people["ops"].storage.list_all(f"cases/{bob}/c9/"))
    assert bucket_names == set()


def test_upload_kinds_round_trip(localbase, people):
    alice = people["alice"]
    s = alice.storage
    small = f"cases/{alice.uid}/r1/image.jpg"
    meta = s.upload(small, JPEG, "image/jpeg", metadata={"site": "arm"}, multipart=True)
    assert meta["size"] == str(len(JPEG)) and meta["metadata"] == {"site": "arm"} and meta["downloadTokens"]
    assert s.download(small) == JPEG
    assert s.download(small, start=4, end=99) == JPEG[4:100]

    big = b"\xff\xd8" + os.urandom(3 * MB)
    resumable = f"cases/{alice.uid}/r2/image.jpg"
    meta = s.upload(resumable, big, "image/jpeg", chunk_bytes=256 * KB)
    assert int(meta["size"]) == len(big)
    assert s.download(resumable) == big

    raw = f"cases/{alice.uid}/r3/image.jpg"
    r = requests.post(s.base, params={"name": raw}, data=JPEG, timeout=30,
                      headers={"Authorization": f"Firebase {alice.session.id_token()}", "Content-Type": "image/jpeg"})
    assert r.status_code == 200 and r.json()["contentType"] == "image/jpeg"
    assert admin_bucket(localbase.settings()).blob(raw).download_as_bytes() == JPEG

    url = s.download_url(small)
    assert requests.get(url, timeout=30).content == JPEG  # a download token needs no auth header
    wrong = url.rsplit("token=", 1)[0] + "token=" + str(uuid.uuid4())
    assert requests.get(wrong, timeout=30).status_code == 403

    updated = s.update_metadata(small, {"metadata": {"site": None, "note": "itchy"}, "cacheControl": "private"})
    assert updated["metadata"] == {"note": "itchy"} and updated["metageneration"] == "2"
    assert updated["etag"] != meta["etag"]

    pages, token, names = 0, None, []
    while True:
        page = s.list(f"cases/{alice.uid}/", page_size=2, page_token=token)
        names += page.prefixes
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert pages >= 2 and len(names) == len(set(names))
    assert {f"cases/{alice.uid}/{c}/" for c in ("r1", "r2", "r3")} <= set(names)


def test_bad_input(localbase, people):
    alice = people["alice"]
    s = alice.storage
    headers = {"Authorization": f"Firebase {alice.session.id_token()}"}
    keep = f"cases/{alice.uid}/k1/image.jpg"
    s.upload(keep, JPEG, "image/jpeg")

    # oversized: refused by the rules at the resumable start (declared size) and for a simple upload
    with pytest.raises(PermissionDenied):
        s.upload(f"cases/{alice.uid}/big/image.jpg", b"\xff" * (20 * MB + 1), "image/jpeg")
    too_big = requests.post(s.base, params={"name": f"cases/{alice.uid}/big2/image.jpg"}, data=b"\xff" * (20 * MB + 1),
                            headers={**headers, "Content-Type": "image/jpeg"}, timeout=60)
    assert too_big.status_code == 403

    # wrong content type over an existing photo: refused, and the photo is untouched
    wrong_type = requests.post(s.base, params={"name": keep}, data=b"#!/bin/sh", timeout=30,
                               headers={**headers, "Content-Type": "application/x-sh"})
    assert wrong_type.status_code == 403
    assert s.download(keep) == JPEG

    # path traversal and invalid names
    for bad in (f"cases/{alice.uid}/../{people['bob'].uid}/c1/image.jpg", f"cases/{alice.uid}/./x/image.jpg",
                f"cases/{alice.uid}/c1/a\x00b.jpg", ""):
        r = requests.post(s.base, params={"name": bad}, data=JPEG, timeout=30,
                          headers={**headers, "Content-Type": "image/jpeg"})
        assert r.status_code == 400, bad
    assert requests.get(s.base, params={"prefix": "cases"}, headers=headers, timeout=30).status_code == 400

    # truncated multipart over the existing photo
    body = (b"--b\r\nContent-Type: application/json; charset=utf-8\r\n\r\n{\"contentType\": \"image/jpeg\"}"
            b"\r\n--b\r\nContent-Type: image/jpeg\r\n\r\n" + JPEG[:1000])
    truncated = requests.post(s.base, params={"name": keep}, data=body, timeout=30,
                              headers={**headers, "X-Goog-Upload-Protocol": "multipart",
                                       "Content-Type": "multipart/related; boundary=b"})
    assert truncated.status_code == 400 and "truncated" in truncated.json()["error"]["message"]
    assert s.download(keep) == JPEG

    # resumable misuse: an offset past what was received, another user's session
    start = requests.post(s.base, params={"name": f"cases/{alice.uid}/k2/image.jpg"}, json={}, timeout=30,
                          headers={**headers, "X-Goog-Upload-Protocol": "resumable", "X-Goog-Upload-Command": "start",
                                   "X-Goog-Upload-Header-Content-Length": "1000",
                                   "X-Goog-Upload-Header-Content-Type": "image/jpeg"})
    url = start.headers["X-Goog-Upload-URL"]
    gap = requests.post(url, data=b"x" * 10, timeout=30,
                        headers={**headers, "X-Goog-Upload-Command": "upload", "X-Goog-Upload-Offset": "500"})
    assert gap.status_code == 400
    bob_headers = {"Authorization": f"Firebase {people['bob'].session.id_token()}"}
    hijack = requests.post(url, data=b"x" * 10, timeout=30,
                           headers={**bob_headers, "X-Goog-Upload-Command": "upload", "X-Goog-Upload-Offset": "0"})
    assert hijack.status_code == 403
    short = requests.post(url, data=b"\xff" * 10, timeout=30,
                          headers={**headers, "X-Goog-Upload-Command": "upload, finalize", "X-Goog-Upload-Offset": "0"})
    assert short.status_code == 400  # 10 of the declared 1000 bytes
    with pytest.raises(StorageError):
        s.metadata(f"cases/{alice.uid}/k2/image.jpg")  # never visible

    # bogus tokens: clear 401s
    target = s.object_url(keep)
    for header in ("Firebase garbage", "Firebase a.b.c", "Basic dXNlcjpwdw==", "Firebase " + "x" * 5000):
        r = requests.get(target, headers={"Authorization": header}, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["message"], header
    assert s.download(keep) == JPEG  # still serving, nothing lost


def test_admin_bearer_owner_bypasses_rules_on_v0(localbase, seeded):
    bucket = localbase.settings().storage_bucket
    url = f"{localbase.storage_url}/v0/b/{bucket}/o/{quote(seeded['bob_img'], safe='')}"
    r = requests.get(url, params={"alt": "media"}, headers={"Authorization": "Bearer owner"}, timeout=30)
    assert r.status_code == 200 and r.content == JPEG
    owner = {"Authorization": "Bearer owner"}
    first = requests.get(url, headers=owner, timeout=30).json()["downloadTokens"]  # made lazily (GCS upload had none)
    created = requests.post(url, params={"create_token": "true"}, headers=owner, timeout=30)
    assert created.status_code == 200
    tokens = created.json()["downloadTokens"].split(",")
    assert tokens[0] == first and len(tokens) == 2
    after = requests.post(url, params={"delete_token": first}, headers=owner, timeout=30).json()["downloadTokens"]
    assert after == tokens[1]
    assert requests.get(url, params={"alt": "media", "token": first}, timeout=30).status_code == 403
    assert requests.post(url, params={"create_token": "true"}, timeout=30).status_code == 403


class DroppingSession(requests.Session):
    """Sends the second upload chunk only half-way over a raw socket, then fails like a dropped link."""

    def __init__(self) -> None:
        super().__init__()
        self.chunks = 0
        self.dropped = 0

    def request(self, method, url, *args, **kwargs):
        headers = kwargs.get("headers") or {}
        if headers.get("X-Goog-Upload-Command", "").startswith("upload"):
            self.chunks += 1
            if self.chunks == 2:
                data = kwargs["data"]
                parts = urlsplit(url)
                lines = [f"POST {parts.path}?{parts.query} HTTP/1.1", f"Host: {parts.netloc}",
                         f"Content-Length: {len(data)}"] + [f"{k}: {v}" for k, v in headers.items()]
                with socket.create_connection((parts.hostname, parts.port)) as sock:
                    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + data[: len(data) // 2])
                    time.sleep(0.3)
                self.dropped += 1
                raise requests.ConnectionError("connection dropped mid-chunk (test)")
        return super().request(method, url, *args, **kwargs)


def test_user_storage_resumes_after_a_dropped_chunk(localbase, people):
    alice = people["alice"]
    flaky = DroppingSession()
    s = UserStorage(alice.session, localbase.settings(), http=flaky)
    data = b"\xff\xd8" + os.urandom(1024 * KB)
    path = f"cases/{alice.uid}/drop/image.jpg"
    meta = s.upload(path, data, "image/jpeg", chunk_bytes=256 * KB)
    assert flaky.dropped == 1 and int(meta["size"]) == len(data)
    assert alice.storage.download(path) == data
