"""localbase's own defaults: ports from ``firebase.json``, the rules files, project id, data dir, host.

localbase must start without the ``dermaloop`` package (it is the backend, not a client), so it
reads these itself instead of asking ``dermaloop.settings``. It reads the same sources with the same
precedence (environment variable > the TOML file named by ``DERMALOOP_CONFIG`` or ``./dermaloop.toml``
> default) so that ``python -m localbase`` and the apps agree on a project id and a data directory
without either importing the other. ``dermaloop run`` passes every value explicitly anyway.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# The project root holds firebase.json and the rules files; localbase lives directly under it.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
FIREBASE_JSON = PROJECT_ROOT / "firebase.json"
DEFAULT_PROJECT_ID = "demo-dermaloop"
# The Emulator Suite's ports, used when firebase.json does not name one.
DEFAULT_PORTS = {"database": 9000, "storage": 9199, "auth": 9099}

# setting -> environment variables, first non-empty wins (Google's and Firebase's names first).
_ENV = {
    "project_id": ("GOOGLE_CLOUD_PROJECT", "GCLOUD_PROJECT", "DERMALOOP_PROJECT_ID"),
    "data_dir": ("DERMALOOP_DATA_DIR",),
    "host": ("DERMALOOP_HOST",),
}


def emulator_ports(firebase_json: Path = FIREBASE_JSON) -> dict[str, int]:
    """Ports from firebase.json, so localbase and firebase-tools' emulators are interchangeable."""
    ports = dict(DEFAULT_PORTS)
    try:
        config = json.loads(firebase_json.read_text())
    except FileNotFoundError:
        return ports
    emulators = config.get("emulators", {})
    for name in ports:
        port = emulators.get(name, {}).get("port")
        if port is not None:
            ports[name] = int(port)
    return ports


@dataclass(frozen=True)
class Defaults:
    project_id: str = DEFAULT_PROJECT_ID
    data_dir: Path = Path("var")
    host: str = "127.0.0.1"


def _config_file(environ: Mapping[str, str]) -> Path | None:
    named = environ.get("DERMALOOP_CONFIG")
    if named:
        path = Path(named)
        if not path.is_file():
            raise FileNotFoundError(f"DERMALOOP_CONFIG names {path}, which does not exist")
        return path
    local = Path("dermaloop.toml")
    return local if local.is_file() else None


def defaults(environ: Mapping[str, str] | None = None) -> Defaults:
    """The command-line defaults, read from the variables and file the rest of the project uses."""
    environ = os.environ if environ is None else environ
    values: dict[str, str] = {}
    path = _config_file(environ)
    if path is not None:
        data = tomllib.loads(path.read_text())
        values.update({k: str(data[k]) for k in _ENV if k in data})
    for name, variables in _ENV.items():
        chosen = next((environ[v] for v in variables if environ.get(v)), None)
        if chosen is not None:
            values[name] = chosen
    return Defaults(
        project_id=values.get("project_id", DEFAULT_PROJECT_ID),
        data_dir=Path(values.get("data_dir", "var")),
        host=values.get("host", "127.0.0.1"),
    )
