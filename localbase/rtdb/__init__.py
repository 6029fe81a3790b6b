"""localbase Realtime Database: Firebase's RTDB REST + streaming protocol over SQLite, with rules.

``create_app(ctx)`` is what :mod:`localbase.server` mounts on the database port. Modules: ``values``
(data model, limits, server values), ``store`` (SQLite leaf rows + in-memory tree, group commit),
``query`` (orderBy/filters/limits), ``rules`` (database.rules.json semantics, on the shared
expression language in :mod:`localbase.rules_expr`), ``events`` (SSE listeners), ``service`` (HTTP).

Environment (optional): ``LOCALBASE_RTDB_KEEPALIVE_S`` (seconds between SSE keep-alives, default 30,
as production), ``LOCALBASE_RTDB_RECHECK_S`` (how often an end user's stream re-checks its token
besides before every event and on Auth's revocation push, default 5), ``LOCALBASE_RTDB_MAX_NAMESPACES``
(namespaces end-user writes may create in emulator mode, default 1000), ``LOCALBASE_RTDB_SYNC=full``
(fsync every group commit: survives power loss, not only ``kill -9``).

Known differences from production: the tree is held in memory (sized for one clinic or a test run,
not for gigabytes); a write denied by every rule on its own path is not rescued by grants on the
children it writes (production reportedly does that; the project's rules never rely on it); REST
writes are capped at 32 MB (production: 256 MB); ``timeout``/``writeSizeLimit`` are accepted and
ignored; streaming requests cannot carry query parameters.
"""

from localbase.rtdb.service import create_app

__all__ = ["create_app"]
