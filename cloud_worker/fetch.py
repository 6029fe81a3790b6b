"""Get a case's photo from Storage and prove it is the one the patient's phone uploaded.

The case record carries the sha256 the app computed before upload; the worker refuses to diagnose
bytes that do not match it (a swapped, partial or tampered upload must never get somebody's result).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from google.api_core import exceptions as gexc

from cloud_worker.errors import permanent, transient
from dermaloop import cases
from dermaloop.preprocess import MAX_BYTES


@dataclass(frozen=True)
class Upload:
    path: str
    data: bytes
    sha256: str


def expected_image(case: dict[str, Any], uid: str, case_id: str) -> tuple[str, str]:
    """The Storage path and sha256 a case claims for its photo (validated, since clients wrote them)."""
    image = case.get("image")
    if not isinstance(image, dict):
        raise permanent("missing_upload", "the case has no image record")
    path, digest = image.get("path"), image.get("sha256")
    folder = cases.case_folder(uid, case_id)
    if not isinstance(path, str) or not path.startswith(f"{folder}/"):
        raise permanent("missing_upload", f"image path {path!r} is not under {folder}/")
    if not isinstance(digest, str) or len(digest) != 64:
        raise permanent("hash_mismatch", "the case carries no valid sha256 of its image")
    return path, digest.lower()


def download(bucket, path: str, expected_sha256: str, max_bytes: int = MAX_BYTES) -> Upload:
    """Download and verify; a missing object or a hash mismatch is transient (an upload may be settling)."""
    blob = bucket.blob(path)
    try:
        # One request: a ranged read that stops one byte past the limit (no metadata round trip).
        data = blob.download_as_bytes(start=0, end=max_bytes, checksum=None)
    except gexc.NotFound:
        raise transient("missing_upload", f"no object at {path}") from None
    except gexc.RequestRangeNotSatisfiable:  # what GCS answers a range read of an empty object
        data = b""
    except gexc.GoogleAPIError as exc:
        raise transient("internal_error", f"storage download of {path}: {exc}") from exc
    if len(data) > max_bytes:
        raise permanent("image_too_large", f"{path} is larger than the {max_bytes}-byte limit")
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected_sha256:
        raise transient("hash_mismatch", f"{path}: sha256 {digest[:12]}... but the case says {expected_sha256[:12]}...")
    return Upload(path=path, data=data, sha256=digest)
