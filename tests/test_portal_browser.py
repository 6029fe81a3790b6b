"""The reviewer portal end to end in headless Chromium, against a real localbase and a real worker.

A patient submits three photos (``dermaloop.submit_cli.Patient``), the worker diagnoses them, and
they appear in the portal's queue in score order. A patient account is refused; a dermatologist
signs in, opens the top case (claiming it), looks at the heatmap and saves a review, which the
patient reads over REST; a message goes each way; a second dermatologist in another browser context
sees the claim live and cannot save. Screenshots of each step: var/test-screens/reviewer-portal/."""

from __future__ import annotations

import uuid

import pytest

from dermaloop import cases
from dermaloop.auth import create_user
from dermaloop.database import admin_reference
from dermaloop.submit_cli import Patient
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
from tests.worker_support import WorkerProcess, lesion_jpeg, tiny_model_dir, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.browser]
PASSWORD = "portal-pass-1"


@pytest.fixture
def system(tmp_path):
    require_browser()
    backend = LocalbaseProcess(data_dir=tmp_path / "localbase").start()
    settings = backend.settings()
    # No image-analysis model: the worker classifies every photo (and draws its Grad-CAM heatmap)
    # instead of declining synthetic spots as "not a close-up of skin".
    models = tmp_path / "models"
    models.mkdir()
    worker = WorkerProcess(settings, tiny_model_dir(tmp_path / "cloud-model", version="cloud-tiny-1"), "w-portal",
                           env_extra={"DERMALOOP_MODELS_DIR": str(models)}).start()
    portal = AppProcess("portal", settings, []).start()
    yield settings, portal
    portal.stop()
    worker.terminate()
    backend.stop()


def sign_in(page, email: str, outcome: str) -> None:
    """Fill the form and press "Sign in" until ``outcome`` shows. A click can reach the app before
    the typed values did (Flutter sends field changes on their own); the app then asks for the
    email and password again, and the form is filled and sent once more."""
    from playwright.sync_api import expect

    wanted = page.get_by_text(outcome, exact=False)
    asked_again = page.get_by_text("Enter your email and password.")
    password = page.get_by_role("textbox", name="Password")
    for _ in range(5):
        type_into(page, "Email", email)
        type_into(page, "Password", PASSWORD)
        page.get_by_role("button", name="Sign in").click()
        settled = 0
        for _ in range(480):  # up to 2 minutes, like every other wait here
            if settled >= 8:  # the form asked again for 2 s in a row: the values did not arrive
                break
            if wanted.count():
                expect(wanted.first).to_be_visible()
                return
            settled = settled + 1 if asked_again.count() and password.count() else 0
            page.wait_for_timeout(250)
    expect(wanted.first).to_be_visible()


def test_dermatologists_triage_review_and_chat(system, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    settings, portal = system
    shot = Shots(shots_folder("reviewer-portal"))
    tag = uuid.uuid4().hex[:6]
    emails = {role: f"{role}-{tag}@dermaloop.test" for role in ("patient", "derm1", "derm2")}
    create_user(emails["patient"], PASSWORD, "patient", settings=settings)
    derm1 = create_user(emails["derm1"], PASSWORD, "dermatologist", display_name="Dr One", settings=settings)[0]
    create_user(emails["derm2"], PASSWORD, "dermatologist", display_name="Dr Two", settings=settings)

    patient = Patient(emails["patient"], PASSWORD, settings)
    sites = ("forearm", "back", "scalp")
    submitted = [patient.submit(lesion_jpeg(seed, (640, 480)), site=site, note=f"spot on my {site}", research=True)
                 for seed, site in zip((3, 4, 5), sites, strict=True)]
    root = admin_reference("/", settings, app_name=f"portal-browser-{tag}")
    wait_until(lambda: len(root.child("queue").get() or {}) == 3, "three diagnosed cases in the queue", timeout=600)
    queue = root.child("queue").get()
    by_score = sorted(queue, key=lambda cid: (-queue[cid]["score"], queue[cid]["createdAt"]))
    assert {s.case_id for s in submitted} == set(by_score)
    top_id = by_score[0]
    top_site = sites[[s.case_id for s in submitted].index(top_id)]
    assert root.child(f"{cases.patient_cases_path(patient.uid)}/{top_id}/cloud/heatmapPath").get(), "top case: no heatmap"

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=LAUNCH_ARGS)
        # A patient is told clearly that the portal is not for them.
        refused = browser.new_page(viewport={"width": 1100, "height": 1000})
        refused.set_default_timeout(120_000)
        open_flet(refused, portal.url)
        sign_in(refused, emails["patient"], "This portal is for dermatologists")
        shot(refused, "patient-refused")
        refused.close()

        page = browser.new_page(viewport={"width": 1100, "height": 1000})
        page.set_default_timeout(120_000)
        open_flet(page, portal.url)

        # The dermatologist's queue: every case, highest score first.
        sign_in(page, emails["derm1"], "3 cases match")
        ys = [page.get_by_text(f"case {cid}", exact=False).bounding_box()["y"] for cid in by_score]
        assert ys == sorted(ys), f"rows not in score order: {list(zip(by_score, ys, strict=True))}"
        shot(page, "queue")

        # Open the top case: it is claimed, the photo shows, the heatmap toggles on.
        page.get_by_text(f"case {top_id}", exact=False).click()
        expect(page.get_by_text("You are reviewing this case", exact=False)).to_be_visible()
        expect(page.get_by_text(f"Body site: {top_site}")).to_be_visible()
        expect(page.get_by_role("img", name="Case photo")).to_be_visible()
        wait_until(lambda: (root.child(cases.claim_path(top_id)).get() or {}).get("uid") == derm1.uid, "the claim")
        shot(page, "case-photo")
        page.get_by_role("switch", name="Heatmap").or_(page.get_by_role("checkbox", name="Heatmap")).first.click()
        expect(page.get_by_role("img", name="Heatmap")).to_be_visible()
        shot(page, "case-heatmap")

        # A second dermatologist, in another browser context, sees the claim live.
        other = browser.new_context(viewport={"width": 1100, "height": 1000}).new_page()
        other.set_default_timeout(120_000)
        open_flet(other, portal.url)
        sign_in(other, emails["derm2"], "3 cases match")
        expect(other.get_by_text(f"being reviewed by {derm1.uid}", exact=False)).to_be_visible()
        shot(other, "second-dermatologist-sees-claim")
        other.get_by_text(f"case {top_id}", exact=False).click()
        expect(other.get_by_text(f"{derm1.uid} is reviewing this case", exact=False)).to_be_visible()
        shot(other, "second-dermatologist-read-only")

        # Bad input first: no diagnosis.
        page.get_by_role("button", name="Save review").click()
        expect(page.get_by_text("Choose a diagnosis before saving", exact=False)).to_be_visible()
        shot(page, "review-no-diagnosis")
        page.get_by_role("radio", name="Melanoma (mel)").click()
        page.get_by_role("radio", name="Urgent").click()
        page.get_by_role("checkbox", name="The image may be used for training").click()
        page.get_by_role("button", name="Save review").click()
        expect(page.get_by_text("Review saved: Melanoma", exact=False)).to_be_visible()
        shot(page, "review-saved")

        # The patient's side (REST as the patient) has the review and the case moved on.
        case = patient.case(top_id)
        assert case["status"] == "reviewed" and case["review"]["label"] == "mel"
        assert case["review"]["urgency"] == "urgent" and case["review"]["trainingUse"] is True
        assert case["review"]["reviewerUid"] == derm1.uid
        assert case["review"]["recommendation"] == cases_template("urgent")  # the urgency's template
        assert root.child(f"{cases.queue_path(top_id)}/status").get() == "reviewed"
        assert len(root.child(cases.review_history_path(top_id)).get() or {}) == 1

        # Chat, both ways.
        type_into(page, "Message to the patient", "Please book an appointment this week.")
        page.get_by_role("button", name="Send message").click()
        wait_until(lambda: any(m.get("senderRole") == "dermatologist" and "this week" in m.get("text", "")
                               for m in (patient.db.get(cases.messages_path(patient.uid, top_id)) or {}).values()),
                   "the dermatologist's message at the patient's side")
        patient.db.push(cases.messages_path(patient.uid, top_id),
                        cases.message_record(patient.uid, "patient", "Thank you, I will call the clinic tomorrow."))
        expect(page.get_by_text("I will call the clinic tomorrow", exact=False)).to_be_visible()
        shot(page, "chat")

        # Back in the queue the reviewed case is gone from the unreviewed list, and the other
        # dermatologist's queue follows live.
        page.get_by_role("button", name="Back to queue").click()
        expect(page.get_by_text("2 cases match", exact=False)).to_be_visible()
        other.get_by_role("button", name="Back to queue").click()
        expect(other.get_by_text("2 cases match", exact=False)).to_be_visible()
        shot(page, "queue-after-review")
        assert root.child(cases.claim_path(top_id)).get() is None  # released on leaving

        page.get_by_role("button", name="Monitoring").click()
        expect(page.get_by_text("Cases reviewed: 1")).to_be_visible()
        shot(page, "monitoring")
        browser.close()


def cases_template(urgency: str) -> str:
    from reviewer_portal.review import DEFAULT_TEMPLATES

    return DEFAULT_TEMPLATES[urgency]
