"""Start a real localbase process on free ports for tests and benchmarks.

``secure=True`` starts it in secure mode (``--secure``); ``extra_args`` adds command-line options
(``--no-local-trust``, ``--cert``/``--key``, ``--cors-origin`` ...), ``env`` environment variables
(``LOCALBASE_*`` limits), and ``nofile`` caps the child's open-file limit (``ulimit -n``).
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from dermaloop.settings import PROJECT_ROOT, Settings, load_settings

_READY = re.compile(r"localbase (\w+) listening on (https?)://(\S+):(\d+)\s*$")


@dataclass
class LocalbaseProcess:
    data_dir: Path
    project_id: str = "demo-dermaloop"
    rules_dir: Path = PROJECT_ROOT
    ports: dict[str, int] = field(default_factory=dict)
    host: str = "127.0.0.1"
    proc: subprocess.Popen | None = None
    output: list[str] = field(default_factory=list)
    secure: bool = False
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    nofile: int | None = None
    scheme: str = "http"

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
        if self.secure:
            cmd.append("--secure")
        cmd += self.extra_args
        nofile = self.nofile

        def limit_files() -> None:  # runs in the child, before exec
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=PROJECT_ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
            preexec_fn=limit_files if nofile is not None else None,
        )
        found: dict[str, int] = {}
        ready = threading.Event()

        def pump() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self.output.append(line)
                m = _READY.search(line)
                if m:
                    found[m.group(1)] = int(m.group(4))
                    self.scheme = m.group(2)
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
        return f"{self.scheme}://{self.host}:{self.ports['database']}"

    @property
    def storage_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.ports['storage']}"

    @property
    def auth_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.ports['auth']}"

    @property
    def admin_credential(self) -> str:
        """Secure mode's admin bearer token, from the file localbase wrote into its data directory."""
        return json.loads((self.data_dir / "admin-credential.json").read_text())["token"]

    def signing_key(self):
        """Secure mode's token-signing key (localbase.tokens.SigningKey), read from the data directory."""
        from localbase.tokens import SigningKey

        return SigningKey.load_or_create(self.data_dir)

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
