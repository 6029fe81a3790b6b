"""The reviewer portal end to end in headless Chromium, against a real localbase and a real worker.

A patient submits three photos (``dermaloop.submit_cli.Patient``), the worker diagnoses them, and
they appear in the portal's queue in score order. A patient account is refused; a dermatologist
signs in, opens the top case (claiming it), looks at the heatmap and saves a review, which the
patient reads over REST; a message goes each way; a second dermatologist in another browser context
sees the claim live (by name) and cannot save. The first dermatologist's recommendation template is
kept in the database; the photo zooms. An admin gets the read-only portal; a case its patient erases
while it is open says so; a revoked account's session ends. Screenshots of each step:
var/test-screens/reviewer-portal/."""

from __future__ import annotations

import re
import uuid

import pytest

from dermaloop import cases
from dermaloop.auth import create_user, revoke
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


def row(page, case_id: str):
    """The queue row of a case, by its details line ("... · case {id}"): not the row's tooltip,
    which Flutter announces as "Open case {id}" while the mouse rests on it."""
    return page.get_by_text(re.compile(rf"· case {re.escape(case_id)}"))


def row_top(page, case_id: str) -> float:
    """Where a queue row is on the screen. A live redraw (the worker writing while the queue shows)
    replaces the rows, and a row looked up at that moment has no box yet: look again."""
    for _ in range(480):
        box = row(page, case_id).bounding_box()
        if box is not None:
            return box["y"]
        page.wait_for_timeout(250)
    raise AssertionError(f"the queue row of case {case_id} never showed")


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

    # As long as every other wait here: on 2 busy cores a redraw (the monitoring plots, the first
    # matplotlib import) can take longer than Playwright's 5 s default.
    expect.set_options(timeout=120_000)
    settings, portal = system
    shots = Shots(shots_folder("reviewer-portal"))

    def shot(page, name: str) -> None:
        # For the picture only: the semantics tree (what the expectations read) can run ahead of the
        # painted frame on 2 busy cores, and a screenshot taken at once may show the screen before.
        page.wait_for_timeout(1000)
        shots(page, name)
    tag = uuid.uuid4().hex[:6]
    emails = {role: f"{role}-{tag}@dermaloop.test" for role in ("patient", "derm1", "derm2", "lead")}
    create_user(emails["patient"], PASSWORD, "patient", settings=settings)
    derm1 = create_user(emails["derm1"], PASSWORD, "dermatologist", display_name="Dr One", settings=settings)[0]
    derm2 = create_user(emails["derm2"], PASSWORD, "dermatologist", display_name="Dr Two", settings=settings)[0]
    create_user(emails["lead"], PASSWORD, "admin", display_name="Clinical Lead", settings=settings)

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
        ys = [row_top(page, cid) for cid in by_score]
        assert ys == sorted(ys), f"rows not in score order: {list(zip(by_score, ys, strict=True))}"
        shot(page, "queue")

        # Their own urgent template, kept in the database (later sessions start from it).
        stored = root.child(cases.reviewer_templates_path(derm1.uid, "urgent"))
        for _ in range(3):  # as in sign_in: the click can reach the app before the typed text did
            page.get_by_role("button", name="Recommendation templates").click()
            type_into(page, "Template: urgent", URGENT_TEMPLATE)
            shot(page, "templates")
            page.get_by_role("button", name="Save templates").click()
            expect(page.get_by_text("Templates saved", exact=False).first).to_be_visible()
            if stored.get() == URGENT_TEMPLATE:
                break
        assert stored.get() == URGENT_TEMPLATE

        # Open the top case: it is claimed, the photo shows, the heatmap toggles on.
        row(page, top_id).click()
        expect(page.get_by_text("You are reviewing this case", exact=False)).to_be_visible()
        expect(page.get_by_text(f"Body site: {top_site}")).to_be_visible()
        expect(page.get_by_role("img", name="Case photo")).to_be_visible()
        wait_until(lambda: (root.child(cases.claim_path(top_id)).get() or {}).get("uid") == derm1.uid, "the claim")
        page.wait_for_timeout(500)  # for the screenshot only: the browser decodes and paints the photo
        shot(page, "case-photo")
        page.get_by_role("switch", name="Heatmap").or_(page.get_by_role("checkbox", name="Heatmap")).first.click()
        expect(page.get_by_role("img", name="Heatmap")).to_be_visible()
        page.wait_for_timeout(500)  # for the screenshot only
        shot(page, "case-heatmap")
        page.get_by_role("button", name="Zoom in").click()
        page.get_by_role("button", name="Zoom in").click()
        expect(page.get_by_role("img", name="Heatmap (zoomable)")).to_be_visible()
        page.wait_for_timeout(500)  # for the screenshot only: the zoom is drawn, not in the semantics tree
        shot(page, "case-heatmap-zoomed")
        page.get_by_role("button", name="Reset zoom").click()

        # A second dermatologist, in another browser context, sees the claim live.
        other = browser.new_context(viewport={"width": 1100, "height": 1000}).new_page()
        other.set_default_timeout(120_000)
        open_flet(other, portal.url)
        sign_in(other, emails["derm2"], "3 cases match")
        expect(other.get_by_text("being reviewed by Dr One", exact=False)).to_be_visible()  # a name, not a uid
        shot(other, "second-dermatologist-sees-claim")
        row(other, top_id).click()
        expect(other.get_by_text("Dr One is reviewing this case", exact=False)).to_be_visible()
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
        expect(page.get_by_text("you saved Melanoma, urgent", exact=False)).to_be_visible()  # the history
        shot(page, "review-saved")

        # The patient's side (REST as the patient) has the review and the case moved on.
        case = patient.case(top_id)
        assert case["status"] == "reviewed" and case["review"]["label"] == "mel"
        assert case["review"]["urgency"] == "urgent" and case["review"]["trainingUse"] is True
        assert case["review"]["reviewerUid"] == derm1.uid
        assert case["review"]["recommendation"] == URGENT_TEMPLATE  # the urgency's template, their own
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

        # An admin (clinical lead) gets the portal read-only: the queue, the case, who reviews it,
        # and no claim, form or chat input.
        page.get_by_role("button", name="Back to queue").click()
        page.get_by_role("button", name="Sign out").click()
        expect(page.get_by_text("Signed out.")).to_be_visible()
        second = by_score[1]
        row(other, second).click()
        expect(other.get_by_text("You are reviewing this case", exact=False)).to_be_visible()
        sign_in(page, emails["lead"], "2 cases match")
        expect(page.get_by_text("Read-only: you are signed in as admin", exact=False)).to_be_visible()
        expect(page.get_by_text("being reviewed by Dr Two", exact=False)).to_be_visible()
        assert page.get_by_role("button", name="Recommendation templates").count() == 0
        shot(page, "admin-queue")
        row(page, second).click()
        expect(page.get_by_text("Dr Two is reviewing this case.", exact=False)).to_be_visible()
        expect(page.get_by_text("Not reviewed yet.")).to_be_visible()
        expect(page.get_by_role("img", name="Case photo")).to_be_visible()
        assert page.get_by_role("button", name="Save review").count() == 0
        assert page.get_by_role("button", name="Send message").count() == 0
        assert (root.child(cases.claim_path(second)).get() or {}).get("uid") == derm2.uid  # the admin took nothing
        shot(page, "admin-case-read-only")

        # The patient erases their data while the second dermatologist has a case open.
        patient.db.set(cases.erasure_path(patient.uid), cases.erasure_request())
        expect(other.get_by_text("This case was deleted by its patient", exact=False).first).to_be_visible()
        expect(page.get_by_text("This case was deleted by its patient", exact=False).first).to_be_visible()
        shot(other, "case-deleted-while-open")

        # An account signed out everywhere (revoked) loses its portal session at once.
        revoke(derm2.uid, settings=settings)
        expect(other.get_by_text("Your session ended", exact=False)).to_be_visible()
        expect(other.get_by_role("button", name="Sign in")).to_be_visible()
        shot(other, "session-revoked")
        browser.close()


URGENT_TEMPLATE = "Please see a dermatologist this week: call the skin clinic today."
