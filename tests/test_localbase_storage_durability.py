"""Storage durability: completed uploads survive ``kill -9``; interrupted ones are never visible.

Uses its own localbase process (the shared session one must not be killed).
"""

from __future__ import annotations

import io
import os
import socket
from urllib.parse import quote, urlsplit

import pytest
import requests
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from localbase import tokens
from tests.localbase_process import LocalbaseProcess

KB = 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = LocalbaseProcess(data_dir=tmp_path_factory.mktemp("durable")).start()
    yield proc
    proc.stop()


def gcs_bucket(server: LocalbaseProcess):
    client = storage.Client(project=server.project_id, credentials=AnonymousCredentials(),
                            client_options={"api_endpoint": server.storage_url})
    return client.bucket(f"{server.project_id}.appspot.com")


def test_completed_uploads_survive_kill9(server):
    bucket = gcs_bucket(server)
    small, large = os.urandom(10 * KB), os.urandom(1024 * KB + 3)
    bucket.blob("d/small.bin").upload_from_string(small, content_type="application/octet-stream")
    bucket.blob("d/large.bin", chunk_size=256 * KB).upload_from_file(io.BytesIO(large), size=len(large))
    token = tokens.mint_id_token(server.project_id, "p1")
    photo = b"\xff\xd8" + os.urandom(5 * KB)
    v0 = f"{server.storage_url}/v0/b/{bucket.name}/o"
    r = requests.post(v0, params={"name": "cases/p1/c1/image.jpg"}, data=photo, timeout=30,
                      headers={"Authorization": f"Firebase {token}", "Content-Type": "image/jpeg"})
    assert r.status_code == 200
    generations = {b.name: b.generation for b in bucket.client.list_blobs(bucket)}

    server.kill9()
    server.start()  # same data directory and ports
    bucket = gcs_bucket(server)
    assert bucket.blob("d/small.bin").download_as_bytes() == small
    assert bucket.blob("d/large.bin").download_as_bytes() == large
    assert {b.name: b.generation for b in bucket.client.list_blobs(bucket)} == generations
    token = tokens.mint_id_token(server.project_id, "p1")
    r = requests.get(f"{v0}/{quote('cases/p1/c1/image.jpg', safe='')}", params={"alt": "media"},
                     headers={"Authorization": f"Firebase {token}"}, timeout=30)
    assert r.status_code == 200 and r.content == photo


def test_interrupted_uploads_are_never_visible_and_resume_after_restart(server):
    bucket = gcs_bucket(server)
    data = os.urandom(768 * KB + 11)
    url = bucket.blob("i/resumable.bin").create_resumable_upload_session(content_type="application/octet-stream")
    first = requests.put(url, data=data[:256 * KB], headers={"Content-Range": f"bytes 0-{256 * KB - 1}/*"}, timeout=30)
    assert first.status_code == 308

    # a multipart upload whose body is still arriving when the server dies
    parts = urlsplit(server.storage_url)
    body = (b"--b\r\nContent-Type: application/json\r\n\r\n{\"name\": \"i/multipart.bin\"}\r\n"
            b"--b\r\nContent-Type: application/octet-stream\r\n\r\n" + os.urandom(64 * KB))
    sock = socket.create_connection((parts.hostname, parts.port))
    sock.sendall((f"POST /upload/storage/v1/b/{bucket.name}/o?uploadType=multipart HTTP/1.1\r\n"
                  f"Host: {parts.netloc}\r\nContent-Type: multipart/related; boundary=b\r\n"
                  f"Content-Length: {len(body) + 100 * KB}\r\n\r\n").encode() + body)
    try:
        server.kill9()
    finally:
        sock.close()
    server.start()

    bucket = gcs_bucket(server)
    assert not bucket.blob("i/multipart.bin").exists()
    assert not bucket.blob("i/resumable.bin").exists()
    assert [b.name for b in bucket.client.list_blobs(bucket, prefix="i/")] == []
    assert list((server.data_dir / "storage" / "tmp").iterdir()) == []

    status = requests.put(url, headers={"Content-Range": "bytes */*"}, timeout=30)
    assert status.status_code == 308 and status.headers["Range"] == f"bytes=0-{256 * KB - 1}"
    done = requests.put(url, data=data[256 * KB:], timeout=30,
                        headers={"Content-Range": f"bytes {256 * KB}-{len(data) - 1}/{len(data)}"})
    assert done.status_code == 200
    assert bucket.blob("i/resumable.bin").download_as_bytes() == data
