"""Model updates on the phone (``client.device_models``) against a real localbase: the patient
downloads the published device model with their own rights, every file is checked against the
version record (``dermaloop.registry.verify_files``), a version replaces the one in use only when
complete, the previous one is kept, and offline or with nothing published the phone keeps what it
has. Versions are published with the real registry (admin)."""

from __future__ import annotations

import json
import socket
import uuid
from dataclasses import replace

import pytest

from client.device_models import BUNDLED, DOWNLOADED, DeviceModels
from dermaloop.admin_app import delete_app, get_app
from dermaloop.auth import AuthClient
from dermaloop.database import admin_reference
from dermaloop.http import RetryPolicy
from dermaloop.registry import publish, set_current
from dermaloop.settings import load_settings
from dermaloop.storage import admin_bucket
from tests.registry_support import fake_model_dir
from tests.worker_support import wait_until

FAST = RetryPolicy(attempts=2, base_delay=0.05, max_delay=0.3)
APP_NAME = "test_client_device_models"


@pytest.fixture(scope="module")
def settings(localbase):
    # A namespace of its own: moving /models/device/current here touches no other test.
    yield localbase.settings(database_url="https://client-models-default-rtdb.firebaseio.com")
    delete_app(APP_NAME)


@pytest.fixture(scope="module")
def admin(settings):
    return get_app(settings, name=APP_NAME), admin_bucket(settings)


@pytest.fixture
def clean_pointer(settings, admin):
    admin_reference("models", settings, app_name=APP_NAME).delete()
    yield
    admin_reference("models", settings, app_name=APP_NAME).delete()


@pytest.fixture(scope="module")
def session(settings):
    return AuthClient(settings, retry=FAST).sign_up(f"models-{uuid.uuid4().hex[:8]}@example.com", "patient-pass-1")


@pytest.fixture
def bundled(tmp_path):
    return fake_model_dir(tmp_path / "bundled", "bundled-1")


def published(admin, tmp_path, prefix: str, seed: int = 0, make_current: bool = True) -> tuple[str, object]:
    version = f"{prefix}-{uuid.uuid4().hex[:6]}"
    app, bucket = admin
    result = publish(fake_model_dir(tmp_path / version, version, seed), "device", app=app, bucket=bucket,
                     published_by="test", make_current=make_current)
    return version, result


def folders(models: DeviceModels) -> list[str]:
    return sorted(p.name for p in models.dir.iterdir() if p.is_dir())


def test_with_nothing_published_the_bundled_model_is_used(settings, session, bundled, tmp_path, clean_pointer):
    models = DeviceModels(tmp_path / "app", bundled, session, settings, request_retry=FAST)
    choice = models.update()
    assert (choice.version, choice.path, choice.source) == ("bundled-1", bundled, BUNDLED)
    assert models.current() == choice and folders(models) == []


def test_a_published_version_is_downloaded_verified_and_swapped_in(settings, admin, session, bundled, tmp_path,
                                                                   clean_pointer):
    models = DeviceModels(tmp_path / "app", bundled, session, settings, request_retry=FAST)
    v1, result = published(admin, tmp_path, "dev1", seed=1)
    choice = models.update()
    assert (choice.version, choice.source, choice.path) == (v1, DOWNLOADED, models.dir / v1)
    for f in result.files:
        assert (choice.path / f.path).read_bytes() == (tmp_path / v1 / f.path).read_bytes()
    assert models.failure is None
    inode = choice.path.stat().st_ino
    assert models.update() == choice and choice.path.stat().st_ino == inode  # nothing fetched again

    # a new app object (a restart) knows what it has without the network
    assert DeviceModels(tmp_path / "app", bundled, session, settings).current() == choice

    v2, _ = published(admin, tmp_path, "dev2", seed=2)
    assert models.update().version == v2
    assert folders(models) == sorted([v1, v2])  # the previous one is kept
    v3, _ = published(admin, tmp_path, "dev3", seed=3)
    assert models.update().version == v3
    assert folders(models) == sorted([v2, v3])  # older ones go

    # a rollback moves the pointer back: followed, from the kept copy
    set_current("device", v2, app=admin[0])
    rolled = models.update()
    assert (rolled.version, rolled.path.stat().st_ino) == (v2, (models.dir / v2).stat().st_ino)
    assert folders(models) == sorted([v2, v3])


def test_a_file_changed_after_publication_is_refused_and_the_current_model_stays(settings, admin, session,
                                                                                bundled, tmp_path, clean_pointer):
    models = DeviceModels(tmp_path / "app", bundled, session, settings, request_retry=FAST)
    good, _ = published(admin, tmp_path, "good", seed=4)
    assert models.update().version == good
    bad, _ = published(admin, tmp_path, "bad", seed=5)
    admin[1].blob(f"models/device/{bad}/device/model_int8.tflite").upload_from_string(b"tampered")
    choice = models.update()
    assert choice.version == good and choice.source == DOWNLOADED
    assert models.failure[0] == bad and "sha256" in models.failure[1]
    assert folders(models) == [good]  # no partial or rejected folder left behind
    assert [p.name for p in models.dir.iterdir() if p.name.startswith(".")] == []


def test_a_damaged_local_copy_is_not_used_and_is_fetched_again(settings, admin, session, bundled, tmp_path,
                                                               clean_pointer):
    models = DeviceModels(tmp_path / "app", bundled, session, settings, request_retry=FAST)
    version, _ = published(admin, tmp_path, "dmg", seed=6)
    choice = models.update()
    (choice.path / "labels.json").write_text("{}")
    fresh = DeviceModels(tmp_path / "app", bundled, session, settings, request_retry=FAST)
    assert fresh.current().source == BUNDLED  # the damaged copy is never loaded
    again = fresh.update()
    assert again.version == version and json.loads((again.path / "labels.json").read_text())["name"] == "fake"


def test_the_pointer_naming_the_bundled_version_needs_no_download(settings, admin, session, tmp_path, clean_pointer):
    version, _ = published(admin, tmp_path, "same", seed=7)
    bundled = tmp_path / version  # the app shipped with exactly the published version
    models = DeviceModels(tmp_path / "app", bundled, session, settings, request_retry=FAST)
    assert models.update() == models.current()
    assert (models.current().version, models.current().source) == (version, BUNDLED) and folders(models) == []


def test_offline_the_phone_keeps_what_it_has(settings, admin, session, bundled, tmp_path, clean_pointer):
    app_dir = tmp_path / "app"
    version, _ = published(admin, tmp_path, "off", seed=8)
    assert DeviceModels(app_dir, bundled, session, settings, request_retry=FAST).update().version == version

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    dead = load_settings(environ={}, project_id=settings.project_id).with_local_backend(
        "127.0.0.1", {"database": port, "auth": port, "storage": port})
    offline_session = AuthClient(dead, retry=FAST).restore(session.to_dict())
    offline = DeviceModels(app_dir, bundled, offline_session, dead, request_retry=FAST)
    assert offline.update().version == version and offline.failure is None
    fresh_phone = DeviceModels(tmp_path / "other-app", bundled, offline_session, dead, request_retry=FAST)
    assert fresh_phone.update().source == BUNDLED


def test_following_the_pointer_in_the_background(settings, admin, session, bundled, tmp_path, clean_pointer):
    models = DeviceModels(tmp_path / "app", bundled, session, settings, request_retry=FAST)
    updates = []

    models.start(updates.append)
    try:
        version, _ = published(admin, tmp_path, "bg", seed=9)
        wait_until(lambda: updates and updates[-1].version == version, "the new version to be followed")
        assert updates[-1].source == DOWNLOADED and updates[-1].path == models.dir / version
    finally:
        models.stop()


def test_the_app_answers_with_a_newly_published_device_model(settings, admin, session, tmp_path, clean_pointer):
    """Through the app's own device object: the bundled TFLite model answers first; once a new
    version is published, the next answer names it (downloaded, verified, swapped in the background)."""
    pytest.importorskip("tensorflow")
    from client.device import Device
    from client.photos import prepare
    from tests.worker_support import lesion_jpeg, tiny_device_model_dir

    models = tmp_path / "models"
    tiny_device_model_dir(models / "bundled", version="device-bundled-1")
    device = Device(replace(settings, models_dir=models), tmp_path / "device")
    photo = prepare(lesion_jpeg(1, (640, 480)))
    try:
        device.follow_models(session)
        assert device.answer(photo)["record"]["modelVersion"] == "device-bundled-1"
        app, bucket = admin
        publish(tiny_device_model_dir(tmp_path / "v2", version="device-tiny-2"), "device", app=app, bucket=bucket,
                settings=settings)
        wait_until(lambda: device.answer(photo)["record"]["modelVersion"] == "device-tiny-2",
                   "the published device model to answer")
    finally:
        device.stop()
