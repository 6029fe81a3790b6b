"""The firebase-admin app that server programs (worker, retraining, user admin) share.

Against emulators firebase-admin needs no real credential for the database and auth, but
``firebase_admin.storage`` still asks the app's credential for a token even in emulator mode, so an
anonymous credential stands in there (firebase-protocols.md, gotcha 8).
"""

from __future__ import annotations

import contextlib
import hashlib
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


def _fingerprint(settings: Settings) -> str:
    key = "|".join(str(v) for v in (
        settings.project_id, settings.database_url, settings.storage_bucket, settings.credentials_file,
        settings.database_emulator_host, settings.auth_emulator_host, settings.storage_emulator_host,
    ))
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def _use_auth_emulator(settings: Settings) -> None:
    """Point firebase-admin's auth at the emulator the way it expects: through the environment.

    firebase-admin reads FIREBASE_AUTH_EMULATOR_HOST when it builds an app's auth client (the host)
    and again whenever it verifies a token (only whether it is set), so the variable is set for the
    process and the app's client is built at once, bound to this backend.
    """
    if settings.auth_emulator_host:
        os.environ["FIREBASE_AUTH_EMULATOR_HOST"] = settings.auth_emulator_host


def get_app(settings: Settings | None = None, name: str | None = None) -> firebase_admin.App:
    """The firebase-admin app for these settings, created on first use.

    Without a name, the app is named after the settings, so code that talks to two backends (a test
    with its own localbase next to the shared one) never reuses an app configured for the other.
    The database emulator is chosen through the app's URL rather than the process environment for
    the same reason.
    """
    settings = settings or load_settings()
    name = name or f"dermaloop-{_fingerprint(settings)}"
    with _lock:
        try:
            return firebase_admin.get_app(name)
        except ValueError:
            pass
        if settings.credentials_file:
            credential = credentials.Certificate(settings.credentials_file)
        elif settings.uses_emulators:
            credential = _EmulatorCredential()
        else:
            credential = credentials.ApplicationDefault()
        database_url = settings.database_url
        if settings.database_emulator_host:
            database_url = f"http://{settings.database_emulator_host}/?ns={settings.database_namespace}"
        options = {
            "databaseURL": database_url,
            "storageBucket": settings.storage_bucket,
            "projectId": settings.project_id,
        }
        app = firebase_admin.initialize_app(credential, options, name=name)
        _use_auth_emulator(settings)
        from firebase_admin import auth

        auth._get_client(app)  # built now, while the variable names this app's backend
        return app


def delete_app(name: str) -> None:
    with _lock, contextlib.suppress(ValueError):
        firebase_admin.delete_app(firebase_admin.get_app(name))
