"""``dermaloop submit``: a patient created with ``dermaloop users add`` submits photos under the
security rules, and ``--wait`` prints the cloud result the worker writes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid

import pytest
from firebase_admin import db

from dermaloop.admin_app import get_app
from dermaloop.database import PermissionDenied
from dermaloop.settings import PROJECT_ROOT
from dermaloop.storage import admin_bucket
from dermaloop.submit_cli import Patient, SubmitError, describe_image
from tests.worker_support import WorkerProcess, lesion_jpeg, tiny_model_dir, wait_until

PASSWORD = "patient-pass-1"


def _env(settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FIREBASE_", "STORAGE_EMULATOR", "GOOGLE_APPLICATION"))}
    env.update(settings.emulator_env())
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _dermaloop(settings, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dermaloop", *args], capture_output=True, text=True,
                          env=_env(settings), cwd=PROJECT_ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def settings(localbase):
    return localbase.settings()


@pytest.fixture(scope="module")
def app(settings):
    return get_app(settings, name=f"submit-{uuid.uuid4().hex[:6]}")


@pytest.fixture(scope="module")
def patient_email(settings):
    email = f"submit-{uuid.uuid4().hex[:6]}@dermaloop.test"
    done = _dermaloop(settings, "users", "add", "--email", email, "--password", PASSWORD, "--role", "patient")
    assert done.returncode == 0, done.stderr
    return email


def test_submit_writes_the_case_and_job_as_the_patient(settings, app, patient_email):
    patient = Patient(patient_email, PASSWORD, settings)
    photo = lesion_jpeg(5)
    sent = patient.submit(photo, "mole.jpg", site="left forearm", research=True)

    case = db.reference(f"cases/{patient.uid}/{sent.case_id}", app=app).get()
    assert case["status"] == "queued" and case["patientUid"] == patient.uid and case["caseId"] == sent.case_id
    assert case["image"] == {"path": f"cases/{patient.uid}/{sent.case_id}/image.jpg", "sha256": hashlib.sha256(photo).hexdigest(),
                             "contentType": "image/jpeg", "bytes": len(photo), "width": 320, "height": 240}
    assert case["consent"]["research"] is True and case["note"] == {"site": "left forearm"}
    assert isinstance(case["createdAt"], int)
    job = db.reference(f"jobs/{sent.case_id}", app=app).get()
    assert job == {"uid": patient.uid, "caseId": sent.case_id, "createdAt": case["createdAt"]}
    stored = admin_bucket(settings).blob(case["image"]["path"]).download_as_bytes()
    assert stored == photo


def test_the_rules_stop_a_patient_writing_someone_elses_case(settings, patient_email):
    patient = Patient(patient_email, PASSWORD, settings)
    with pytest.raises(PermissionDenied):
        patient.db.update("/", {"jobs/forged": {"uid": "someone-else", "caseId": "forged", "createdAt": {".sv": "timestamp"}}})


def test_unreadable_photos_are_refused_before_upload(settings, patient_email, tmp_path):
    with pytest.raises(SubmitError, match="not a usable photo"):
        describe_image(b"%PDF-1.4 not a photo")
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    done = _dermaloop(settings, "submit", str(bad), "--email", patient_email, "--password", PASSWORD)
    assert done.returncode == 2 and "not a usable photo" in done.stderr


def test_wrong_password_is_a_clear_error(settings, patient_email, tmp_path):
    photo = tmp_path / "a.jpg"
    photo.write_bytes(lesion_jpeg(1))
    done = _dermaloop(settings, "submit", str(photo), "--email", patient_email, "--password", "wrong-password")
    assert done.returncode == 2 and "sign-in failed" in done.stderr


def test_submit_wait_prints_each_cloud_result(settings, app, patient_email, tmp_path):
    model = tiny_model_dir(tmp_path / "model")
    worker = WorkerProcess(settings, model, "w-submit", ["--sweep-s", "0.5", "--no-analysis"]).start()
    try:
        photos = []
        for i in range(3):
            photos.append(tmp_path / f"photo{i}.jpg")
            photos[-1].write_bytes(lesion_jpeg(40 + i))
        done = _dermaloop(settings, "submit", *map(str, photos), "--email", patient_email, "--password", PASSWORD,
                          "--wait", "--json", "--timeout", "240")
        assert done.returncode == 0, done.stdout + done.stderr
        lines = [json.loads(line) for line in done.stdout.splitlines()]
        queued = [r for r in lines if r["status"] == "queued"]
        results = [r for r in lines if r["status"] == "diagnosed"]
        assert [r["image"] for r in queued] == [str(p) for p in photos]
        assert sorted(r["caseId"] for r in results) == sorted(r["caseId"] for r in queued)
        for r in results:
            assert r["modelVersion"] == "tiny-1" and len(r["top"]) == 3 and r["risk"] in ("low", "moderate", "high")
            assert r["latencyS"] >= 0
        uid = Patient(patient_email, PASSWORD, settings).uid
        cases = wait_until(lambda: db.reference(f"cases/{uid}", app=app).get(), "the cases")
        assert all(cases[r["caseId"]]["cloud"]["top"] == r["top"] for r in results)
    finally:
        worker.terminate()
