"""``dermaloop retrain`` end to end on a real localbase, with a real worker, on synthetic data.

The story: a model trained by ``dermaloop train`` (the 64 px "tiny" test backbone) on a few
images of its own is published and served by a running worker. Patients submit photos through the
rules as the app does, the worker diagnoses them, a dermatologist reviews them through the portal's
own save. One patient deletes their data before any retraining. Then, each as a real
``dermaloop retrain`` process:

1. a candidate trained on shuffled labels is refused by the gates; its decision record is written and
   nothing moves;
2. a dry run decides to promote but writes nothing to the backend;
3. the real run (it takes the dry run's candidate) is killed with SIGKILL right after publishing the
   device version (the pointers have not moved), and again right after promoting the device version;
4. running it again finishes the same run: each version published once, both promoted once, with
   an audit entry naming the decision record, the cases labelled, the erased case in no dataset;
5. the running worker switches to the promoted version without a restart, and a rollback brings
   the previous version back.

Tolerances: the benchmark is 84 synthetic images and the tiny backbone's int8 model agrees with its
float model on few images (its random features do not survive quantisation), so this test compares
the device model's fp32 file (``--device-answer fp32``) and loosens the int8 and calibration bounds,
saying so on the command line. Balanced accuracy and malignant sensitivity keep their default
tolerances: those are what tell the better model from the shuffled one.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from firebase_admin import db

from dermaloop import cases, registry
from dermaloop.admin_app import delete_app, get_app
from dermaloop.cli import main
from dermaloop.settings import PROJECT_ROOT
from dermaloop.storage import admin_bucket
from tests.labels_support import World
from tests.worker_support import WorkerProcess, wait_until
from training.dataset_versions import Manifest, load_manifest
from training.synthetic import generate

pytestmark = pytest.mark.slow

FAST = ["--sweep-s", "0.5", "--heartbeat-s", "0.5", "--backoff-s", "0.2", "--lease-s", "10", "--no-analysis"]
LOOSE = ["--device-answer", "fp32", "--int8-max-drop", "100", "--ece-bound", "1.0", "--calibration-images", "60"]
DEADLINE = 600.0  # only stops a hung test; never a speed check


def renamed(folder: Path, prefix: str) -> Path:
    """A synthetic set whose image and lesion ids start with ``prefix`` (the generator always says
    SYN_), so it shares no id with another synthetic set."""
    with open(folder / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        new = r["image_id"].replace("SYN_", prefix)
        (folder / "images" / f"{r['image_id']}.jpg").rename(folder / "images" / f"{new}.jpg")
        r["image_id"], r["lesion_id"] = new, r["lesion_id"].replace("SYN_", prefix)
    with open(folder / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder


def command(settings, base: Path, out: Path, *extra: str, crash_at: str | None = None) -> tuple[list[str], dict]:
    """``dermaloop retrain`` as a child process against this test's backend (as the worker runs)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FIREBASE_", "STORAGE_EMULATOR", "GOOGLE_APPLICATION", "DERMALOOP_RETRAIN"))}
    env.update(settings.emulator_env())
    env.update({"PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "3", "OMP_NUM_THREADS": "1"})
    if crash_at:
        env["DERMALOOP_RETRAIN_CRASH_AT"] = crash_at
    cmd = [sys.executable, "-m", "dermaloop", "retrain", "--data", str(base), "--out", str(out), "--quiet",
           "--by", "e2e-test", *LOOSE, *extra]
    return cmd, env


def retrain(settings, base: Path, out: Path, *extra: str, crash_at: str | None = None) -> subprocess.CompletedProcess:
    cmd, env = command(settings, base, out, *extra, crash_at=crash_at)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=PROJECT_ROOT)


def ref(app, path: str):
    return db.reference(path, app=app)


def runs(app) -> dict:
    return ref(app, "retrainRuns").get() or {}


def submit_diagnosed(world: World, photo: bytes, uid: str | None = None) -> tuple[str, str]:
    uid = world.patient(uid)
    case_id = world.submit(uid, photo)
    wait_until(lambda: (world.case(uid, case_id) or {}).get("status") == "diagnosed", f"case {case_id} diagnosed",
               timeout=DEADLINE)
    return uid, case_id


@pytest.fixture(scope="module")
def scene(localbase, tmp_path_factory):
    root = tmp_path_factory.mktemp("retrain-e2e")
    settings = localbase.settings(database_url="https://retrain-e2e-default-rtdb.firebaseio.com",
                                  data_dir=root / "var")
    name = f"retrain-e2e-{uuid.uuid4().hex[:6]}"
    app = get_app(settings, name=name)
    world = World(settings, app, admin_bucket(settings))
    base = generate(root / "base", per_class=60, photos_per_lesion=2, seed=1)
    own = renamed(generate(root / "own", per_class=4, photos_per_lesion=1, seed=3), "OWN_")
    new = renamed(generate(root / "new", per_class=6, photos_per_lesion=1, seed=7), "NEW_")
    # The serving model: trained on a few images of its own (so it never saw the benchmark), weak.
    assert main(["train", "--data", str(own), "--out", str(root / "m0"), "--device-backbone", "tiny",
                 "--cloud-backbone", "tiny", "--cloud-ensemble", "--views", "orig,flip",
                 "--cache-dir", str(root / "cache"), "--quiet"]) == 0
    for kind in ("device", "cloud"):
        registry.publish(root / "m0", kind, app=app, bucket=world.bucket, make_current=True)
    worker = WorkerProcess(settings, None, "w-retrain", FAST,
                           env_extra={"DERMALOOP_MODELS_DIR": str(root / "worker-models")}).start()
    world.dermatologist("ann")
    labelled = []
    with open(new / "metadata.csv", newline="") as f:
        new_rows = list(csv.DictReader(f))
    for i, row in enumerate(new_rows):  # fixed patient ids: the held-out share is drawn from them
        uid, case_id = submit_diagnosed(world, (new / "images" / f"{row['image_id']}.jpg").read_bytes(),
                                        f"p-e2e-{i:03d}")
        world.review("ann", uid, case_id, row["dx"])
        labelled.append((uid, case_id))
    # A patient whose reviewed case would be a label deletes their data first.
    gone_uid, gone_case = submit_diagnosed(world, (own / "images" / "OWN_0000000.jpg").read_bytes())
    world.review("ann", gone_uid, gone_case, "mel")
    ref(app, cases.erasure_path(gone_uid)).set(cases.erasure_request())
    wait_until(lambda: (ref(app, cases.erasure_path(gone_uid)).get() or {}).get("state") == "done",
               "the erasure to be done", timeout=DEADLINE)
    first = {k: registry.current_version(k, app=app) for k in ("device", "cloud")}
    yield {"root": root, "settings": settings, "app": app, "world": world, "base": base, "worker": worker,
           "labelled": labelled, "gone": gone_case, "first": first, "new": new}
    worker.kill9()
    delete_app(name)


def test_the_retraining_loop_end_to_end(scene):
    app, settings, base, world, worker = scene["app"], scene["settings"], scene["base"], scene["world"], scene["worker"]
    out, first = scene["root"] / "retrain", scene["first"]
    m0 = first["cloud"]
    assert first["device"] == m0

    # 1. Shuffled labels: refused, recorded, nothing moves, no case labelled.
    done = retrain(settings, base, out, "--shuffle-labels")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "REFUSED" in done.stdout and "FAIL cloud.balanced_accuracy" in done.stdout
    (refused_id, refused), = runs(app).items()
    assert refused["status"] == "refused" and refused["decision"]["promote"] is False
    assert refused["by"] == "e2e-test" and refused["inputs"]["recipeOptions"]["shuffle_labels"] is True
    assert refused["inputs"]["current"] == {"device": m0, "cloud": m0}
    gate = {g["gate"]: g for g in refused["gates"]}
    assert gate["cloud.balanced_accuracy"]["passed"] is False
    assert gate["cloud.balanced_accuracy"]["numbers"]["ci_low"] < -0.02
    assert {k: registry.current_version(k, app=app) for k in ("device", "cloud")} == first
    uid, case_id = scene["labelled"][0]
    assert world.case(uid, case_id)["status"] == "reviewed"
    dataset = refused["inputs"]["datasetVersion"]
    manifest = load_manifest(dataset, app=app, bucket=world.bucket)
    taken = {i.case_id for i in manifest.case_images()}
    assert taken == {c for _, c in scene["labelled"]} and scene["gone"] not in taken  # erased: never taken

    # 2. A dry run: it would promote, and writes nothing to the backend.
    done = retrain(settings, base, out, "--dry-run")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "would promote (dry run)" in done.stdout
    assert set(runs(app)) == {refused_id}
    assert {k: registry.current_version(k, app=app) for k in ("device", "cloud")} == first
    dry_dirs = [p for p in (out / "runs").iterdir() if (p / "decision.json").is_file() and p.name != refused_id]
    dry = json.loads(dry_dirs[0].joinpath("decision.json").read_text())
    assert dry["dryRun"] is True and dry["decision"]["promote"] is True
    bench = dry["metrics"]["benchmark"]["cloud"]
    assert bench["candidate"]["balanced_accuracy"] > bench["current"]["balanced_accuracy"]  # better, not just as good

    # 3. The real run, killed right after publishing the device version (it takes the dry run's candidate).
    done = retrain(settings, base, out, crash_at="publish.device")
    assert done.returncode == -9, done.stdout + done.stderr
    version = dry["candidate"]["version"]
    assert registry.version_record("device", version, app=app) is not None
    assert registry.version_record("cloud", version, app=app) is None
    assert {k: registry.current_version(k, app=app) for k in ("device", "cloud")} == first
    passed = {k: v for k, v in runs(app).items() if k != refused_id}
    (run_id, record), = passed.items()
    assert record["status"] == "passed" and record["decision"]["promote"] is True

    # ... and again, right after moving the device pointer: the two pointers disagree for a moment.
    done = retrain(settings, base, out, crash_at="promote.device")
    assert done.returncode == -9, done.stdout + done.stderr
    assert f"resuming run {run_id}" in done.stdout
    assert registry.current_version("device", app=app) == version and registry.current_version("cloud", app=app) == m0
    assert runs(app)[run_id]["status"] == "published"

    # 4. Again: the same run resumes (its inputs changed: the device pointer moved) and finishes as
    # decided; one version per kind, each promoted once.
    done = retrain(settings, base, out)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resuming run {run_id}" in done.stdout and f"promoted {version}" in done.stdout
    record = runs(app)[run_id]
    assert record["status"] == "done" and record["promoted"]["version"] == version
    assert record["labelled"]["labelled"] == len(scene["labelled"])
    for kind in ("device", "cloud"):
        assert registry.current_version(kind, app=app) == version
        assert set(ref(app, f"models/{kind}/versions").get()) == {m0, version}
        promotions = [e for e in registry.history(kind, app=app) if e["action"] == "promote"]
        assert len(promotions) == 1 and promotions[0]["decision"] == run_id and promotions[0]["previous"] == m0
    assert world.case(uid, case_id)["status"] == "labelled"
    assert world.case(uid, case_id)["training"]["datasetVersion"] == record["inputs"]["datasetVersion"]
    card = json.loads(world.bucket.blob(f"models/cloud/{version}/card.json").download_as_bytes())
    assert card["data"]["dataset_version"] == record["inputs"]["datasetVersion"]
    assert card["cloud"]["training"]["from_version"] == m0

    # 5. The running worker switches to the promoted version, and back after a rollback.
    photo = (scene["new"] / "images" / "NEW_0000001.jpg").read_bytes()
    wait_until(lambda: any('"event": "model swapped"' in line and version in line for line in worker.lines),
               "the worker to load the promoted version", timeout=DEADLINE)
    uid2, case2 = submit_diagnosed(world, photo)
    assert world.case(uid2, case2)["cloud"]["modelVersion"] == version
    assert registry.rollback("cloud", by="e2e-test", reason="rollback check", app=app) == m0
    assert registry.current_version("cloud", app=app) == m0
    wait_until(lambda: sum('"event": "model swapped"' in line for line in worker.lines) >= 2,
               "the worker to go back", timeout=DEADLINE)
    uid3, case3 = submit_diagnosed(world, photo)
    assert world.case(uid3, case3)["cloud"]["modelVersion"] == m0
    assert registry.history("cloud", app=app)[-1]["action"] == "rollback"


def test_no_new_labels_and_a_second_concurrent_run_are_clear_errors(scene, tmp_path):
    """Asking for more new labels than there are, an unknown parent dataset, a missing base dataset
    and a second run on a folder another run holds: each refused with a plain message, before
    anything is built or written."""
    from training.decisions import run_lock

    settings, base = scene["settings"], scene["base"]
    before = runs(scene["app"])
    with run_lock(tmp_path / "busy"):
        done = retrain(settings, base, tmp_path / "busy")
    assert done.returncode == 2 and "another dermaloop retrain is running" in done.stderr
    done = retrain(settings, base, tmp_path / "out", "--min-new-labels", "1000")
    assert done.returncode == 2 and "fewer than the 1000 asked for" in done.stderr
    done = retrain(settings, base, tmp_path / "out", "--parent-dataset", "ds-000000000000")
    assert done.returncode == 2 and "unknown dataset version ds-000000000000" in done.stderr
    done = retrain(settings, tmp_path / "nowhere", tmp_path / "out")
    assert done.returncode == 2 and "does not exist" in done.stderr
    assert runs(scene["app"]) == before


def test_watch_starts_a_run_once_enough_new_labels_arrived(scene, tmp_path):
    """``--watch 3``: three more reviewed cases arrive and a run starts by itself, recorded as the
    watch's; the watch keeps going after it (stopped here by the test)."""
    app, settings, world = scene["app"], scene["settings"], scene["world"]
    before = set(runs(app))
    cmd, env = command(settings, scene["base"], scene["root"] / "retrain", "--watch", "3", "--poll-seconds", "1")
    watcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               cwd=PROJECT_ROOT)
    try:
        more = renamed(generate(tmp_path / "more", per_class=1, photos_per_lesion=1, seed=11), "MORE_")
        with open(more / "metadata.csv", newline="") as f:
            for row in list(csv.DictReader(f))[:3]:
                uid, case_id = submit_diagnosed(world, (more / "images" / f"{row['image_id']}.jpg").read_bytes())
                world.review("ann", uid, case_id, row["dx"])
        new_run = wait_until(lambda: next((r for k, r in runs(app).items() if k not in before
                                           and r.get("status") in ("refused", "done")), None),
                             "the watch to finish a run", timeout=DEADLINE)
        assert new_run["by"] == "watch" and new_run["inputs"]["newLabels"] >= 3
        assert watcher.poll() is None  # still watching
    finally:
        watcher.kill()
        output = watcher.communicate()[0]
    assert "watching for 3 new usable labels" in output and "new usable labels; starting a run" in output, output


def test_any_dermaloop_train_recipe_on_request(scene, tmp_path):
    """``--recipe train``: a full `dermaloop train` run with the given options on the dataset
    version's train and calib images (never the benchmark), judged by the same gates (a dry run
    here: nothing is written to the backend); options that are not `dermaloop train`'s are refused."""
    settings, base, app = scene["settings"], scene["base"], scene["app"]
    before = runs(app)
    out = tmp_path / "out"
    recipe = "--device-backbone tiny --cloud-backbone tiny --views orig,flip"
    done = retrain(settings, base, out, "--dry-run", "--min-new-labels", "0", "--recipe", "train",
                   "--train-args", recipe)
    assert done.returncode in (0, 1), done.stdout + done.stderr
    assert "recipe train" in done.stdout and "[6/7] decision" in done.stdout
    (run,) = (out / "runs").iterdir()
    decision = json.loads((run / "decision.json").read_text())
    assert decision["dryRun"] is True and decision["inputs"]["recipe"] == "train"
    assert decision["inputs"]["recipeOptions"]["train_args"] == recipe.split()
    card = json.loads((run / "candidate" / "card.json").read_text())
    assert card["options"]["recipe"] == "train" and card["device"]["backbone"] == "tiny"
    assert card["version"] == decision["candidate"]["version"]
    manifest = Manifest.from_bytes((run / "manifest.json").read_bytes())  # a dry run publishes no dataset
    assert manifest.version == decision["inputs"]["datasetVersion"]
    benchmark = {i.image_id for i in manifest.images if i.split == "benchmark"}
    seen = {x for part in json.loads((run / "trained" / "split.json").read_text()).values() for x in part}
    assert benchmark and seen and not benchmark & seen  # the pipeline never saw a benchmark image
    assert runs(app) == before  # a dry run writes no record

    for bad, why in (("--epochs many", "not options of dermaloop train"),
                     ("--data elsewhere", "must not contain --data or --out")):
        done = retrain(settings, base, tmp_path / "bad", "--dry-run", "--min-new-labels", "0", "--recipe", "train",
                       "--train-args", bad)
        assert done.returncode == 2 and why in done.stderr, done.stdout + done.stderr
