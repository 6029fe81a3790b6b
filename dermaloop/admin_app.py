"""The firebase-admin app that server programs (worker, retraining, user admin) share.

Against emulators firebase-admin needs no real credential for the database and auth, but
``firebase_admin.storage`` still asks the app's credential for a token even in emulator mode, so an
anonymous credential stands in there (firebase-protocols.md, gotcha 8).
"""

from __future__ import annotations

import contextlib
import os
import threading

import firebase_admin
from firebase_admin import credentials
from google.auth.credentials import AnonymousCredentials

from dermaloop.settings import Settings, load_settings

_lock = threading.Lock()


class _EmulatorCredential(credentials.Base):
    """A credential for emulator mode: google-cloud-storage then sends no Authorization header."""

    def get_credential(self):  # noqa: D401 - firebase-admin's interface
        return AnonymousCredentials()


def _apply_env(settings: Settings) -> None:
    # firebase-admin and google-cloud-storage read these variables themselves.
    for key, value in settings.emulator_env().items():
        if key.startswith(("FIREBASE_DATABASE_EMULATOR", "FIREBASE_AUTH_EMULATOR", "STORAGE_EMULATOR")):
            os.environ[key] = value


def get_app(settings: Settings | None = None, name: str = "[DEFAULT]") -> firebase_admin.App:
    """The named firebase-admin app for these settings, created on first use."""
    settings = settings or load_settings()
    with _lock:
        try:
            return firebase_admin.get_app(name)
        except ValueError:
            pass
        _apply_env(settings)
        if settings.credentials_file:
            credential = credentials.Certificate(settings.credentials_file)
        elif settings.uses_emulators:
            credential = _EmulatorCredential()
        else:
            credential = credentials.ApplicationDefault()
        options = {
            "databaseURL": settings.database_url,
            "storageBucket": settings.storage_bucket,
            "projectId": settings.project_id,
        }
        return firebase_admin.initialize_app(credential, options, name=name)


def delete_app(name: str = "[DEFAULT]") -> None:
    with _lock, contextlib.suppress(ValueError):
        firebase_admin.delete_app(firebase_admin.get_app(name))
