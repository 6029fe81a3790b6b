"""What ``dermaloop run`` starts, in order. A component plugs itself in by adding an entry here.

Entries whose module is not importable yet are skipped (and listed as such), so the run command
starts exactly the components that exist.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dermaloop.settings import Settings


def module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


@dataclass(frozen=True)
class Service:
    """A long-running child process."""

    name: str
    module: str  # must be importable for the service to start
    argv: Callable[[Settings, dict[str, Any]], list[str]]
    ready_pattern: str  # regex printed once the service accepts work
    ready_count: int = 1  # how many lines must match (localbase announces three services)
    url: Callable[[Settings], str] | None = None
    embedded_only: bool = False  # only when running on the embedded backend

    @property
    def available(self) -> bool:
        return module_available(self.module)


@dataclass(frozen=True)
class PrepareStep:
    """Work done once before the services start (idempotent): accounts, starter models."""

    name: str
    function: str  # "module:function", called as function(settings, options) -> str | None (a line to print)
    requires: str  # module that must exist for the step to run
    embedded_only: bool = False

    @property
    def available(self) -> bool:
        return module_available(self.requires)

    def __call__(self, settings: Settings, options: dict[str, Any]) -> str | None:
        module, function = self.function.split(":")
        return getattr(importlib.import_module(module), function)(settings, options)


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


def _backend_argv(settings: Settings, options: dict[str, Any]) -> list[str]:
    ports = options["backend_ports"]
    return _python(
        "-m", "localbase",
        "--data-dir", str(Path(settings.data_dir) / "localbase"),
        "--host", settings.host,
        "--database-port", str(ports["database"]),
        "--storage-port", str(ports["storage"]),
        "--auth-port", str(ports["auth"]),
        "--project-id", settings.project_id,
    )  # fmt: skip


BACKEND = Service(
    name="backend",
    module="localbase",
    argv=_backend_argv,
    ready_pattern=r"localbase (\w+) listening on http://([\w.\-]+):(\d+)",
    ready_count=3,
    embedded_only=True,
)

# Started after the backend and the prepare steps, in this order.
SERVICES: list[Service] = [
    Service(
        name="worker",
        module="cloud_worker.cli",
        argv=lambda settings, options: _python("-m", "dermaloop", "worker"),
        ready_pattern=r"worker ready",
    ),
    Service(
        name="portal",
        module="reviewer_portal.app",
        argv=lambda settings, options: _python("-m", "dermaloop", "portal", "--port", str(settings.portal_port)),
        ready_pattern=r"portal ready",
        url=lambda s: f"http://{s.host}:{s.portal_port}/",
    ),
    Service(
        name="client",
        module="client.app",
        argv=lambda settings, options: _python("-m", "dermaloop", "client", "--port", str(settings.client_port)),
        ready_pattern=r"client ready",
        url=lambda s: f"http://{s.host}:{s.client_port}/",
    ),
]

PREPARE: list[PrepareStep] = [
    PrepareStep("demo accounts", "dermaloop.bootstrap:demo_accounts", requires="dermaloop.auth", embedded_only=True),
    PrepareStep("starter models", "training.prepare:starter_models", requires="training.starter"),
    PrepareStep("image-analysis model", "training.prepare:analysis_model", requires="training.localiser_train"),
    PrepareStep("model registry", "dermaloop.first_publish:publish_served_models", requires="dermaloop.registry"),
]


def prepare_step(name: str) -> PrepareStep | None:
    """A prepare step by name, if it is built here (a phone build has no training package)."""
    step = next((s for s in PREPARE if s.name == name), None)
    return step if step is not None and step.available else None
