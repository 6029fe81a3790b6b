"""``dermaloop submit IMAGE... --email E --password P [--wait] [--json]``: a scriptable patient.

It does exactly what the patient app does after a photo is taken, with the patient's own rights
(the security rules apply): sign in through Auth REST, upload the photo through the Storage ``/v0``
API with the ID token, then create the case and its job in one multi-path write (the records and
paths are ``dermaloop.cases``). With ``--wait`` it listens to the patient's cases and prints each cloud result
as it arrives. Tests and benchmarks drive the system through it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dermaloop import DISCLAIMER, cases

_CONTENT_TYPES = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="photo files to submit, one case each")
    parser.add_argument("--email", required=True, help="the patient's sign-in email")
    parser.add_argument("--password", required=True, help="the patient's password")
    parser.add_argument("--wait", action="store_true", help="wait for and print each case's cloud result")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--timeout", type=float, default=600.0, help="with --wait: give up after this many seconds")
    parser.add_argument("--site", default=None, help="body site, stored in the case note")
    parser.add_argument("--note", default=None, help="what the patient reports, stored in the case note")
    parser.add_argument("--research-consent", action="store_true",
                        help="allow the case to be used for retraining once a dermatologist labelled it")


class SubmitError(Exception):
    """A photo could not be submitted (unreadable, refused by the rules, network)."""


@dataclass(frozen=True)
class Submitted:
    case_id: str
    source: str
    sha256: str
    submitted_at: float  # client clock, right after the case and job were written


def describe_image(data: bytes) -> tuple[str, int, int]:
    """Content type and size as the app records them; refuses what is not a photo, as the app does."""
    import io

    from PIL import Image

    from dermaloop.preprocess import ImageError, load_image

    try:
        width, height = load_image(data).size  # first: its errors say what is wrong in plain words
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format or ""
    except (ImageError, OSError, SyntaxError, ValueError) as exc:
        raise SubmitError(f"not a usable photo: {exc}") from exc
    if fmt not in _CONTENT_TYPES:
        raise SubmitError(f"unsupported image format {fmt!r}: send a JPEG, PNG or WebP photo")
    return _CONTENT_TYPES[fmt], width, height


class Patient:
    """A signed-in patient who submits photos and follows the cloud results."""

    def __init__(self, email: str, password: str, settings=None) -> None:
        from dermaloop.auth import AuthClient
        from dermaloop.database import UserDatabase
        from dermaloop.settings import load_settings
        from dermaloop.storage import UserStorage

        self.settings = settings or load_settings()
        self.session = AuthClient(self.settings).sign_in(email, password)
        self.uid = self.session.uid
        self.db = UserDatabase(self.session, self.settings)
        self.storage = UserStorage(self.session, self.settings)

    def submit(self, data: bytes, source: str = "<bytes>", content_type: str | None = None,
               width: int | None = None, height: int | None = None, site: str | None = None,
               note: str | None = None, research: bool = False, device: dict[str, Any] | None = None) -> Submitted:
        from dermaloop.database import new_push_id

        if content_type is None or width is None or height is None:
            content_type, width, height = describe_image(data)
        case_id = new_push_id()
        digest = hashlib.sha256(data).hexdigest()
        try:  # the whole record is checked before anything leaves the machine
            image = cases.image_record(self.uid, case_id, digest, content_type, len(data), width, height)
            case = cases.new_case(self.uid, case_id, image, research, note=cases.note_record(site, note), device=device)
        except cases.CaseError as exc:
            raise SubmitError(str(exc)) from exc
        self.storage.upload(image["path"], data, content_type)
        # One multi-path write: the case and its job appear together or not at all.
        self.db.update("/", cases.new_case_writes(case))
        return Submitted(case_id, source, digest, time.time())

    def follow(self, on_change: Callable[[str], None]):
        """Listen to this patient's cases (as the app does) and call ``on_change(caseId)`` for every
        case an event touched. Returns the listener; ``close()`` it."""

        def on_event(event) -> None:
            for case_id in cases.touched_cases(event.path, event.data):
                on_change(case_id)

        return self.db.listen(cases.patient_cases_path(self.uid), on_event)

    def case(self, case_id: str) -> dict[str, Any] | None:
        case = self.db.get(cases.case_path(self.uid, case_id))
        return case if isinstance(case, dict) else None

    def wait(self, case_ids: list[str], on_result: Callable[[str, dict[str, Any]], None],
             timeout: float = 600.0, poll_s: float = 10.0) -> set[str]:
        """Call ``on_result(caseId, case)`` once per case as it settles; returns the ids still open.
        The listener brings results at once; a slow poll covers a stream that went quiet."""
        remaining = set(case_ids)
        lock = threading.Lock()
        changed = threading.Event()

        def check(case_id: str) -> None:
            with lock:
                if case_id not in remaining:
                    return
            case = self.case(case_id)
            if case is not None and case.get("status") in cases.SETTLED:
                with lock:
                    if case_id not in remaining:
                        return
                    remaining.discard(case_id)
                on_result(case_id, case)
                changed.set()

        listener = self.follow(check)
        try:
            deadline = time.monotonic() + timeout
            next_poll = 0.0
            while remaining and time.monotonic() < deadline:
                if time.monotonic() >= next_poll:  # also catches what settled before the listener connected
                    for case_id in list(remaining):
                        check(case_id)
                    next_poll = time.monotonic() + poll_s
                changed.wait(min(1.0, max(0.0, deadline - time.monotonic())))
                changed.clear()
            return set(remaining)
        finally:
            listener.close()


def _summary(source: str, case_id: str, case: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"image": source, "caseId": case_id, "status": case.get("status")}
    if case.get("cloud"):
        cloud = case["cloud"]
        out.update(risk=cloud.get("risk"), top=cloud.get("top"), modelVersion=cloud.get("modelVersion"),
                   quality=cloud.get("quality"), lesion=cloud.get("lesion"), heatmapPath=cloud.get("heatmapPath"))
    if case.get("failure"):
        failure = case["failure"]
        out["failure"] = dict(failure, message=cases.failure_message(failure.get("reason")))
    return out


def _print(record: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(record, sort_keys=True), flush=True)
        return
    line = f"{record['image']}: case {record['caseId']} {record['status']}"
    if record.get("top"):
        top = ", ".join(f"{t['name']} {t['p']:.0%}" for t in record["top"])
        line += f"; risk {record.get('risk')}; {top} (model {record.get('modelVersion')})"
    if record.get("failure"):
        line += f"; {record['failure']['message']}"
    print(line, flush=True)


def run(args: argparse.Namespace) -> int:
    from dermaloop.auth import AuthError

    photos = []
    for name in args.images:
        try:
            data = Path(name).read_bytes()
            photos.append((name, data, *describe_image(data)))
        except (OSError, SubmitError) as exc:
            print(f"dermaloop submit: {name}: {exc}", file=sys.stderr)
            return 2
    try:
        patient = Patient(args.email, args.password)
    except AuthError as exc:
        print(f"dermaloop submit: sign-in failed: {exc}", file=sys.stderr)
        return 2
    submitted: dict[str, Submitted] = {}
    for name, data, content_type, width, height in photos:
        try:
            s = patient.submit(data, name, content_type, width, height, site=args.site, note=args.note,
                               research=args.research_consent)
        except Exception as exc:  # the rules refused, the network failed: say which photo
            print(f"dermaloop submit: {name}: upload failed: {exc}", file=sys.stderr)
            return 1
        submitted[s.case_id] = s
        _print({"image": name, "caseId": s.case_id, "status": cases.Status.QUEUED.value}, args.json)
    if not args.wait:
        return 0
    outcome = {"failed": 0}

    def on_result(case_id: str, case: dict[str, Any]) -> None:
        record = _summary(submitted[case_id].source, case_id, case)
        record["latencyS"] = round(time.time() - submitted[case_id].submitted_at, 3)
        if record["status"] == "failed":
            outcome["failed"] += 1
        _print(record, args.json)

    open_ids = patient.wait(list(submitted), on_result, timeout=args.timeout)
    for case_id in sorted(open_ids):
        print(f"dermaloop submit: no cloud result for case {case_id} after {args.timeout:.0f} s", file=sys.stderr)
    if not args.json:
        print(DISCLAIMER)
    return 1 if open_ids or outcome["failed"] else 0
