"""The patient app as a phone app (``flet build apk`` / ``flet build ipa``, docs/PHONE_BUILD.md).

The same :class:`client.app.PatientApp` as ``dermaloop client``, drawn by Flet's native client
instead of being served to a browser. What differs is only where things are: the backend's settings
and the bundled models come with the app's assets, and the local store lives in the app's private
data directory, which Flet names in ``FLET_APP_STORAGE_DATA`` (kept across app updates).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from dermaloop.settings import Settings, load_settings

CONFIG_NAME = "dermaloop.toml"  # the backend (project id, database URL, bucket, API key), in the assets
MODELS_NAME = "models"  # the bundled model directories (device classifier, localiser), in the assets


def phone_settings(environ: Mapping[str, str] | None = None) -> tuple[Settings, Path]:
    """The settings and the local store's folder of a built app.

    ``FLET_ASSETS_DIR`` (default ``assets``) holds ``dermaloop.toml`` and ``models/``;
    ``FLET_APP_STORAGE_DATA`` is the app's data directory (the store goes to ``client/`` in it,
    downloaded model updates beside it). Variables already set win, as everywhere else."""
    env = dict(os.environ if environ is None else environ)
    assets = Path(env.get("FLET_ASSETS_DIR") or "assets")
    data = env.get("FLET_APP_STORAGE_DATA")
    if not data:
        raise RuntimeError("FLET_APP_STORAGE_DATA is not set: client.phone runs inside an app made by `flet build`; "
                           "on a computer use `dermaloop client`")
    config = assets / CONFIG_NAME
    if config.is_file():
        env.setdefault("DERMALOOP_CONFIG", str(config))
    env.setdefault("DERMALOOP_DATA_DIR", data)
    env.setdefault("DERMALOOP_MODELS_DIR", str(assets / MODELS_NAME))
    return load_settings(environ=env), Path(data) / "client"


def main() -> None:
    """The built app's entry point (its ``main.py`` calls this)."""
    import flet as ft

    from client.app import PatientApp
    from client.device import Device

    settings, data_dir = phone_settings()
    device = Device(settings, data_dir)

    async def app(page: ft.Page) -> None:
        await PatientApp(page, device).open()

    ft.run(app)
