"""Settings follow Firebase's own variables, so only those change between localbase and production."""

from __future__ import annotations

import json

import pytest

from dermaloop.settings import emulator_ports, load_settings


def test_defaults_derive_firebase_names_from_project():
    s = load_settings(environ={})
    assert s.project_id == "demo-dermaloop"
    assert s.database_url == "https://demo-dermaloop-default-rtdb.firebaseio.com"
    assert s.database_namespace == "demo-dermaloop-default-rtdb"
    assert s.storage_bucket == "demo-dermaloop.appspot.com"
    assert not s.uses_emulators


def test_firebase_emulator_variables_switch_backends():
    env = {
        "GOOGLE_CLOUD_PROJECT": "demo-x",
        "FIREBASE_DATABASE_EMULATOR_HOST": "127.0.0.1:9000",
        "FIREBASE_AUTH_EMULATOR_HOST": "127.0.0.1:9099",
        "STORAGE_EMULATOR_HOST": "127.0.0.1:9199",  # scheme added: google-cloud-storage needs it
    }
    s = load_settings(environ=env)
    assert s.uses_emulators
    assert s.storage_emulator_host == "http://127.0.0.1:9199"
    assert s.emulator_env()["FIREBASE_DATABASE_EMULATOR_HOST"] == "127.0.0.1:9000"
    assert s.emulator_env()["GOOGLE_CLOUD_PROJECT"] == "demo-x"


def test_database_host_with_scheme_is_refused_as_firebase_admin_would():
    with pytest.raises(ValueError, match="without a scheme"):
        load_settings(environ={"FIREBASE_DATABASE_EMULATOR_HOST": "http://127.0.0.1:9000"})


def test_toml_file_then_environment_then_overrides(tmp_path):
    config = tmp_path / "dermaloop.toml"
    config.write_text('project_id = "demo-file"\nportal_port = 9100\n')
    env = {"DERMALOOP_CONFIG": str(config)}
    assert load_settings(environ=env).project_id == "demo-file"
    assert load_settings(environ=env).portal_port == 9100
    assert load_settings(environ={**env, "GOOGLE_CLOUD_PROJECT": "demo-env"}).project_id == "demo-env"
    assert load_settings(environ=env, project_id="demo-arg").project_id == "demo-arg"


def test_unknown_toml_keys_are_reported(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('projekt_id = "typo"\n')
    with pytest.raises(ValueError, match="projekt_id"):
        load_settings(environ={"DERMALOOP_CONFIG": str(config)})


def test_missing_named_config_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_settings(environ={"DERMALOOP_CONFIG": str(tmp_path / "absent.toml")})


def test_emulator_ports_come_from_firebase_json(tmp_path):
    f = tmp_path / "firebase.json"
    f.write_text(json.dumps({"emulators": {"database": {"port": 9500}}}))
    assert emulator_ports(f) == {"database": 9500, "storage": 9199, "auth": 9099}
    assert emulator_ports() == {"database": 9000, "storage": 9199, "auth": 9099}
