"""Reviewer-portal latencies as a dermatologist sees them, in headless Chromium against a real localbase.

    .venv/bin/python bench/bench_portal.py [--cases 1000] [--rounds 10]

Seeds ``--cases`` diagnosed cases with queue entries (as the worker writes them, through admin),
starts ``dermaloop portal`` and measures, in the browser:
  * sign-in click -> first queue render (the "N cases match" line) with that many queued cases;
  * a new diagnosed case (admin write of case + queue entry) -> its row visible in the open queue (p50/p95);
  * opening a case -> photo shown, then heatmap shown after the toggle;
  * a patient's chat message (REST as the patient) -> visible in the open case (p50/p95);
  * a dermatologist's message ("Send message" clicked in the portal) -> arrived on the patient's
    REST stream (an RTDB listener as the patient, as the patient app listens) (p50/p95).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dermaloop import cases  # noqa: E402
from dermaloop.auth import create_user  # noqa: E402
from dermaloop.database import UserDatabase, admin_reference, new_push_id  # noqa: E402
from dermaloop.storage import admin_bucket  # noqa: E402
from localbase.tokens import mint_id_token  # noqa: E402
from tests.browser_support import LAUNCH_ARGS, AppProcess, open_flet, type_into  # noqa: E402
from tests.localbase_process import LocalbaseProcess  # noqa: E402

PASSWORD = "bench-pass-1"


def png(colour: tuple[int, int, int], size=(640, 480)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(size=(640, 480)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 150, 130)).save(buffer, format="JPEG")
    return buffer.getvalue()


def diagnosed(uid: str, score: float, site: str, now: int) -> tuple[str, dict, dict]:
    """A case as its patient creates it, and the worker's diagnosis of it (two writes: one update may
    not hold a path and its ancestor)."""
    case_id = new_push_id()
    image = cases.image_record(uid, case_id, hashlib.sha256(case_id.encode()).hexdigest(), "image/jpeg", 100, 640, 480)
    case = cases.new_case(uid, case_id, image, True, note=cases.note_record(site, "bench"), created_at=now)
    cloud = cases.cloud_record(model_version="bench", quality={"ok": True, "issues": []}, lesion=None,
                               box=[0.3, 0.3, 0.7, 0.7], heatmap_path=cases.heatmap_object(uid, case_id),
                               timings_ms={}, message=None, at=now, probs={"nv": 0.6, "mel": 0.4},
                               top=[{"label": "nv", "name": "Mole", "p": 0.6}], risk="moderate", malignant_p=0.4)
    diagnosis = cases.diagnosed_writes(uid, case_id, cloud,
                                       cases.queue_entry(uid, "diagnosed", "moderate", score, now, now), now)
    return case_id, cases.new_case_writes(case), diagnosis


def pct(values: list[float]) -> dict[str, float]:
    return {"p50_ms": round(float(np.percentile(values, 50)) * 1000, 1),
            "p95_ms": round(float(np.percentile(values, 95)) * 1000, 1), "n": len(values)}


def wait_text(page, text: str) -> float:
    page.get_by_text(text, exact=False).first.wait_for(state="visible", timeout=300_000)
    return time.perf_counter()


def to_patient(page, patient_db: UserDatabase, patient: str, case_id: str, rounds: int) -> tuple[list[float], int]:
    """Seconds from the "Send message" click in the portal to the message arriving on the patient's
    stream of the chat (typing is done before the clock starts), and how many sends were retried:
    on busy cores the click can reach the app before the typed text did (see the browser test), and
    then nothing (or a part) is sent; such a round is typed and sent again, not timed."""
    arrived: dict[str, float] = {}
    seen = threading.Condition()

    def on_event(event) -> None:
        data = event.data if isinstance(event.data, dict) else {}
        texts = [data.get("text")] + [m.get("text") for m in data.values() if isinstance(m, dict)]
        with seen:
            for text in texts:
                if isinstance(text, str) and text not in arrived:
                    arrived[text] = time.perf_counter()
            seen.notify_all()

    out, retried = [], 0
    with patient_db.listen(cases.messages_path(patient, case_id), on_event) as listener:
        listener.wait_connected(60)
        while len(out) < rounds:
            if retried > rounds:
                raise RuntimeError(f"{retried} sends did not arrive at the patient's side")
            text = f"bench reply {len(out)} {uuid.uuid4().hex[:6]}"
            type_into(page, "Message to the patient", text)
            page.wait_for_timeout(300)  # the typed value reaches the app before the click
            t0 = time.perf_counter()
            page.get_by_role("button", name="Send message").click()
            with seen:
                got = seen.wait_for(lambda t=text: t in arrived, timeout=30)
            if not got:
                retried += 1
                continue
            out.append(arrived[text] - t0)
            page.get_by_text(text).wait_for(state="visible")  # the portal is ready for the next one
    return out, retried


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    tmp = Path(tempfile.mkdtemp(prefix="bench-portal-"))
    backend = LocalbaseProcess(data_dir=tmp / "localbase").start()
    settings = backend.settings()
    root = admin_reference("/", settings, app_name="bench-portal")
    bucket = admin_bucket(settings)
    patient = f"bench-patient-{uuid.uuid4().hex[:6]}"
    now = int(time.time() * 1000) - 3_600_000
    created: dict = {}
    diagnoses: dict = {}
    ids = []
    for i in range(args.cases):
        case_id, c, d = diagnosed(patient, -1000.0 + i * 0.001, f"site-{i % 7}", now)
        created.update(c)
        diagnoses.update(d)
        ids.append(case_id)
    for writes in (created, diagnoses):
        for start in range(0, len(writes), 2000):  # a few big multi-path writes
            root.update(dict(list(writes.items())[start:start + 2000]))
    top = ids[-1]
    bucket.blob(cases.image_object(patient, top)).upload_from_string(jpeg(), content_type="image/jpeg")
    bucket.blob(cases.heatmap_object(patient, top)).upload_from_string(png((220, 60, 40)), content_type="image/png")
    email = f"bench-derm-{uuid.uuid4().hex[:6]}@dermaloop.test"
    create_user(email, PASSWORD, "dermatologist", settings=settings)
    patient_db = UserDatabase(mint_id_token(settings.project_id, patient, {"role": "patient"}), settings)
    portal = AppProcess("portal", settings, []).start()
    results: dict = {"queued_cases": args.cases}
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=LAUNCH_ARGS)
            page = browser.new_page(viewport={"width": 1100, "height": 1000})
            page.set_default_timeout(300_000)
            open_flet(page, portal.url)
            for _ in range(5):  # a click can beat the typed values to the app (see the browser test)
                type_into(page, "Email", email)
                type_into(page, "Password", PASSWORD)
                page.wait_for_timeout(300)
                t0 = time.perf_counter()
                page.get_by_role("button", name="Sign in").click()
                page.wait_for_timeout(200)
                if not page.get_by_text("Enter your email and password.").count():
                    break
            results["sign_in_to_first_queue_render_ms"] = round((wait_text(page, "cases match") - t0) * 1000, 1)

            new_case = []
            for i in range(args.rounds):
                site = f"fresh-{i}-{uuid.uuid4().hex[:4]}"
                _, c, d = diagnosed(patient, 10.0 + i, site, int(time.time() * 1000))
                root.update(c)
                t0 = time.perf_counter()
                root.update(d)
                new_case.append(wait_text(page, f"site: {site}") - t0)
            results["new_case_visible_in_queue"] = pct(new_case)

            # The seeded case with pictures is right below the fresh ones (highest seeded score).
            t0 = time.perf_counter()
            page.get_by_text(re.compile(rf"· case {re.escape(top)}")).click()
            page.get_by_role("img", name="Case photo").wait_for(state="visible")
            t_photo = time.perf_counter()
            page.get_by_role("switch", name="Heatmap").click()
            t1 = time.perf_counter()
            page.get_by_role("img", name="Heatmap").wait_for(state="visible")
            t_heat = time.perf_counter()
            results["open_case_to_photo_ms"] = round((t_photo - t0) * 1000, 1)
            results["heatmap_toggle_to_shown_ms"] = round((t_heat - t1) * 1000, 1)

            chat = []
            for i in range(args.rounds):
                text = f"bench message {i} {uuid.uuid4().hex[:6]}"
                t0 = time.perf_counter()
                patient_db.push(cases.messages_path(patient, top), cases.message_record(patient, "patient", text))
                chat.append(wait_text(page, text) - t0)
            results["patient_message_visible_in_portal"] = pct(chat)
            replies, retried = to_patient(page, patient_db, patient, top, args.rounds)
            results["dermatologist_message_at_patient_stream"] = {**pct(replies), "sends_retried": retried}
            browser.close()
    finally:
        portal.stop()
        backend.stop()
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
