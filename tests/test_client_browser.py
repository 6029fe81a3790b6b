"""The patient app end to end in headless Chromium, against a real localbase and a real worker:
create an account, consent, take a case with the backend down and get the device answer at once,
bring the backend back and watch the upload and the cloud result arrive, then a dermatologist's
review and a chat both ways. A screenshot of each step lands in var/test-screens/patient-app/."""

from __future__ import annotations

import re
import shutil
import uuid

import pytest

from dermaloop import cases
from dermaloop.database import UserDatabase, admin_reference
from dermaloop.taxonomy import load_taxonomy
from localbase.tokens import mint_id_token
from tests.browser_support import (
    LAUNCH_ARGS,
    AppProcess,
    Shots,
    open_flet,
    require_browser,
    shots_folder,
    type_into,
)
from tests.localbase_process import LocalbaseProcess
from tests.worker_support import WorkerProcess, lesion_jpeg, tiny_device_model_dir, tiny_model_dir, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.browser]


@pytest.fixture
def system(tmp_path, analysis_models_dir):
    require_browser()
    backend = LocalbaseProcess(data_dir=tmp_path / "localbase").start()
    settings = backend.settings()
    models = tmp_path / "models"
    shutil.copytree(analysis_models_dir / "localiser", models / "localiser")
    tiny_device_model_dir(models / "device-tiny", version="device-tiny-1")
    worker = WorkerProcess(settings, tiny_model_dir(tmp_path / "cloud-model", version="cloud-tiny-1"), "w-browser",
                           env_extra={"DERMALOOP_MODELS_DIR": str(models)}).start()
    client = AppProcess("client", settings, ["--data-dir", str(tmp_path / "device")],
                        env_extra={"DERMALOOP_MODELS_DIR": str(models)}).start()
    yield backend, settings, client
    print("client output (tail):\n" + "".join(client.lines[-60:]))  # shown when the test fails
    print("worker output (tail):\n" + "".join(worker.lines[-30:]))
    client.stop()
    worker.terminate()
    backend.stop()


def test_patient_offline_case_then_cloud_result_review_and_chat(system, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    backend, settings, client = system
    expect.set_options(timeout=60_000)  # a first paint on 2 busy cores; not a speed check
    shot = Shots(shots_folder("patient-app"))
    photo = tmp_path / "spot.jpg"
    photo.write_bytes(lesion_jpeg(3, (640, 480)))
    email = f"pat-{uuid.uuid4().hex[:6]}@dermaloop.test"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=LAUNCH_ARGS)
        page = browser.new_page(viewport={"width": 900, "height": 1100})
        page.set_default_timeout(120_000)
        open_flet(page, client.url)

        type_into(page, "Email", email)
        type_into(page, "Password", "weak")
        page.get_by_role("button", name="Create account").click()
        expect(page.get_by_text("Choose a stronger password")).to_be_visible()
        shot(page, "weak-password")
        type_into(page, "Password", "patient-pass-1")
        page.get_by_role("button", name="Create account").click()
        expect(page.get_by_text("Before your first photo")).to_be_visible()
        shot(page, "consent")
        page.get_by_role("checkbox").click()
        page.get_by_role("button", name="I agree").click()
        expect(page.get_by_role("button", name="New case")).to_be_visible()
        shot(page, "home-empty")

        backend.stop()  # the clinic's server is down: the device still answers
        page.get_by_role("button", name="New case").click()
        notes = tmp_path / "notes.txt"  # the wrong file first: it travels like a photo, then is refused
        notes.write_text("not a photo")
        with page.expect_file_chooser() as chooser:
            page.get_by_role("button", name="Choose photo").click()
        chooser.value.set_files(str(notes))
        expect(page.get_by_text("notes.txt is not a photo this app can read")).to_be_visible()
        shot(page, "not-a-photo")
        assert list((tmp_path / "device" / "incoming").iterdir()) == []  # the upload was read and deleted
        with page.expect_file_chooser() as chooser:
            page.get_by_role("button", name="Choose another photo").click()
        chooser.value.set_files(str(photo))
        expect(page.get_by_text("On-device answer")).to_be_visible()
        expect(page.get_by_text("Model version: device-tiny-1")).to_be_visible()
        expect(page.get_by_role("img", name="Your photo with the proposed lesion box")).to_be_visible()
        page.wait_for_timeout(1000)  # let the browser paint the decoded picture before the screenshot
        shot(page, "device-answer-offline")
        page.get_by_role("button", name="Body site").click()
        page.get_by_role("button", name="Forearm", exact=True).click()
        page.get_by_role("checkbox", name="It itches").click()
        send = page.get_by_role("button", name="Save and send").or_(
            page.get_by_role("button", name="Send to a dermatologist anyway"))
        send.first.click()
        expect(page.get_by_text("On this device only")).to_be_visible()
        shot(page, "case-offline")

        backend.start()  # same ports and data: the sync engine uploads, the worker diagnoses
        expect(page.get_by_text("Cloud result ready")).to_be_visible(timeout=300_000)
        expect(page.get_by_text("Cloud model version: cloud-tiny-1")).to_be_visible()
        shot(page, "cloud-result")

        root = admin_reference("/", settings, app_name=f"browser-{uuid.uuid4().hex[:6]}")
        (uid, patient_cases), = [(u, c) for u, c in (root.child("cases").get() or {}).items()]
        (case_id, case), = patient_cases.items()
        assert case["note"]["site"] == "forearm" and "itches" in case["note"]["text"]
        assert case["consent"]["research"] is True and case["device"]["modelVersion"] == "device-tiny-1"
        assert case.get("flags", {}).get("sentAnyway", False) == ("top" not in case["device"])
        derm_uid = "derm-" + uuid.uuid4().hex[:6]
        derm = UserDatabase(mint_id_token(settings.project_id, derm_uid, {"role": "dermatologist"}), settings)
        review = cases.review_record(derm_uid, "nv", "A harmless mole. Check it again in a year.", "routine",
                                     taxonomy_labels=load_taxonomy().ids)
        derm.update(cases.case_path(uid, case_id), {"review": review, "status": "reviewed"})
        derm.push(cases.messages_path(uid, case_id),
                  cases.message_record(derm_uid, "dermatologist", "Has it changed since you first saw it?"))
        expect(page.get_by_text("Reviewed by a dermatologist")).to_be_visible()
        expect(page.get_by_text("A harmless mole. Check it again in a year.")).to_be_visible()
        expect(page.get_by_text("Has it changed since you first saw it?", exact=False)).to_be_visible()
        shot(page, "review-and-message")

        # The dermatologist writes again while the patient is typing: the live redraw keeps the box,
        # its text and its focus, so the patient types on without clicking back into it.
        type_into(page, "Message", "No, it has looked")
        derm.push(cases.messages_path(uid, case_id), cases.message_record(derm_uid, "dermatologist", "Take your time."))
        expect(page.get_by_text("Take your time.", exact=False)).to_be_visible()
        page.keyboard.type(" the same for years.", delay=15)
        page.get_by_role("button", name="Send message").click()
        wait_until(lambda: any(m.get("senderRole") == "patient" for m in
                               (derm.get(cases.messages_path(uid, case_id)) or {}).values()), "the patient's reply")
        replies = [m["text"] for m in derm.get(cases.messages_path(uid, case_id)).values()
                   if m.get("senderRole") == "patient"]
        assert replies == ["No, it has looked the same for years."]
        expect(page.get_by_text("No, it has looked the same for years.", exact=False)).to_be_visible()
        shot(page, "chat")
        page.get_by_role("button", name="Back to my cases").click()
        expect(page.get_by_role("button", name=re.compile("Reviewed by a dermatologist"))).to_be_visible()
        shot(page, "home-with-case")

        # The same spot again, weeks later: linked to the first case and shown side by side.
        page.get_by_role("button", name="New case").click()
        with page.expect_file_chooser() as chooser:
            page.get_by_role("button", name="Choose photo").click()
        chooser.value.set_files(str(photo))
        expect(page.get_by_text("On-device answer")).to_be_visible()
        page.get_by_role("button", name="Same spot as an earlier case").click()
        page.get_by_role("button", name=re.compile(r"^\d\d \w{3} \d{4}, \d\d:\d\d$")).click()
        page.get_by_role("button", name="Save and send").or_(
            page.get_by_role("button", name="Send to a dermatologist anyway")).first.click()
        expect(page.get_by_text("Earlier photo,", exact=False)).to_be_visible()
        expect(page.get_by_text("Dermatologist: Melanocytic nevus", exact=False)).to_be_visible()
        page.wait_for_timeout(1000)  # let the browser paint both pictures before the screenshot
        shot(page, "same-spot-side-by-side")
        wait_until(lambda: len(root.child(cases.patient_cases_path(uid)).get() or {}) == 2, "the second case")
        second = [c for cid, c in root.child(cases.patient_cases_path(uid)).get().items() if cid != case_id][0]
        assert second["sameLesionAs"] == case_id
        page.get_by_role("button", name="Back to my cases").click()

        page.get_by_role("button", name="Delete my data").click()
        expect(page.get_by_text("Delete all your data?")).to_be_visible()
        shot(page, "delete-confirm")
        page.get_by_role("button", name="Delete everything").click()
        expect(page.get_by_text("has been deleted", exact=False)).to_be_visible(timeout=300_000)
        expect(page.get_by_role("button", name="Sign in")).to_be_visible()
        shot(page, "deleted")
        assert root.child(cases.patient_cases_path(uid)).get() is None
        assert root.child(cases.messages_path(uid, case_id)).get() is None
        assert root.child(cases.job_path(case_id)).get() is None
        browser.close()
