"""Benchmark localbase Storage and Auth: upload/download throughput and sign-in rate.

Starts a real localbase (project rules) on free ports in a temporary directory and measures, in one run:

* baselines: writing a file + fsync and reading it back on the same disk (the floor a durable upload
  sits on), and one scrypt password hash with localbase's parameters (the floor of a sign-in);
* upload and download MB/s of 100 KB and 10 MB objects through the GCS JSON API
  (google-cloud-storage, as admin; 10 MB goes resumable in 8 MiB chunks) and through the Firebase
  ``/v0`` API as a signed-in patient under storage.rules (dermaloop.storage.UserStorage: multipart
  for 100 KB, resumable in 1 MiB chunks for 10 MB);
* password sign-ins per second, sequential and from 4 concurrent clients.

Usage: ``python bench/bench_storage_auth.py [--repeats N] [--signins M]``
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dermaloop import auth as dl_auth  # noqa: E402
from dermaloop.storage import UserStorage, admin_bucket  # noqa: E402
from localbase.auth.store import SCRYPT_N, SCRYPT_P, SCRYPT_R  # noqa: E402
from tests.localbase_process import LocalbaseProcess  # noqa: E402

MB = 1024 * 1024
SIZES = {"100 KB": 100 * 1024, "10 MB": 10 * MB}


def timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def mbps(size: int, seconds: float) -> float:
    return size / MB / seconds


def disk_baseline(directory: Path, data: bytes, repeats: int) -> tuple[float, float]:
    path = directory / f"baseline-{uuid.uuid4().hex}"

    def write() -> None:
        with open(path, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    def read() -> None:
        path.read_bytes()

    w, r = timed(write, repeats), timed(read, repeats)
    path.unlink()
    return mbps(len(data), w), mbps(len(data), r)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--signins", type=int, default=60)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        server = LocalbaseProcess(data_dir=Path(tmp) / "data").start()
        try:
            settings = server.settings()
            bucket = admin_bucket(settings)
            email = f"bench-{uuid.uuid4().hex[:6]}@example.com"
            user, _ = dl_auth.create_user(email, "secret123", "patient", settings=settings)
            client = dl_auth.AuthClient(settings)
            session = client.sign_in(email, "secret123")
            user_storage = UserStorage(session, settings)

            rows = []
            for label, size in SIZES.items():
                data = b"\xff\xd8" + os.urandom(size - 2)
                disk_w, disk_r = disk_baseline(Path(tmp), data, args.repeats)
                rows.append((f"baseline: file write+fsync / read, {label}", disk_w, disk_r))

                name = f"bench/{uuid.uuid4().hex}.bin"

                def gcs_up(name=name, data=data) -> None:
                    blob = bucket.blob(name, chunk_size=8 * MB if len(data) > 8 * MB else None)
                    blob.upload_from_file(io.BytesIO(data), size=len(data), content_type="image/jpeg")

                def gcs_down(name=name, size=size) -> None:
                    assert len(bucket.blob(name).download_as_bytes()) == size

                up = timed(gcs_up, args.repeats)
                down = timed(gcs_down, args.repeats)
                rows.append((f"GCS JSON API (google-cloud-storage), {label}", mbps(size, up), mbps(size, down)))

                path = f"cases/{user.uid}/bench-{uuid.uuid4().hex[:8]}/image.jpg"

                def v0_up(path=path, data=data) -> None:
                    user_storage.upload(path, data, "image/jpeg")

                def v0_down(path=path, size=size) -> None:
                    assert len(user_storage.download(path)) == size

                up = timed(v0_up, args.repeats)
                down = timed(v0_down, args.repeats)
                rows.append((f"/v0 API as a patient (rules), {label}", mbps(size, up), mbps(size, down)))

            salt = os.urandom(16)
            hash_s = timed(lambda: hashlib.scrypt(b"secret123", salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                                                  dklen=32), args.repeats * 4)
            start = time.perf_counter()
            for _ in range(args.signins):
                client.sign_in(email, "secret123")
            sequential = args.signins / (time.perf_counter() - start)

            def sign_in(_: int) -> None:
                dl_auth.AuthClient(settings).sign_in(email, "secret123")

            start = time.perf_counter()
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(sign_in, range(args.signins)))
            concurrent = args.signins / (time.perf_counter() - start)
        finally:
            server.stop()

    print(f"{'path':<52} {'upload MB/s':>12} {'download MB/s':>14}")
    for label, up, down in rows:
        print(f"{label:<52} {up:>12.1f} {down:>14.1f}")
    print()
    print(f"baseline: one scrypt hash (n=2^{SCRYPT_N.bit_length() - 1}, r={SCRYPT_R}, p={SCRYPT_P}): "
          f"{hash_s * 1000:.1f} ms = {1 / hash_s:.1f} hashes/s on one core")
    print(f"password sign-ins, sequential: {sequential:.1f}/s")
    print(f"password sign-ins, 4 concurrent clients: {concurrent:.1f}/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
