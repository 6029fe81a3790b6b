"""What ``dermaloop run`` serves on a fresh machine and how it enters the registry: the shipped
release model before any synthetic starter, and version one published only where nothing is."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from dermaloop import registry
from dermaloop.first_publish import publish_served_models
from tests.registry_support import fake_model_dir
from training import prepare, starter


def _release(tmp_path: Path, version: str) -> Path:
    release = tmp_path / "repo-models" / "release"
    release.mkdir(parents=True)
    fake_model_dir(release, version)
    (release / "README.md").write_text("# how it was trained\n")
    return release


def _localiser(models_dir: Path, version: str) -> Path:
    folder = models_dir / "localiser" / version
    folder.mkdir(parents=True)
    data = os.urandom(300)
    (folder / "analysis_fp32.tflite").write_bytes(data)
    (folder / "card.json").write_text(json.dumps({"kind": "localiser", "version": version,
                                                  "file": "analysis_fp32.tflite",
                                                  "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}))
    return folder


def test_the_release_model_is_installed_once_and_never_half(tmp_path):
    release = _release(tmp_path, "rel-1")
    models = tmp_path / "models"
    (models / ".release.partial").mkdir(parents=True)  # an earlier copy cut short
    (models / ".release.partial" / "junk").write_text("x")
    installed = starter.install_release(models, release)
    assert installed == models / "release"
    assert json.loads((installed / "card.json").read_text())["version"] == "rel-1"
    assert not (installed / "README.md").exists() and not (models / ".release.partial").exists()
    (installed / "marker").write_text("kept")
    assert starter.install_release(models, release) == installed and (installed / "marker").exists()
    assert starter.install_release(tmp_path / "other", tmp_path / "no-release") is None


def test_first_run_prefers_an_existing_model_then_the_release(tmp_path, monkeypatch):
    release = _release(tmp_path, "rel-2")
    monkeypatch.setattr(starter, "RELEASE_DIR", release)
    settings = type("S", (), {"models_dir": tmp_path / "models"})()
    note = prepare.starter_models(settings, {"ham10000": None, "synthetic": False})
    assert note == f"Models: {tmp_path / 'models' / 'release'}"

    own = tmp_path / "models" / "mine"
    own.mkdir()
    fake_model_dir(own, "mine-1")
    os.utime(own, (2e9, 2e9))  # newer than the release copy
    assert prepare.starter_models(settings, {"synthetic": False}) == f"Models: {own}"


def test_synthetic_asks_for_a_demonstration_model_and_says_so(tmp_path, monkeypatch):
    release = _release(tmp_path, "rel-3")
    monkeypatch.setattr(starter, "RELEASE_DIR", release)
    trained: list[Path] = []

    def fake_starter(models_dir: Path, data_dir=None) -> Path:  # the real one trains for minutes
        target = Path(models_dir) / "starter"
        target.mkdir(parents=True)
        fake_model_dir(target, "starter-1")
        card = json.loads((target / "card.json").read_text())
        card["demonstration"] = True
        (target / "card.json").write_text(json.dumps(card))
        trained.append(target)
        return target

    monkeypatch.setattr(starter, "ensure_starter_models", fake_starter)
    settings = type("S", (), {"models_dir": tmp_path / "models"})()
    note = prepare.starter_models(settings, {"ham10000": None, "synthetic": True})
    assert trained and not (tmp_path / "models" / "release").exists()
    assert "DEMONSTRATION" in note and "no risk tier" in note


def test_the_served_models_become_version_one_only_where_nothing_is_published(localbase, app, clean_registry,
                                                                             tmp_path):
    settings = localbase.settings(data_dir=tmp_path)
    model_dir = settings.models_dir / "release"
    model_dir.mkdir(parents=True)
    fake_model_dir(model_dir, "served-1")
    _localiser(settings.models_dir, "loc-1")

    note = publish_served_models(settings, {})
    assert note == "Registry: cloud served-1 (published now), device served-1 (published now), localiser loc-1 (published now)"
    assert {k: registry.current_version(k, app=app) for k in registry.KINDS} == {
        "cloud": "served-1", "device": "served-1", "localiser": "loc-1"}
    assert registry.history("cloud", app=app)[0]["reason"].startswith("first start of dermaloop run")

    # A maintainer promotes another version; a restart leaves the pointer where they put it.
    other = tmp_path / "other"
    other.mkdir()
    fake_model_dir(other, "better-2", seed=1)
    registry.publish(other, "cloud", make_current=False, app=app, settings=settings)
    registry.promote("cloud", "better-2", reason="retrained", app=app)
    assert publish_served_models(settings, {}) == "Registry: cloud better-2, device served-1, localiser loc-1"
    assert registry.current_version("cloud", app=app) == "better-2"
