"""The firebase-admin handles server code passes around (an app, a bucket, a database reference),
and the name its records give the person acting.

The registry, retraining and dataset versions all take an optional ``app`` and ``bucket`` so a test
or a caller holding another backend's handles can pass its own; without them, the settings name the
backend (:func:`dermaloop.admin_app.get_app`, :func:`dermaloop.storage.admin_bucket`, so emulator
hosts, app names and credentials are decided in one place). Nothing here imports firebase-admin or
google-cloud-storage when the module is imported: the phone app imports ``dermaloop.registry``
(for its file checks) and ships without either.
"""

from __future__ import annotations

import getpass
import socket
from typing import Any

from dermaloop.settings import Settings

__all__ = ["acting_user", "app_or_default", "bucket_or_default", "reference", "server_handles"]


def app_or_default(app: Any, settings: Settings | None) -> Any:
    """``app`` when given, else the firebase-admin app of ``settings`` (or of the environment)."""
    if app is not None:
        return app
    from dermaloop.admin_app import get_app

    return get_app(settings)


def bucket_or_default(bucket: Any, settings: Settings | None) -> Any:
    """``bucket`` when given, else the admin bucket of ``settings`` (or of the environment)."""
    if bucket is not None:
        return bucket
    from dermaloop.storage import admin_bucket

    return admin_bucket(settings)


def server_handles(app: Any, bucket: Any, settings: Settings | None) -> tuple[Any, Any]:
    """Both at once: what a step that reads the database and Storage (retraining) starts with."""
    return app_or_default(app, settings), bucket_or_default(bucket, settings)


def reference(path: str, app: Any) -> Any:
    """A firebase-admin ``db.Reference`` to ``path`` through ``app`` (admin rights: rules bypassed)."""
    from firebase_admin import db

    return db.reference(path, app=app)


def acting_user(by: str | None = None) -> str:
    """Who a maintainer's record names (a publication, a pointer move, a dataset version, a
    retraining run): ``by`` when given, else user@host of this process."""
    if by:
        return by
    try:
        user = getpass.getuser()
    except Exception:  # no user name in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"
