"""Shared fixtures. Tests start a real localbase and use the real Firebase client libraries."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.localbase_process import LocalbaseProcess

HAM10000 = Path(os.environ.get("DERMALOOP_HAM10000", Path(__file__).resolve().parents[1].parent / "shared/data/ham10000"))


@pytest.fixture(scope="session")
def localbase(tmp_path_factory) -> LocalbaseProcess:
    """One localbase process for the session, on free ports, with the project's rules files."""
    server = LocalbaseProcess(data_dir=tmp_path_factory.mktemp("localbase")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def app(localbase, request):
    """A firebase-admin app on the shared localbase for one test module (a module may define its own).

    Named after the module plus a random tag, so no two modules (nor two runs) share an app."""
    import uuid

    from dermaloop.admin_app import get_app

    return get_app(localbase.settings(), name=f"{request.module.__name__.rpartition('.')[2]}-{uuid.uuid4().hex[:6]}")


@pytest.fixture(scope="module")
def bucket(localbase):
    """The shared localbase's default bucket with admin rights."""
    from dermaloop.storage import admin_bucket

    return admin_bucket(localbase.settings())


@pytest.fixture
def clean_registry(app):
    """Empties the model registry (/models, /modelAudit) after the test: other test modules share the
    localbase, and a worker started by another test may follow /models/cloud/current."""
    yield
    from firebase_admin import db

    for path in ("models", "modelAudit"):
        db.reference(path, app=app).delete()


@pytest.fixture
def ham10000() -> Path:
    """The real HAM10000 folder; skips (saying why) where it is absent, as on users' machines."""
    if not (HAM10000 / "metadata.csv").is_file():
        pytest.skip(f"HAM10000 folder not found at {HAM10000} (set DERMALOOP_HAM10000); users do not have it")
    return HAM10000


@pytest.fixture(scope="session")
def analysis_models_dir(tmp_path_factory) -> Path:
    """A models directory holding the analysis model (localiser + not-skin), built from the packaged
    heads (float32, no data needed), as ``dermaloop run`` prepares it."""
    pytest.importorskip("tensorflow")
    from training.analysis_model import HEAD_WEIGHTS

    if not HEAD_WEIGHTS.is_file():
        pytest.skip("localiser head weights not trained")
    from training.localiser_train import ensure_localiser

    root = tmp_path_factory.mktemp("models")
    ensure_localiser(root)
    return root
