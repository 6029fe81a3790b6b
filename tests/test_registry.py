"""The model registry (``dermaloop.registry``) on a real localbase with the real firebase-admin and
google-cloud-storage clients: publishing (files, hashes, version record, pointer; immutable
versions), and following the pointer (newest pointer wins a load race; partial or corrupted
downloads are never used; a Storage object changed after publication is refused). The follower's
loader here just reads card.json, so no Keras is needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from firebase_admin import db

from dermaloop.registry import (
    Follower,
    IntegrityError,
    PublishConflict,
    RegistryError,
    fetch,
    publish,
    set_current,
    version_record,
)
from dermaloop.settings import PROJECT_ROOT
from tests.registry_support import fake_model_dir, sha256_hex, unique_version
from tests.worker_support import wait_until

DEVICE_FILES = {"card.json", "labels.json", "split.json", "device/model_int8.tflite", "device/model_fp32.tflite",
                "device/model.keras",
                "reports/device/report.md", "reports/device_fp32/report.md"}


pytestmark = pytest.mark.usefixtures("clean_registry")


def card_loader(path: Path) -> dict:
    return json.loads((path / "card.json").read_text())


def first_loaded(cache: Path, app, bucket) -> str:
    """The version a new device follower on ``cache`` loads first (the card it read says which)."""
    follower = Follower("device", cache, card_loader, app=app, bucket=bucket).start()
    try:
        wait_until(lambda: follower.current() is not None, "the version to load")
        return follower.current().model["version"]
    finally:
        follower.stop()


def _leftovers(cache: Path, version: str) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.name.startswith(f".{version}") and not p.name.endswith(".lock"))


def test_publish_uploads_files_with_hashes_then_record_then_pointer(app, bucket, tmp_path):
    v1, v2 = unique_version("dev1"), unique_version("dev2")
    d1 = fake_model_dir(tmp_path / v1, v1)
    result = publish(d1, "device", app=app, bucket=bucket, published_by="test")
    assert result.created and result.current and result.version == v1
    assert {f.path for f in result.files} == DEVICE_FILES  # no cloud model, no hidden files

    blobs = {b.name: b for b in bucket.list_blobs(prefix=f"models/device/{v1}/")}
    assert set(blobs) == {f"models/device/{v1}/{rel}" for rel in DEVICE_FILES}
    record = db.reference(f"models/device/versions/{v1}", app=app).get()
    assert record["storagePath"] == f"models/device/{v1}"
    assert isinstance(record["createdAt"], int) and record["publishedBy"] == "test"
    assert "parent" not in record  # nothing was current before
    for entry in record["files"]:
        data = (d1 / entry["path"]).read_bytes()
        blob = blobs[f"models/device/{v1}/{entry['path']}"]
        assert entry["sha256"] == sha256_hex(data) == sha256_hex(blob.download_as_bytes()) == blob.metadata["sha256"]
        assert entry["bytes"] == len(data)
    card = json.loads((d1 / "card.json").read_text())
    assert record["card"]["version"] == v1 and record["card"]["device"] == card["device"]
    assert record["card"]["options"] == {"weights": {"ok": 2}}
    assert {"files", "file_bytes", "history", "options/weights/file.name"} <= set(record["cardTrimmed"])
    assert record["metrics"] == card["device"]["metrics"]
    assert db.reference("models/device/current", app=app).get() == v1

    d2 = fake_model_dir(tmp_path / v2, v2, seed=1)
    publish(d2, "device", app=app, bucket=bucket)
    assert version_record("device", v2, app=app)["parent"] == v1
    assert db.reference("models/device/current", app=app).get() == v2


def test_publish_a_localiser_directory(app, bucket, tmp_path):
    version = unique_version("loc")
    folder = tmp_path / "localiser" / version  # training.localiser_train.ensure_localiser's layout
    folder.mkdir(parents=True)
    data = os.urandom(400)
    (folder / "analysis_fp32.tflite").write_bytes(data)
    card = {"kind": "localiser", "version": version, "file": "analysis_fp32.tflite", "sha256": sha256_hex(data),
            "bytes": len(data), "localiser_metrics": {"ap50": 0.95}, "not_skin_metrics": None}
    (folder / "card.json").write_text(json.dumps(card))
    result = publish(folder, "localiser", app=app, bucket=bucket)  # the version comes from the card
    assert result.version == version and {f.path for f in result.files} == {"card.json", "analysis_fp32.tflite"}
    record = version_record("localiser", version, app=app)
    assert record["metrics"] == {"localiser_metrics": {"ap50": 0.95}}
    assert db.reference("models/localiser/current", app=app).get() == version


def test_published_versions_are_immutable(app, bucket, tmp_path):
    version = unique_version("imm")
    first = fake_model_dir(tmp_path / "a", version, seed=1)
    publish(first, "device", app=app, bucket=bucket, make_current=False)
    name = f"models/device/{version}/device/model_int8.tflite"
    generation = bucket.get_blob(name).generation

    other = fake_model_dir(tmp_path / "b", version, seed=2)  # same name, other bytes
    with pytest.raises(PublishConflict, match="already published with other files"):
        publish(other, "device", app=app, bucket=bucket)
    blob = bucket.get_blob(name)
    assert blob.generation == generation  # nothing was uploaded over the published files
    assert blob.download_as_bytes() == (first / "device/model_int8.tflite").read_bytes()
    assert db.reference("models/device/current", app=app).get() is None

    again = publish(first, "device", app=app, bucket=bucket)  # identical: nothing to upload
    assert not again.created and again.current
    assert bucket.get_blob(name).generation == generation
    assert db.reference("models/device/current", app=app).get() == version


def test_publish_never_overwrites_objects_an_unfinished_publish_left(app, bucket, tmp_path):
    version = unique_version("left")
    folder = fake_model_dir(tmp_path / version, version)
    name = f"models/device/{version}/device/model_int8.tflite"
    bucket.blob(name).upload_from_string(b"other bytes, no record")  # a crashed publish of other content
    with pytest.raises(PublishConflict, match="already exists in Storage with other content"):
        publish(folder, "device", app=app, bucket=bucket)
    assert bucket.get_blob(name).download_as_bytes() == b"other bytes, no record"
    assert version_record("device", version, app=app) is None

    bucket.blob(name).delete()
    blob = bucket.blob(name)  # an interrupted publish of this same content: resumed
    blob.metadata = {"sha256": sha256_hex((folder / "device/model_int8.tflite").read_bytes())}
    blob.upload_from_filename(str(folder / "device/model_int8.tflite"))
    assert publish(folder, "device", app=app, bucket=bucket).created
    assert version_record("device", version, app=app) is not None


def test_publish_refuses_bad_names_and_inconsistent_directories(app, bucket, tmp_path):
    version = unique_version("bad")
    folder = fake_model_dir(tmp_path / version, version)
    for name in ("../etc", "a/b", "", "x" * 101, "v 1", "..", "v1$"):
        with pytest.raises(RegistryError, match="refusing model version name"):
            publish(folder, "device", name, app=app, bucket=bucket)
    with pytest.raises(RegistryError, match="says version"):
        publish(folder, "device", "another-name", app=app, bucket=bucket)
    with pytest.raises(RegistryError, match="model kind"):
        publish(folder, "phone", app=app, bucket=bucket)
    (folder / "device/model_int8.tflite").write_bytes(b"changed after training")
    with pytest.raises(RegistryError, match="does not match the sha256 in its card.json"):
        publish(folder, "device", app=app, bucket=bucket)
    device_only = tmp_path / "device-only"
    fake_model_dir(device_only, unique_version("donly"))
    for rel in ("cloud/model.keras", "reports/cloud/report.md"):
        (device_only / rel).unlink()
    with pytest.raises(RegistryError, match="not a cloud model directory"):
        publish(device_only, "cloud", app=app, bucket=bucket)
    with pytest.raises(RegistryError, match="publish it first"):
        set_current("device", unique_version("never"), app=app)
    assert db.reference("models", app=app).get() is None  # nothing half-written


def test_newest_pointer_wins_when_an_older_load_finishes_last(app, bucket, tmp_path):
    v1, v2, v3 = (unique_version(f"race{i}") for i in (1, 2, 3))
    for i, version in enumerate((v1, v2, v3)):
        publish(fake_model_dir(tmp_path / version, version, seed=i), "device", app=app, bucket=bucket,
                make_current=version == v1)
    entered_v2, release_v2 = threading.Event(), threading.Event()

    def slow_loader(path: Path) -> dict:
        card = card_loader(path)
        if card["version"] == v2:  # v2's load is slow: it is still running when the pointer names v3
            entered_v2.set()
            release_v2.wait()
        return card

    swaps: list[str] = []
    follower = Follower("device", tmp_path / "cache", slow_loader, lambda loaded: swaps.append(loaded.version),
                        app=app, bucket=bucket).start()
    try:
        wait_until(lambda: (follower.current() or None) and follower.current().version == v1, "v1 serving")
        set_current("device", v2, app=app)
        wait_until(entered_v2.is_set, "v2's load to start")
        set_current("device", v3, app=app)
        wait_until(lambda: follower.pointer == v3, "the follower to see v3")
        release_v2.set()  # v2's load finishes now, after the pointer moved on
        wait_until(lambda: follower.current().version == v3, "v3 serving")
        assert swaps == [v1, v3]  # v2 was never swapped in
        assert follower.current().model["version"] == v3
        assert follower.pointer == v3 and follower.failure is None
    finally:
        release_v2.set()
        follower.stop()


def test_a_leftover_partial_download_is_discarded_not_reused(app, bucket, tmp_path):
    version = unique_version("part")
    source = fake_model_dir(tmp_path / version, version)
    publish(source, "device", app=app, bucket=bucket)
    cache = tmp_path / "cache"
    # What crashed downloads leave: the previous registry's folder and this one's temporary folder,
    # with a truncated model file and a card naming another version.
    for name in (f".{version}.partial", f".{version}~deadbeef.partial"):
        (cache / name / "device").mkdir(parents=True)
        (cache / name / "device/model_int8.tflite").write_bytes(b"trunc")
        (cache / name / "card.json").write_text(json.dumps({"version": "stale"}))
    assert first_loaded(cache, app, bucket) == version
    target = cache / version
    assert _leftovers(cache, version) == []
    for rel in DEVICE_FILES:
        assert (target / rel).read_bytes() == (source / rel).read_bytes()


def test_a_corrupted_cached_version_is_downloaded_again(app, bucket, tmp_path):
    version = unique_version("cache")
    source = fake_model_dir(tmp_path / version, version)
    publish(source, "device", app=app, bucket=bucket)
    cache = tmp_path / "cache"
    target = fetch("device", version, cache, app=app, bucket=bucket)
    assert target == cache / version
    with open(target / "device/model_int8.tflite", "ab") as f:
        f.write(b"bit rot")
    (target / "device/extra.bin").write_bytes(b"not published")
    assert fetch("device", version, cache, app=app, bucket=bucket) == target
    assert (target / "device/model_int8.tflite").read_bytes() == (source / "device/model_int8.tflite").read_bytes()
    assert not (target / "device/extra.bin").exists()

    (target / "card.json").write_text(json.dumps({"version": "tampered"}))  # the follower re-verifies too
    assert first_loaded(cache, app, bucket) == version
    assert _leftovers(cache, version) == []


def test_a_storage_object_changed_after_publication_is_refused(app, bucket, tmp_path):
    v1, v2 = unique_version("good"), unique_version("tamper")
    publish(fake_model_dir(tmp_path / v1, v1), "device", app=app, bucket=bucket)
    publish(fake_model_dir(tmp_path / v2, v2, seed=1), "device", app=app, bucket=bucket, make_current=False)
    bucket.blob(f"models/device/{v2}/device/model_int8.tflite").upload_from_string(b"swapped behind our back")
    cache = tmp_path / "cache"
    follower = Follower("device", cache, card_loader, app=app, bucket=bucket).start()
    try:
        wait_until(lambda: (follower.current() or None) and follower.current().version == v1, "v1 serving")
        set_current("device", v2, app=app)
        wait_until(lambda: follower.failure is not None, "the refusal")
        version, error = follower.failure
        assert version == v2 and "does not match the published sha256" in error
        assert follower.current().version == v1  # the old version keeps serving
        assert follower.pointer == v2
    finally:
        follower.stop()
    assert not (cache / v2).exists() and _leftovers(cache, v2) == []
    with pytest.raises(IntegrityError):
        fetch("device", v2, cache, app=app, bucket=bucket)
    assert not (cache / v2).exists() and _leftovers(cache, v2) == []


def _modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT_ROOT, check=True)
    return set(out.stdout.split())


def test_the_registry_is_a_light_shared_library():
    """The apps and retraining import it: no worker, training, localbase or TensorFlow comes along,
    nor the admin SDKs (the phone app ships without them; the admin handles are made on first use);
    and the worker's registry no longer imports the worker (the old import cycle)."""
    loaded = _modules_after("import dermaloop.registry")
    assert not {m for m in loaded if m.split(".")[0] in {"cloud_worker", "training", "localbase", "keras",
                                                          "tensorflow", "firebase_admin", "google"}}
    assert "cloud_worker.worker" not in _modules_after("import cloud_worker.registry")
