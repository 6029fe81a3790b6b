"""localbase Realtime Database: Firebase's RTDB REST + streaming protocol over SQLite, with rules.

``create_app(ctx)`` is what :mod:`localbase.server` mounts on the database port.
"""

from localbase.rtdb.service import create_app

__all__ = ["create_app"]
