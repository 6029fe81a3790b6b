"""localbase: one Python process that speaks the Firebase Emulator Suite's wire protocols.

It serves the Realtime Database, Cloud Storage and Auth to unmodified Firebase clients, keeps
everything in SQLite (and blob files) under one data directory, and enforces the project's
``database.rules.json`` and ``storage.rules``. See docs/ARCHITECTURE.md.

Two modes (:mod:`localbase.security`): emulator mode on the loopback interface (the emulator
protocols exactly, for tests and one developer's machine) and secure mode, on by default whenever it
listens beyond loopback (signed tokens, admin only from this machine or with the admin credential,
CORS for named origins, per-client limits), for a clinic network.
"""
