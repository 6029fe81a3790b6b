"""The cloud worker end to end on a real localbase, through the real ``dermaloop worker`` command:
uploaded photos become cloud results exactly once, across several workers and a ``kill -9``; poison
uploads fail with reasons while good jobs go on; SIGTERM hands work back; published models swap in."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import signal
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from firebase_admin import db
from PIL import Image

from dermaloop.cases import FAILURE_REASONS
from dermaloop.database import new_push_id
from dermaloop.registry import publish
from dermaloop.taxonomy import load_taxonomy
from tests.worker_support import (
    WorkerProcess,
    lesion_jpeg,
    png_header_only,
    seed_case,
    tiny_model_dir,
    wait_until,
)

FAST = ["--sweep-s", "0.5", "--heartbeat-s", "0.5", "--backoff-s", "0.2", "--lease-s", "3", "--no-analysis"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("model") / "tiny-1")


@pytest.fixture(scope="module")
def main_worker(localbase, model_dir):
    """One worker that serves the whole module (starting a TensorFlow process is the slow part)."""
    w = WorkerProcess(localbase.settings(), model_dir, "w-main", [*FAST, "--max-attempts", "2"]).start()
    yield w
    w.kill9()


@contextlib.contextmanager
def paused(worker: WorkerProcess):
    """SIGSTOP the worker (it cannot claim anything) and let it go on afterwards."""
    worker.proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        worker.proc.send_signal(signal.SIGCONT)


@pytest.fixture
def workers(localbase, model_dir):
    started: list[WorkerProcess] = []

    def start(worker_id: str, *extra: str, model=model_dir, env: dict[str, str] | None = None,
              wait: bool = True, checks: bool = False) -> WorkerProcess:
        flags = [f for f in FAST if not (checks and f == "--no-analysis")]
        w = WorkerProcess(localbase.settings(), model, worker_id, [*flags, *extra], env or {}).launch()
        started.append(w)
        return w.wait_ready() if wait else w

    yield start
    for w in started:
        w.kill9()


def _case(app, uid: str, case_id: str) -> dict:
    return db.reference(f"cases/{uid}/{case_id}", app=app).get() or {}


def _settled(app, uid: str, case_ids: list[str]):
    cases = db.reference(f"cases/{uid}", app=app).get() or {}
    statuses = [cases.get(c, {}).get("status") for c in case_ids]
    return cases if all(s in ("diagnosed", "failed") for s in statuses) else None


def test_an_uploaded_photo_becomes_a_cloud_result(app, bucket, main_worker):
    uid, case_id = "patient-e2e", new_push_id()
    device = {"modelVersion": "device-x", "top": [{"label": "nv", "name": "Mole", "p": 0.9}], "risk": "low", "at": 1}
    seed_case(app, bucket, uid, case_id, lesion_jpeg(1), device=device)
    wait_until(lambda: _case(app, uid, case_id).get("status") == "diagnosed", "the case to be diagnosed")

    case = _case(app, uid, case_id)
    cloud = case["cloud"]
    taxonomy = load_taxonomy("ham10000")
    assert cloud["modelVersion"] == "tiny-1"
    assert set(cloud["probs"]) == set(taxonomy.ids)
    assert sum(cloud["probs"].values()) == pytest.approx(1.0, abs=1e-4)
    top = cloud["top"]
    assert len(top) == 3 and [t["p"] for t in top] == sorted((t["p"] for t in top), reverse=True)
    assert top[0]["p"] == max(cloud["probs"].values())
    assert all(t["name"] == next(c.name for c in taxonomy.classes if c.id == t["label"]) for t in top)
    assert cloud["malignantP"] == pytest.approx(sum(cloud["probs"][i] for i in taxonomy.malignant_ids), abs=1e-4)
    assert cloud["risk"] in ("low", "moderate", "high")
    assert {"download", "decode", "infer", "total"} <= set(cloud["timingsMs"])
    assert cloud["heatmapPath"] == f"cases/{uid}/{case_id}/heatmap.png"
    heatmap = Image.open(io.BytesIO(bucket.blob(cloud["heatmapPath"]).download_as_bytes()))
    assert heatmap.format == "PNG" and heatmap.size == (320, 240)  # over the whole photo
    job = db.reference(f"jobs/{case_id}", app=app).get()
    assert job["state"] == "done" and job["attempts"] == 1 and "lease" not in job
    entry = db.reference(f"queue/{case_id}", app=app).get()
    assert entry["uid"] == uid and entry["status"] == "diagnosed" and entry["risk"] == cloud["risk"]
    assert isinstance(entry["score"], float)
    beat = wait_until(lambda: (db.reference("workers/w-main", app=app).get() or {}).get("done"), "a heartbeat")
    assert beat >= 1
    wait_until(lambda: main_worker.diagnosed().count(case_id) == 1, "the worker's log line")


def test_three_workers_process_fifty_jobs_exactly_once(app, bucket, workers, main_worker):
    uid = "patient-many"
    case_ids = [new_push_id() for _ in range(50)]
    extra = [workers(f"w-many-{i}", "--workers", "8", "--batch-size", "8", wait=False) for i in range(2)]
    for w in extra:
        w.wait_ready()
    pool = [main_worker, *extra]
    for i, case_id in enumerate(case_ids):
        seed_case(app, bucket, uid, case_id, lesion_jpeg(100 + i % 10))
    cases = wait_until(lambda: _settled(app, uid, case_ids), "all 50 cases to settle")

    assert all(cases[c]["status"] == "diagnosed" for c in case_ids)
    assert all(w.terminate() == 0 for w in extra)
    wait_until(lambda: len({c for w in pool for c in w.diagnosed()} & set(case_ids)) == 50, "every log line")
    by_worker = [Counter(c for c in w.diagnosed() if c in case_ids) for w in pool]
    total = sum(by_worker, Counter())
    assert set(total) == set(case_ids) and max(total.values()) == 1  # each case written by one worker, once
    jobs = db.reference("jobs", app=app).get()
    assert all(jobs[c]["attempts"] == 1 and jobs[c]["state"] == "done" for c in case_ids)
    assert sum(1 for counts in by_worker if counts) >= 2  # the work really was shared


def test_concurrent_jobs_with_image_checks_succeed_first_time(app, bucket, workers, main_worker,
                                                             analysis_models_dir):
    """The image checks run in the download threads: many jobs at once must not share one TFLite
    interpreter (it raised, and every such job went to ``retry later`` as an internal error)."""
    uid = "patient-checked"
    case_ids = [new_push_id() for _ in range(16)]
    with paused(main_worker):  # only the checking worker takes these
        w = workers("w-checks", "--workers", "8", "--batch-size", "8",
                    env={"DERMALOOP_MODELS_DIR": str(analysis_models_dir)}, checks=True)
        w.proc.send_signal(signal.SIGSTOP)  # queue them all first, so they really run concurrently
        for i, case_id in enumerate(case_ids):
            seed_case(app, bucket, uid, case_id, lesion_jpeg(200 + i, (480, 360)))
        w.proc.send_signal(signal.SIGCONT)
        cases = wait_until(lambda: _settled(app, uid, case_ids), "all 16 checked cases to settle")
    assert any("analysis model" in line for line in w.lines if "worker ready" in line)
    assert all(cases[c]["status"] == "diagnosed" for c in case_ids), [cases[c].get("failure") for c in case_ids]
    assert all(cases[c]["cloud"]["lesion"] is not None for c in case_ids)  # checked, not skipped
    jobs = db.reference("jobs", app=app).get()
    assert [jobs[c]["attempts"] for c in case_ids] == [1] * 16
    assert not [line for line in w.lines if "retry later" in line]


def test_kill_9_mid_job_the_case_still_completes_once(app, bucket, workers, main_worker):
    uid, case_id = "patient-crash", new_push_id()
    doomed = workers("w-doomed", "--lease-s", "2", env={"DERMALOOP_WORKER_FAULT_HOLD_S": "600"})
    with paused(main_worker):  # so that the doomed worker is the one that claims the job
        seed_case(app, bucket, uid, case_id, lesion_jpeg(7))
        wait_until(lambda: (db.reference(f"jobs/{case_id}/lease/worker", app=app).get() == "w-doomed"),
                   "the doomed worker to claim the job")
        wait_until(lambda: _case(app, uid, case_id).get("status") == "processing", "the doomed worker to start")
        doomed.kill9()
    # The lease expires; the surviving worker's sweep takes the job over.
    wait_until(lambda: _case(app, uid, case_id).get("status") == "diagnosed", "the survivor to finish the case")
    job = db.reference(f"jobs/{case_id}", app=app).get()
    assert job["state"] == "done" and job["attempts"] == 2
    wait_until(lambda: main_worker.diagnosed().count(case_id) == 1, "the survivor's log line")
    assert case_id not in doomed.diagnosed()


def test_poison_uploads_fail_with_reasons_while_good_jobs_go_on(app, bucket, main_worker):
    uid = "patient-poison"
    good = lesion_jpeg(3)
    poison = {
        "zero bytes": (b"", None, "not_an_image"),
        "text file": (b"this is not a photo\n" * 20, None, "not_an_image"),
        "truncated jpeg": (good[: len(good) // 2], None, "corrupt_image"),
        "20000x20000 png header": (png_header_only(20000, 20000), None, "image_too_large"),
        "wrong hash": (good, hashlib.sha256(b"another photo").hexdigest(), "hash_mismatch"),
    }
    ids = {}
    for name, (data, digest, _) in poison.items():
        ids[name] = new_push_id()
        seed_case(app, bucket, uid, ids[name], data, sha256=digest)
    ids["missing object"] = new_push_id()
    seed_case(app, bucket, uid, ids["missing object"], good, upload=False)
    good_ids = []
    for i in range(6):
        good_ids.append(new_push_id())
        seed_case(app, bucket, uid, good_ids[-1], lesion_jpeg(200 + i))
    cases = wait_until(lambda: _settled(app, uid, [*ids.values(), *good_ids]), "every case to settle")

    expected = {name: reason for name, (_, _, reason) in poison.items()} | {"missing object": "missing_upload"}
    for name, reason in expected.items():
        case = cases[ids[name]]
        assert case["status"] == "failed", name
        assert case["failure"]["reason"] == reason, (name, case["failure"])
        assert reason in FAILURE_REASONS and case["failure"]["detail"]
        assert "cloud" not in case
    assert cases[ids["wrong hash"]]["failure"]["attempts"] == 2  # transient: retried once, then failed
    assert cases[ids["missing object"]]["failure"]["attempts"] == 2
    assert cases[ids["text file"]]["failure"]["attempts"] == 1  # permanent: no pointless retries
    assert all(cases[c]["status"] == "diagnosed" for c in good_ids)
    queue = db.reference("queue", app=app).get() or {}
    for name in expected:  # "a dermatologist can still look at your photo": the failed case is queued for one
        assert queue[ids[name]]["status"] == "failed" and queue[ids[name]].get("risk") is None, name
    assert main_worker.proc.poll() is None  # still serving


def test_sigterm_hands_in_flight_jobs_back(app, bucket, workers, main_worker):
    uid, case_id = "patient-term", new_push_id()
    worker = workers("w-term", "--grace-s", "0.5", env={"DERMALOOP_WORKER_FAULT_HOLD_S": "600"})
    with paused(main_worker):
        seed_case(app, bucket, uid, case_id, lesion_jpeg(9))
        wait_until(lambda: _case(app, uid, case_id).get("status") == "processing", "the claim")
        assert worker.terminate() == 0
        job = db.reference(f"jobs/{case_id}", app=app).get()
        assert job["state"] == "queued" and "lease" not in job and job["attempts"] == 0
        assert _case(app, uid, case_id)["status"] == "queued"
    assert any('"event": "lease released"' in line for line in worker.lines)
    assert (db.reference("workers/w-term", app=app).get() or {}).get("state") == "stopped"
    # The handed-back job is picked up normally.
    wait_until(lambda: _case(app, uid, case_id).get("status") == "diagnosed", "another worker to finish it")
    wait_until(lambda: main_worker.diagnosed().count(case_id) == 1, "the other worker's log line")


def test_worker_follows_the_published_model(app, bucket, localbase, tmp_path, main_worker):
    uid = "patient-swap"
    models_dir = tmp_path / "models"
    tiny_model_dir(models_dir / "local-1", version="local-1", seed=1)
    v2 = tiny_model_dir(tmp_path / "v2", version="cloud-v2", seed=2)
    worker = WorkerProcess(localbase.settings(), None, "w-swap", [*FAST], {"DERMALOOP_MODELS_DIR": str(models_dir)})
    try:
        main_worker.proc.send_signal(signal.SIGSTOP)  # this test's worker must be the one that answers
        worker.start()
        ready = json.loads(next(line for line in worker.lines if "worker ready" in line))
        assert ready["following"] is True and ready["model"] == "local-1"
        first = new_push_id()
        seed_case(app, bucket, uid, first, lesion_jpeg(11))
        wait_until(lambda: _case(app, uid, first).get("status") == "diagnosed", "a result from the local model")
        assert _case(app, uid, first)["cloud"]["modelVersion"] == "local-1"

        publish(v2, "cloud", app=app, bucket=bucket)  # files, version record, then the pointer
        wait_until(lambda: any('"event": "model swapped"' in line for line in worker.lines), "the model swap")
        second = new_push_id()
        seed_case(app, bucket, uid, second, lesion_jpeg(12))
        wait_until(lambda: _case(app, uid, second).get("status") == "diagnosed", "a result from the new model")
        assert _case(app, uid, second)["cloud"]["modelVersion"] == "cloud-v2"
        assert (models_dir / "cache" / "cloud" / "cloud-v2" / "card.json").is_file()
    finally:
        main_worker.proc.send_signal(signal.SIGCONT)
        worker.kill9()
        db.reference("models/cloud", app=app).delete()


def test_probabilities_are_finite(model_dir):
    """The tiny model really is a model: different images, different but valid probabilities."""
    from cloud_worker.model import load_model
    from cloud_worker.pipeline import NoAnalysis, infer, prepare

    model = load_model(model_dir)
    items = [prepare(lesion_jpeg(s), NoAnalysis()) for s in (1, 2)]
    results = infer(model, items)
    assert all(np.isclose(r.probs.sum(), 1.0) for r in results)
    assert not np.allclose(results[0].probs, results[1].probs)


def test_without_any_model_the_worker_starts_and_waits(localbase, tmp_path):
    """``dermaloop run`` on a fresh machine: the worker comes up, says it waits, leaves jobs queued."""
    worker = WorkerProcess(localbase.settings(), None, "w-nomodel", [], {"DERMALOOP_MODELS_DIR": str(tmp_path)})
    try:
        worker.start()
        assert any("waiting for a model" in line for line in worker.lines)
        assert worker.terminate() == 0
    finally:
        worker.kill9()


def test_a_broken_model_directory_is_a_clear_error(localbase, tmp_path):
    (tmp_path / "card.json").write_text("{not json")
    worker = WorkerProcess(localbase.settings(), tmp_path, "w-broken", [])
    with pytest.raises(RuntimeError, match="cannot load the model"):
        worker.start()


def _real_model_dir():
    """The newest trained model directory (``dermaloop train`` / the run command), if this machine has one."""
    import os

    from dermaloop.model_dir import newest_model_dir
    from dermaloop.settings import PROJECT_ROOT

    for root in (os.environ.get("DERMALOOP_MODELS_DIR"), PROJECT_ROOT / "var" / "models"):
        if root:
            found = newest_model_dir(Path(root))
            if found is not None:
                return found
    return None


def test_real_cloud_model_end_to_end_through_the_patient_path(localbase, app, bucket, main_worker, ham10000):
    """The production path: a patient account, Storage /v0 upload and rules-checked case + job,
    the trained cloud model with the image checks, Grad-CAM heatmap in Storage."""
    model_dir = _real_model_dir()
    if model_dir is None:
        pytest.skip("no trained model directory on this machine (run `dermaloop train` or `dermaloop run`)")
    from dermaloop.auth import create_user
    from dermaloop.submit_cli import Patient

    settings = localbase.settings()
    email = f"real-{uuid.uuid4().hex[:6]}@dermaloop.test"
    create_user(email, "real-pass-1", "patient", settings=settings)
    patient = Patient(email, "real-pass-1", settings)
    photo = sorted((ham10000 / "images").glob("*.jpg"))[0].read_bytes()
    worker = WorkerProcess(settings, model_dir, "w-real", ["--sweep-s", "0.5"])
    try:
        main_worker.proc.send_signal(signal.SIGSTOP)  # the real model must answer this one
        worker.start()
        sent = patient.submit(photo, "ham.jpg")
        results = {}
        assert patient.wait([sent.case_id], lambda cid, case: results.update({cid: case}), timeout=300) == set()
    finally:
        main_worker.proc.send_signal(signal.SIGCONT)
        worker.terminate()
    case = results[sent.case_id]
    assert case["status"] == "diagnosed", case.get("failure")
    cloud = case["cloud"]
    card = json.loads((model_dir / "card.json").read_text())
    assert cloud["modelVersion"] == card["version"]
    assert cloud["quality"] is not None and "ok" in cloud["quality"]  # the checks really ran
    if cloud.get("top"):
        assert len(cloud["top"]) == 3 and cloud["risk"] in ("low", "moderate", "high")
        assert sum(cloud["probs"].values()) == pytest.approx(1.0, abs=1e-3)
        assert cloud["heatmapPath"] == f"cases/{patient.uid}/{sent.case_id}/heatmap.png"
        heatmap = bucket.blob(cloud["heatmapPath"]).download_as_bytes()
        assert heatmap[:8] == b"\x89PNG\r\n\x1a\n"
    else:  # declined by the checks: then it must say why
        assert cloud["message"]


def test_status_command_shows_each_workers_metrics(localbase, app, main_worker):
    import os
    import subprocess
    import sys

    from dermaloop.settings import PROJECT_ROOT

    wait_until(lambda: (db.reference("workers/w-main", app=app).get() or {}).get("done"), "a heartbeat with work done")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FIREBASE_", "STORAGE_EMULATOR", "GOOGLE_APPLICATION"))}
    env.update(localbase.settings().emulator_env())
    done = subprocess.run([sys.executable, "-m", "dermaloop", "worker", "--status"], capture_output=True, text=True,
                          env=env, cwd=PROJECT_ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)["w-main"]
    assert status["state"] == "running" and status["modelVersion"] == "tiny-1"
    assert status["done"] >= 1 and "queueDepth" in status and "latencyMs" in status
    assert set(status["latencyMs"]) == {"p50", "p95", "n"}
    assert status["secondsSinceHeartbeat"] >= 0


def _nan_model_dir(path: Path) -> Path:
    """A real Keras model that returns NaN for near-white photos (a model error on one input) and
    uniform probabilities otherwise, in the model-directory layout."""
    import keras

    from dermaloop.risk import RiskPolicy
    from dermaloop.taxonomy import TAXONOMY_DIR

    (path / "cloud").mkdir(parents=True, exist_ok=True)
    taxonomy = load_taxonomy("ham10000")
    n = len(taxonomy)
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
    gate = keras.layers.Dense(1, activation="relu", name="gate")(x)  # > 0 only for near-white photos
    huge = keras.layers.Dense(n, name="huge")(gate)
    overflow = keras.layers.Dense(n, name="overflow")(huge)  # 1e30 * 1e30 = inf -> softmax NaN
    model = keras.Model(inputs, keras.layers.Softmax()(overflow))
    model.get_layer("gate").set_weights([np.full((3, 1), 1 / 3, np.float32), np.array([-0.95], np.float32)])
    model.get_layer("huge").set_weights([np.full((1, n), 1e30, np.float32), np.zeros(n, np.float32)])
    model.get_layer("overflow").set_weights([np.eye(n, dtype=np.float32) * 1e30, np.zeros(n, np.float32)])
    model.save(path / "cloud" / "model.keras")
    (path / "labels.json").write_text((TAXONOMY_DIR / "ham10000.json").read_text())
    policy = RiskPolicy(1.0, tuple(taxonomy.malignant_mask), 0.3, 0.5)
    (path / "card.json").write_text(json.dumps({"version": "nan-1", "cloud": {"preprocess": {"size": 16},
                                                "risk": policy.to_dict(), "tta": []}}))
    return path


def test_a_model_error_on_one_photo_fails_that_case_only(app, bucket, localbase, tmp_path, main_worker):
    uid = "patient-model-error"
    white = io.BytesIO()
    Image.new("RGB", (64, 64), (255, 255, 255)).save(white, format="JPEG")
    bad, good = new_push_id(), [new_push_id() for _ in range(3)]
    worker = WorkerProcess(localbase.settings(), _nan_model_dir(tmp_path / "nan"), "w-nan",
                           [*FAST, "--max-attempts", "2", "--batch-wait-ms", "300"])
    try:
        main_worker.proc.send_signal(signal.SIGSTOP)
        worker.start()
        seed_case(app, bucket, uid, bad, white.getvalue())
        for i, case_id in enumerate(good):
            seed_case(app, bucket, uid, case_id, lesion_jpeg(300 + i))
        cases = wait_until(lambda: _settled(app, uid, [bad, *good]), "every case to settle")
    finally:
        main_worker.proc.send_signal(signal.SIGCONT)
        worker.kill9()
    assert cases[bad]["status"] == "failed"
    assert cases[bad]["failure"]["reason"] == "model_error" and cases[bad]["failure"]["attempts"] == 2
    assert "non-finite" in cases[bad]["failure"]["detail"]
    assert all(cases[c]["status"] == "diagnosed" and cases[c]["cloud"]["modelVersion"] == "nan-1" for c in good)


def test_jobs_are_not_missed_across_a_backend_restart(app, bucket, localbase, main_worker):
    """The worker's stream drops when the backend restarts; the reconnect and the sweep still find
    jobs created meanwhile and afterwards."""
    uid = "patient-restart"
    localbase.stop()
    localbase.start()  # same data directory and ports
    first, second = new_push_id(), new_push_id()
    seed_case(app, bucket, uid, first, lesion_jpeg(21))
    wait_until(lambda: _case(app, uid, first).get("status") == "diagnosed", "a job created after the restart")
    seed_case(app, bucket, uid, second, lesion_jpeg(22))
    wait_until(lambda: _case(app, uid, second).get("status") == "diagnosed", "the next job")
    assert main_worker.proc.poll() is None
