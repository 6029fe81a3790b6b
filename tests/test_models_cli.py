"""Pointer moves with an audit trail (``registry.promote`` / ``rollback`` / ``history``) and the
maintainers' ``dermaloop models`` command, run for real in a subprocess against localbase."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dermaloop import registry
from dermaloop.settings import PROJECT_ROOT
from tests.registry_support import fake_model_dir, unique_version

pytestmark = pytest.mark.usefixtures("clean_registry")


def run_cli(localbase, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FIREBASE_", "STORAGE_EMULATOR", "GOOGLE_"))}
    env.update(localbase.settings().emulator_env())
    return subprocess.run([sys.executable, "-m", "dermaloop", "models", *args], capture_output=True, text=True,
                          env=env, cwd=PROJECT_ROOT)


def _dir(tmp_path: Path, version: str, seed: int = 0) -> Path:
    return fake_model_dir(tmp_path / version, version, seed)


def test_promote_and_rollback_move_the_pointer_and_leave_an_audit_trail(app, bucket, tmp_path):
    v1, v2 = unique_version("v1"), unique_version("v2")
    registry.publish(_dir(tmp_path, v1), "cloud", app=app, bucket=bucket, published_by="ci@test")
    registry.publish(_dir(tmp_path, v2, 1), "cloud", make_current=False, app=app, bucket=bucket)
    assert registry.current_version("cloud", app=app) == v1

    previous = registry.promote("cloud", v2, by="alice@test", reason="better on benchmark", decision="run-1", app=app)
    assert previous == v1 and registry.current_version("cloud", app=app) == v2

    back = registry.rollback("cloud", by="bob@test", reason="complaints", app=app)
    assert back == v1 and registry.current_version("cloud", app=app) == v1

    trail = registry.history("cloud", app=app)
    assert [(e["action"], e.get("previous"), e["version"], e["by"]) for e in trail] == [
        ("publish", None, v1, "ci@test"),
        ("promote", v1, v2, "alice@test"),
        ("rollback", v2, v1, "bob@test"),
    ]
    assert trail[1]["reason"] == "better on benchmark" and trail[1]["decision"] == "run-1"
    assert all(isinstance(e["at"], int) for e in trail)


def test_unknown_versions_and_empty_rollbacks_are_refused_and_nothing_moves(app, bucket, tmp_path):
    with pytest.raises(registry.RegistryError, match="nothing to roll back"):
        registry.rollback("device", app=app)
    v1 = unique_version("only")
    registry.publish(_dir(tmp_path, v1), "device", app=app, bucket=bucket)
    with pytest.raises(registry.RegistryError, match="does not exist"):
        registry.promote("device", "never-published", app=app)
    with pytest.raises(registry.RegistryError, match="no earlier version"):
        registry.rollback("device", app=app)
    with pytest.raises(registry.RegistryError, match="does not exist"):
        registry.rollback("device", to="never-published", app=app)
    with pytest.raises(registry.RegistryError, match="refusing model version name"):
        registry.promote("device", "../../etc", app=app)
    assert registry.current_version("device", app=app) == v1
    assert [e["action"] for e in registry.history("device", app=app)] == ["publish"]


def test_rollback_follows_the_trail_across_several_promotions(app, bucket, tmp_path):
    versions = [unique_version(f"r{i}") for i in range(3)]
    for i, v in enumerate(versions):
        registry.publish(_dir(tmp_path, v, i), "device", make_current=False, app=app, bucket=bucket)
    for v in versions:
        registry.promote("device", v, reason="next", app=app)
    assert registry.rollback("device", reason="r2 bad", app=app) == versions[1]
    assert registry.rollback("device", reason="r1 bad too", app=app) == versions[0]
    assert registry.rollback("device", to=versions[2], reason="it was fine after all", app=app) == versions[2]


def test_the_models_command(localbase, app, tmp_path):
    v1, v2 = unique_version("cli1"), unique_version("cli2")
    first = run_cli(localbase, "publish", str(_dir(tmp_path, v1)), "--reason", "first release")
    assert first.returncode == 0, first.stderr
    assert f"cloud {v1}: uploaded" in first.stdout and f"device: current (none) -> {v1}" in first.stdout
    second = run_cli(localbase, "publish", str(_dir(tmp_path, v2, 1)), "--no-promote")
    assert second.returncode == 0, second.stderr
    assert registry.current_version("cloud", app=app) == v1

    listing = run_cli(localbase, "list", "--kind", "cloud", "--json")
    rows = [json.loads(line) for line in listing.stdout.splitlines()]
    assert {(r["version"], r["current"]) for r in rows} == {(v1, True), (v2, False)}
    assert all(r["metrics"]["balanced_accuracy"] == 0.7 for r in rows)

    promoted = run_cli(localbase, "promote", "cloud", v2, "--reason", "benchmark +2 points")
    assert promoted.returncode == 0 and f"{v1} -> {v2}" in promoted.stdout
    shown = json.loads(run_cli(localbase, "show", "cloud").stdout)
    assert shown["version"] == v2 and shown["current"] is True and shown["parent"] == v1

    rolled = run_cli(localbase, "rollback", "cloud", "--reason", "regression reported")
    assert rolled.returncode == 0 and f"rolled back {v2} -> {v1}" in rolled.stdout
    hist = run_cli(localbase, "history", "cloud")
    assert hist.stdout.count("\n") == 3 and "reason: regression reported" in hist.stdout

    unknown = run_cli(localbase, "promote", "cloud", "nope", "--reason", "x")
    assert unknown.returncode == 1 and "does not exist" in unknown.stderr and "Traceback" not in unknown.stderr
    missing = run_cli(localbase, "publish", str(tmp_path / "absent"))
    assert missing.returncode == 1 and "not a directory" in missing.stderr
    no_reason = run_cli(localbase, "promote", "cloud", v2)
    assert no_reason.returncode == 2 and "--reason" in no_reason.stderr
    assert registry.current_version("cloud", app=app) == v1


def test_the_models_command_says_when_the_backend_is_down(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FIREBASE_", "STORAGE_EMULATOR", "GOOGLE_"))}
    env.update({"FIREBASE_DATABASE_EMULATOR_HOST": "127.0.0.1:9", "FIREBASE_AUTH_EMULATOR_HOST": "127.0.0.1:9",
                "STORAGE_EMULATOR_HOST": "http://127.0.0.1:9", "DERMALOOP_DATA_DIR": str(tmp_path)})
    done = subprocess.run([sys.executable, "-m", "dermaloop", "models", "list"], capture_output=True, text=True,
                          env=env, cwd=PROJECT_ROOT)
    assert done.returncode == 2 and "cannot reach" in done.stderr and "Traceback" not in done.stderr
