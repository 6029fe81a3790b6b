"""The phone build's entry (``client.phone``): where a built app finds its backend settings, its
bundled models and its local store, and that the app's code loads nothing a phone cannot carry.
(The phone build itself needs an Android SDK or Xcode: see docs/PHONE_BUILD.md.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from client.phone import phone_settings
from dermaloop.settings import PROJECT_ROOT


def test_a_built_app_reads_its_assets_and_keeps_its_store_in_the_app_data_directory(tmp_path):
    assets = tmp_path / "assets"
    assets.mkdir()
    (assets / "dermaloop.toml").write_text('project_id = "derm-prod"\napi_key = "web-key"\n'
                                           'database_url = "https://derm-prod-default-rtdb.firebaseio.com"\n')
    data = tmp_path / "app-data"
    settings, store_dir = phone_settings({"FLET_ASSETS_DIR": str(assets), "FLET_APP_STORAGE_DATA": str(data)})
    assert settings.project_id == "derm-prod" and settings.api_key == "web-key"
    assert settings.database_url == "https://derm-prod-default-rtdb.firebaseio.com"
    assert settings.database_emulator_host is None  # production Firebase: no emulator on a phone
    assert settings.models_dir == assets / "models" and store_dir == data / "client"

    # a variable set for the app wins over the bundled file, as everywhere else
    settings, _ = phone_settings({"FLET_ASSETS_DIR": str(assets), "FLET_APP_STORAGE_DATA": str(data),
                                  "GOOGLE_CLOUD_PROJECT": "derm-staging"})
    assert settings.project_id == "derm-staging"


def test_outside_a_built_app_it_says_to_use_the_client_command():
    with pytest.raises(RuntimeError, match="dermaloop client"):
        phone_settings({})


def test_the_app_loads_no_tensorflow_keras_or_admin_sdk():
    """What a phone build must not need: the app and the on-device path, imported in a fresh process."""
    code = ("import json, sys\n"
            "import client.phone, client.app, client.sync, client.remember, client.erasure, client.device_models\n"
            "from dermaloop.analysis import on_device\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n")
    found = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)
    loaded = set(json.loads(found.stdout.strip().splitlines()[-1]))
    assert {"client", "flet", "numpy", "PIL"} <= loaded
    heavy = {"tensorflow", "keras", "firebase_admin", "google", "sklearn", "skimage", "matplotlib", "scipy",
             "pillow_heif"}  # pillow_heif: only when a HEIC is picked, and only where it is installed
    assert not loaded & heavy, loaded & heavy
