"""Start a real localbase process on free ports for tests and benchmarks."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from dermaloop.settings import PROJECT_ROOT, Settings, load_settings

_READY = re.compile(r"localbase (\w+) listening on http://([\d.]+):(\d+)")


@dataclass
class LocalbaseProcess:
    data_dir: Path
    project_id: str = "demo-dermaloop"
    rules_dir: Path = PROJECT_ROOT
    ports: dict[str, int] = field(default_factory=dict)
    host: str = "127.0.0.1"
    proc: subprocess.Popen | None = None
    output: list[str] = field(default_factory=list)

    def start(self, timeout: float = 60.0) -> LocalbaseProcess:
        """Start and wait until every service announced its address (0 ports: the OS picks)."""
        want = {"database": 0, "storage": 0, "auth": 0}
        want.update(self.ports)
        cmd = [
            sys.executable, "-m", "localbase", "--data-dir", str(self.data_dir), "--host", self.host,
            "--database-port", str(want["database"]), "--storage-port", str(want["storage"]),
            "--auth-port", str(want["auth"]), "--project-id", self.project_id,
            "--rules-dir", str(self.rules_dir),
        ]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=PROJECT_ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        found: dict[str, int] = {}
        ready = threading.Event()

        def pump() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self.output.append(line)
                m = _READY.search(line)
                if m:
                    found[m.group(1)] = int(m.group(3))
                    if len(found) == 3:
                        ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.1):
            if time.monotonic() > deadline:
                break
        if len(found) != 3:
            self.stop()
            raise RuntimeError("localbase did not start:\n" + "".join(self.output))
        self.ports = found
        return self

    def settings(self, **overrides) -> Settings:
        base = load_settings(environ={}, project_id=self.project_id, **overrides)
        return base.with_local_backend(self.host, self.ports)

    @property
    def database_url(self) -> str:
        return f"http://{self.host}:{self.ports['database']}"

    @property
    def storage_url(self) -> str:
        return f"http://{self.host}:{self.ports['storage']}"

    @property
    def auth_url(self) -> str:
        return f"http://{self.host}:{self.ports['auth']}"

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> int | None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc else None

    def restart(self) -> LocalbaseProcess:
        """Start again on the same data directory and the same ports."""
        self.stop()
        return self.start()
