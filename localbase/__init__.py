"""localbase: one Python process that speaks the Firebase Emulator Suite's wire protocols.

It serves the Realtime Database, Cloud Storage and Auth to unmodified Firebase clients, keeps
everything in SQLite (and blob files) under one data directory, and enforces the project's
``database.rules.json`` and ``storage.rules``. See docs/ARCHITECTURE.md.
"""
