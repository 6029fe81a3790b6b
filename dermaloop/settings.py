"""One place for every setting, so the apps never know which Firebase backend they talk to.

Precedence: environment variable > optional TOML file > default. The TOML file is the one named by
``DERMALOOP_CONFIG``, else ``dermaloop.toml`` in the working directory if present. Its keys are the
field names below (``project_id = "..."``).

Firebase endpoints follow Firebase's own conventions, so the same variables switch firebase-admin,
google-cloud-storage and our REST clients between real Firebase and an emulator (localbase or the
official Emulator Suite):

==================================  ==================================================================
variable                            meaning (default)
==================================  ==================================================================
GOOGLE_CLOUD_PROJECT                Firebase project id (``demo-dermaloop``; ``demo-`` ids never reach
                                    Google)
FIREBASE_DATABASE_URL               RTDB URL (``https://<project>-default-rtdb.firebaseio.com``)
FIREBASE_STORAGE_BUCKET             Storage bucket (``<project>.appspot.com``)
FIREBASE_API_KEY                    Web API key for end-user REST calls (``fake-api-key``; emulators
                                    accept any value)
GOOGLE_APPLICATION_CREDENTIALS      service-account JSON for production admin access (unset)
FIREBASE_DATABASE_EMULATOR_HOST     ``host:port`` of an RTDB emulator (unset = production)
FIREBASE_AUTH_EMULATOR_HOST         ``host:port`` of an Auth emulator (unset = production)
STORAGE_EMULATOR_HOST               ``http://host:port`` of a Storage emulator (unset = production)
DERMALOOP_DATA_DIR                  where localbase and the run command keep state (``./var``)
DERMALOOP_MODELS_DIR                local model directories (``<data dir>/models``)
DERMALOOP_HOST                      interface the local services bind (``127.0.0.1``)
DERMALOOP_CLIENT_PORT               patient web app port (``8550``)
DERMALOOP_PORTAL_PORT               reviewer portal port (``8551``)
==================================  ==================================================================

A command started in another terminal finds the local system that ``dermaloop run`` started: run
writes ``<data dir>/running.json`` (endpoints, project id, its pid) and removes it on exit. When no
Firebase setting is given (no emulator variable, no credentials, no database URL or bucket), settings
loaded from the process environment use that file while its process is alive.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
FIREBASE_JSON = PROJECT_ROOT / "firebase.json"
DEFAULT_PROJECT_ID = "demo-dermaloop"

# Ports of Firebase's Emulator Suite; firebase.json overrides them for both localbase and firebase-tools.
_DEFAULT_EMULATOR_PORTS = {"database": 9000, "storage": 9199, "auth": 9099}


def emulator_ports(firebase_json: Path = FIREBASE_JSON) -> dict[str, int]:
    """Emulator ports from firebase.json, so localbase and the official emulators agree."""
    ports = dict(_DEFAULT_EMULATOR_PORTS)
    try:
        config = json.loads(firebase_json.read_text())
    except FileNotFoundError:
        return ports
    for name in ports:
        port = config.get("emulators", {}).get(name, {}).get("port")
        if port is not None:
            ports[name] = int(port)
    return ports


@dataclass(frozen=True)
class Settings:
    project_id: str = DEFAULT_PROJECT_ID
    database_url: str = ""
    storage_bucket: str = ""
    api_key: str = "fake-api-key"
    credentials_file: str | None = None
    database_emulator_host: str | None = None
    auth_emulator_host: str | None = None
    storage_emulator_host: str | None = None
    data_dir: Path = field(default_factory=lambda: Path("var"))
    models_dir: Path | None = None
    host: str = "127.0.0.1"
    client_port: int = 8550
    portal_port: int = 8551

    def __post_init__(self) -> None:
        # Derived defaults follow Firebase's naming for a project's default instances.
        if not self.database_url:
            object.__setattr__(self, "database_url", f"https://{self.project_id}-default-rtdb.firebaseio.com")
        if not self.storage_bucket:
            object.__setattr__(self, "storage_bucket", f"{self.project_id}.appspot.com")
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        if self.models_dir is None:
            object.__setattr__(self, "models_dir", self.data_dir / "models")
        else:
            object.__setattr__(self, "models_dir", Path(self.models_dir))
        if self.storage_emulator_host and "://" not in self.storage_emulator_host:
            # google-cloud-storage needs the scheme; the Firebase tools document host:port.
            object.__setattr__(self, "storage_emulator_host", f"http://{self.storage_emulator_host}")
        for name in ("database_emulator_host", "auth_emulator_host"):
            value = getattr(self, name)
            if value and "://" in value:
                raise ValueError(f"{name} must be host:port without a scheme (Firebase's convention): {value!r}")

    @property
    def uses_emulators(self) -> bool:
        return bool(self.database_emulator_host or self.auth_emulator_host or self.storage_emulator_host)

    @property
    def database_namespace(self) -> str:
        """The ``ns`` firebase-admin sends in emulator mode: the first DNS label of the database URL."""
        from urllib.parse import parse_qs, urlparse

        parsed = urlparse(self.database_url)
        ns = parse_qs(parsed.query).get("ns")
        return ns[0] if ns else (parsed.hostname or "").split(".")[0]

    def emulator_env(self) -> dict[str, str]:
        """The standard variables a child process needs to reach the same backend."""
        env = {
            "GOOGLE_CLOUD_PROJECT": self.project_id,
            "FIREBASE_DATABASE_URL": self.database_url,
            "FIREBASE_STORAGE_BUCKET": self.storage_bucket,
            "FIREBASE_API_KEY": self.api_key,
            "DERMALOOP_DATA_DIR": str(self.data_dir),
            "DERMALOOP_MODELS_DIR": str(self.models_dir),
        }
        if self.database_emulator_host:
            env["FIREBASE_DATABASE_EMULATOR_HOST"] = self.database_emulator_host
        if self.auth_emulator_host:
            env["FIREBASE_AUTH_EMULATOR_HOST"] = self.auth_emulator_host
        if self.storage_emulator_host:
            env["STORAGE_EMULATOR_HOST"] = self.storage_emulator_host
        if self.credentials_file:
            env["GOOGLE_APPLICATION_CREDENTIALS"] = self.credentials_file
        return env

    def with_local_backend(self, host: str, ports: dict[str, int]) -> Settings:
        """These settings pointed at a localbase (or Emulator Suite) on ``host`` with ``ports``."""
        return replace(
            self,
            database_emulator_host=f"{host}:{ports['database']}",
            auth_emulator_host=f"{host}:{ports['auth']}",
            storage_emulator_host=f"http://{host}:{ports['storage']}",
        )


# Environment variable -> field. Several names are Firebase's or Google's own.
_ENV = {
    "project_id": ("GOOGLE_CLOUD_PROJECT", "GCLOUD_PROJECT", "DERMALOOP_PROJECT_ID"),
    "database_url": ("FIREBASE_DATABASE_URL", "DERMALOOP_DATABASE_URL"),
    "storage_bucket": ("FIREBASE_STORAGE_BUCKET", "DERMALOOP_STORAGE_BUCKET"),
    "api_key": ("FIREBASE_API_KEY", "DERMALOOP_API_KEY"),
    "credentials_file": ("GOOGLE_APPLICATION_CREDENTIALS",),
    "database_emulator_host": ("FIREBASE_DATABASE_EMULATOR_HOST",),
    "auth_emulator_host": ("FIREBASE_AUTH_EMULATOR_HOST",),
    "storage_emulator_host": ("STORAGE_EMULATOR_HOST",),
    "data_dir": ("DERMALOOP_DATA_DIR",),
    "models_dir": ("DERMALOOP_MODELS_DIR",),
    "host": ("DERMALOOP_HOST",),
    "client_port": ("DERMALOOP_CLIENT_PORT",),
    "portal_port": ("DERMALOOP_PORTAL_PORT",),
}


def _config_file(environ: dict[str, str]) -> Path | None:
    named = environ.get("DERMALOOP_CONFIG")
    if named:
        path = Path(named)
        if not path.is_file():
            raise FileNotFoundError(f"DERMALOOP_CONFIG names {path}, which does not exist")
        return path
    local = Path("dermaloop.toml")
    return local if local.is_file() else None


RUNNING_FILE = "running.json"
# Any of these given means the user chose a backend; the running local system is then not used.
_BACKEND_CHOICES = ("credentials_file", "database_emulator_host", "auth_emulator_host", "storage_emulator_host",
                    "database_url", "storage_bucket")


def running_file(data_dir: str | Path) -> Path:
    return Path(data_dir) / RUNNING_FILE


def write_running(settings: Settings, pid: int) -> Path:
    """Record the local system's endpoints for commands started in other terminals (atomically)."""
    path = running_file(settings.data_dir)
    record = {"pid": pid, "projectId": settings.project_id, "databaseEmulatorHost": settings.database_emulator_host,
              "authEmulatorHost": settings.auth_emulator_host, "storageEmulatorHost": settings.storage_emulator_host}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)
    return path


def clear_running(settings: Settings, pid: int) -> None:
    """Remove the record if it is still ours (a second run may have replaced it)."""
    path = running_file(settings.data_dir)
    if read_running(path, alive_only=False).get("pid") == pid:
        path.unlink(missing_ok=True)


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def read_running(path: Path, alive_only: bool = True) -> dict[str, Any]:
    """The record in a running file (empty if absent, unreadable or, with ``alive_only``, stale)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict) or (alive_only and not _pid_alive(record.get("pid"))):
        return {}
    return record


def running_system(data_dir: str | Path) -> dict[str, Any]:
    """The settings of the live local system under ``data_dir`` (empty when none is running)."""
    record = read_running(running_file(data_dir))
    found = {"project_id": record.get("projectId"), "database_emulator_host": record.get("databaseEmulatorHost"),
             "auth_emulator_host": record.get("authEmulatorHost"),
             "storage_emulator_host": record.get("storageEmulatorHost")}
    return {k: v for k, v in found.items() if isinstance(v, str) and v}


def load_settings(environ: dict[str, str] | None = None, discover: bool | None = None, **overrides: Any) -> Settings:
    """Settings from the environment, the optional TOML file and explicit overrides (highest).

    ``discover`` (default: only when reading the real process environment) fills in the running
    local system's endpoints when no backend was chosen; ``dermaloop run`` itself never discovers."""
    if discover is None:
        discover = environ is None
    environ = dict(os.environ if environ is None else environ)
    values: dict[str, Any] = {}
    path = _config_file(environ)
    if path is not None:
        known = {f.name for f in fields(Settings)}
        data = tomllib.loads(path.read_text())
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path}: unknown settings {sorted(unknown)}; known: {sorted(known)}")
        values.update(data)
    for name, variables in _ENV.items():
        for variable in variables:
            if environ.get(variable):
                values[name] = environ[variable]
                break
    values.update({k: v for k, v in overrides.items() if v is not None})
    if discover and not any(values.get(name) for name in _BACKEND_CHOICES):
        values.update(running_system(values.get("data_dir") or "var"))
    for name in ("client_port", "portal_port"):
        if name in values:
            values[name] = int(values[name])
    return Settings(**values)
