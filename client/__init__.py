"""The patient app (Flet): photograph a skin problem, get the on-device answer at once, even offline.

Its offline-first core has no UI: ``client.store`` keeps every case on the phone before anything
else happens to it, ``client.sync`` sends the cases and follows them (and their chat) on the
server, and ``client.device_models`` keeps the device model up to date. The UI (``client.app``,
``client.screens``) reads and drives those; it talks to Firebase only through ``dermaloop``.
"""
