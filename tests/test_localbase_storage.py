"""The GCS JSON API through the unmodified google-cloud-storage / firebase_admin.storage clients."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import socket
import time
import uuid
from urllib.parse import urlsplit

import google_crc32c
import pytest
import requests
from google.api_core import exceptions as gexc

from dermaloop.storage import admin_bucket

KB = 1024


@pytest.fixture(scope="module")
def bucket(localbase):
    return admin_bucket(localbase.settings())


@pytest.fixture
def prefix() -> str:
    return f"t-{uuid.uuid4().hex[:8]}/"


def b64_md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def b64_crc32c(data: bytes) -> str:
    return base64.b64encode(google_crc32c.Checksum(data).digest()).decode()


def test_small_upload_round_trip_with_checksums(bucket, prefix):
    data = os.urandom(100 * KB)
    blob = bucket.blob(prefix + "photo one.jpg")
    blob.metadata = {"caseId": "c1"}
    blob.upload_from_string(data, content_type="image/jpeg")
    fetched = bucket.get_blob(prefix + "photo one.jpg")
    assert fetched.size == len(data)
    assert fetched.md5_hash == b64_md5(data) and fetched.crc32c == b64_crc32c(data)
    assert fetched.content_type == "image/jpeg" and fetched.metadata == {"caseId": "c1"}
    assert fetched.generation > 0 and fetched.metageneration == 1
    assert fetched.download_as_bytes() == data  # the client checks the x-goog-hash header too
    assert bucket.blob(prefix + "photo one.jpg").download_as_bytes(start=10, end=19) == data[10:20]


def test_multi_chunk_resumable_uploads_are_byte_exact(bucket, prefix):
    data = os.urandom(3 * 1024 * KB + 17)  # not a multiple of the chunk size
    known = bucket.blob(prefix + "known-size.bin", chunk_size=256 * KB)
    known.upload_from_file(io.BytesIO(data), size=len(data), content_type="application/octet-stream")
    assert bucket.blob(prefix + "known-size.bin").download_as_bytes() == data
    with bucket.blob(prefix + "streamed.bin").open("wb", chunk_size=256 * KB) as fh:  # size unknown up front
        for start in range(0, len(data), 100 * KB):
            fh.write(data[start:start + 100 * KB])
    streamed = bucket.get_blob(prefix + "streamed.bin")
    assert streamed.size == len(data) and streamed.crc32c == b64_crc32c(data)
    assert streamed.download_as_bytes() == data


def test_resume_after_a_broken_connection(localbase, bucket, prefix):
    data = os.urandom(1024 * KB + 5)
    blob = bucket.blob(prefix + "resumed.bin")
    url = blob.create_resumable_upload_session(content_type="application/octet-stream")
    assert urlsplit(url).netloc == urlsplit(localbase.storage_url).netloc
    first = requests.put(url, data=data[:256 * KB], headers={"Content-Range": f"bytes 0-{256 * KB - 1}/*"}, timeout=30)
    assert first.status_code == 308 and first.headers["Range"] == f"bytes=0-{256 * KB - 1}"

    # A chunk whose connection dies after 100 KB of its 512 KB.
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port)) as sock:
        head = (f"PUT {parts.path}?{parts.query} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                f"Content-Range: bytes {256 * KB}-{768 * KB - 1}/*\r\nContent-Length: {512 * KB}\r\n\r\n")
        sock.sendall(head.encode() + data[256 * KB:356 * KB])
        time.sleep(0.3)

    status = requests.put(url, headers={"Content-Range": "bytes */*"}, timeout=30)
    assert status.status_code == 308
    kept = int(status.headers["Range"].split("-")[1]) + 1
    assert 256 * KB <= kept <= 356 * KB
    assert not blob.exists()  # an unfinished upload is never visible
    done = requests.put(url, data=data[kept:], timeout=30,
                        headers={"Content-Range": f"bytes {kept}-{len(data) - 1}/{len(data)}"})
    assert done.status_code == 200 and done.json()["crc32c"] == b64_crc32c(data)
    assert bucket.blob(prefix + "resumed.bin").download_as_bytes() == data


def test_metadata_patch(bucket, prefix):
    blob = bucket.blob(prefix + "meta.txt")
    blob.upload_from_string(b"hello", content_type="text/plain")
    generation = blob.generation
    blob.metadata = {"owner": "u1", "x": "1"}
    blob.cache_control = "no-cache"
    blob.patch()
    assert blob.metageneration == 2 and blob.metadata == {"owner": "u1", "x": "1"}
    blob.metadata = {"owner": None, "y": "2"}
    blob.content_type = "text/markdown"
    blob.patch()
    fresh = bucket.get_blob(prefix + "meta.txt")
    assert fresh.metadata == {"x": "1", "y": "2"}
    assert fresh.content_type == "text/markdown" and fresh.cache_control == "no-cache"
    assert fresh.generation == generation and fresh.metageneration == 3
    assert fresh.download_as_bytes() == b"hello"


def test_list_pages_prefixes_and_delete(localbase, bucket, prefix):
    names = [f"{prefix}{n}" for n in ("a.txt", "b.txt", "c.txt", "d/1.txt", "d/2.txt", "e/1.txt", "f.txt")]
    for name in names:
        bucket.blob(name).upload_from_string(name.encode())
    client = bucket.client
    pages = list(client.list_blobs(bucket, prefix=prefix, page_size=3).pages)
    assert [p.num_items for p in pages] == [3, 3, 1]
    assert [b.name for page in pages for b in page] == sorted(names)

    iterator = client.list_blobs(bucket, prefix=prefix, delimiter="/", page_size=2)
    seen = [b.name for page in iterator.pages for b in page]
    assert seen == [f"{prefix}a.txt", f"{prefix}b.txt", f"{prefix}c.txt", f"{prefix}f.txt"]
    assert iterator.prefixes == {f"{prefix}d/", f"{prefix}e/"}

    bucket.blob(f"{prefix}d/1.txt").delete()
    assert not bucket.blob(f"{prefix}d/1.txt").exists()
    with pytest.raises(gexc.NotFound):
        bucket.blob(f"{prefix}d/1.txt").delete()
    assert sorted(b.name for b in client.list_blobs(bucket, prefix=prefix)) == sorted(set(names) - {f"{prefix}d/1.txt"})


def test_preconditions(bucket, prefix):
    blob = bucket.blob(prefix + "pre.txt")
    blob.upload_from_string(b"v1", if_generation_match=0)  # create only if absent
    with pytest.raises(gexc.PreconditionFailed):
        bucket.blob(prefix + "pre.txt").upload_from_string(b"v2", if_generation_match=0)
    with pytest.raises(gexc.PreconditionFailed):
        bucket.blob(prefix + "pre.txt").upload_from_string(b"v2", if_generation_match=blob.generation + 1)
    assert bucket.blob(prefix + "pre.txt").download_as_bytes() == b"v1"
    blob.upload_from_string(b"v2", if_generation_match=blob.generation)
    assert bucket.blob(prefix + "pre.txt").download_as_bytes() == b"v2"
    with pytest.raises(gexc.PreconditionFailed):
        blob.patch(if_metageneration_match=blob.metageneration + 5)
    with pytest.raises(gexc.PreconditionFailed):
        bucket.blob(prefix + "pre.txt").delete(if_generation_match=blob.generation + 1)
    assert bucket.blob(prefix + "pre.txt").exists()
    big = os.urandom(600 * KB)
    with pytest.raises(gexc.PreconditionFailed):  # resumable uploads honour preconditions too
        bucket.blob(prefix + "pre.txt", chunk_size=256 * KB).upload_from_file(io.BytesIO(big), if_generation_match=0)
    assert bucket.blob(prefix + "pre.txt").download_as_bytes() == b"v2"


def test_copy_rewrite_and_bucket(localbase, bucket, prefix):
    src = bucket.blob(prefix + "src.bin")
    data = os.urandom(50 * KB)
    src.upload_from_string(data, content_type="image/png")
    copy = bucket.copy_blob(src, bucket, prefix + "copy.bin")
    assert copy.download_as_bytes() == data and copy.content_type == "image/png"
    assert copy.generation != src.generation
    target = bucket.blob(prefix + "rewritten.bin")
    token, done, total = target.rewrite(src)
    assert token is None and done == total == len(data)
    assert target.download_as_bytes() == data
    assert bucket.client.get_bucket(bucket.name).name == bucket.name
    # links follow the Host the client used (gotcha 3)
    alias = localbase.storage_url.replace("127.0.0.1", "localhost")
    meta = requests.get(f"{alias}/storage/v1/b/{bucket.name}/o/{prefix.rstrip('/')}%2Fsrc.bin", timeout=30).json()
    assert meta["mediaLink"].startswith(alias + "/download/")


def test_bad_input_is_refused_and_nothing_is_half_written(localbase, bucket, prefix):
    base = f"{localbase.storage_url}/upload/storage/v1/b/{bucket.name}/o"
    for bad in ("a/../b.txt", "./x", "line\nbreak", "", "x" * 1025):
        r = requests.post(base, params={"uploadType": "media", "name": bad}, data=b"x", timeout=30)
        assert r.status_code == 400, bad
        assert r.json()["error"]["code"] == 400
    existing = bucket.blob(prefix + "keep.txt")
    existing.upload_from_string(b"original")

    def multipart(body_meta: str, payload: bytes, tail: bytes = b"\r\n--bnd--\r\n") -> requests.Response:
        body = (b"--bnd\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n" + body_meta.encode()
                + b"\r\n--bnd\r\nContent-Type: text/plain\r\n\r\n" + payload + tail)
        return requests.post(base, params={"uploadType": "multipart"}, data=body, timeout=30,
                             headers={"Content-Type": 'multipart/related; boundary="bnd"'})

    name = prefix + "keep.txt"
    truncated = multipart(f'{{"name": "{name}"}}', b"replacement", tail=b"\r\n--bn")
    assert truncated.status_code == 400 and "multipart" in truncated.json()["error"]["message"]
    bad_crc = multipart(f'{{"name": "{name}", "crc32c": "AAAAAA=="}}', b"replacement")
    assert bad_crc.status_code == 400 and "crc32c" in bad_crc.json()["error"]["message"]
    not_json = multipart("{name: oops", b"replacement")
    assert not_json.status_code == 400
    assert bucket.blob(name).download_as_bytes() == b"original"
    assert [b.name for b in bucket.client.list_blobs(bucket, prefix=prefix)] == [name]
    assert tmp_files(localbase) == []
    bogus_session = requests.put(f"{base}?uploadType=resumable&upload_id=nope", data=b"x", timeout=30)
    assert bogus_session.status_code == 404
    assert requests.get(f"{localbase.storage_url}/storage/v1/b/{bucket.name}/o/nothing-here", timeout=30).status_code == 404
    assert bucket.blob(name).download_as_bytes() == b"original"  # still serving


def tmp_files(localbase) -> list[str]:
    return sorted(p.name for p in (localbase.data_dir / "storage" / "tmp").iterdir())
