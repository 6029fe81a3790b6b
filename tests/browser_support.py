"""Drive the Flet web apps in Debian's chromium through Playwright (../shared/docs/ui-testing.md):
launch flags that work offline, semantics switched on so controls are found by their labels, and
app processes started through the real CLI with their output kept for the failure message."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dermaloop.settings import PROJECT_ROOT, Settings

CHROMIUM = "/usr/bin/chromium"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--enable-unsafe-swiftshader"]


def require_browser() -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (make test installs Debian's chromium)")
    pytest.importorskip("playwright.sync_api")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def open_flet(page, url: str) -> None:
    """Load a Flet page and switch Flutter's semantics tree on (there is no DOM before it)."""
    page.goto(url)
    page.wait_for_selector("flt-semantics-placeholder", state="attached", timeout=120_000)
    page.locator("flt-semantics-placeholder").dispatch_event("click")


@dataclass
class Shots:
    """Numbered screenshots of each step, kept under the test's output folder to be looked at."""

    folder: Path
    n: int = 0

    def __call__(self, page, name: str) -> Path:
        self.n += 1
        path = self.folder / f"{self.n:02d}-{name}.png"
        page.screenshot(path=str(path))  # Flutter draws one canvas: the viewport is the page
        return path


def shots_folder(name: str) -> Path:
    folder = PROJECT_ROOT / "var" / "test-screens" / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


@dataclass
class AppProcess:
    """A Flet app (``dermaloop client`` / ``dermaloop portal``) as a real child process."""

    command: str
    settings: Settings
    args: list[str]
    env_extra: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    lines: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self, timeout: float = 180.0) -> AppProcess:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("FIREBASE_", "STORAGE_EMULATOR", "GOOGLE_APPLICATION", "DERMALOOP_"))}
        env.update(self.settings.emulator_env())
        env.update({"PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "3", **self.env_extra})
        cmd = [sys.executable, "-m", "dermaloop", self.command, "--port", str(self.port), *self.args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     cwd=PROJECT_ROOT)
        ready = threading.Event()
        pattern = re.compile(rf"{self.command} ready")

        def pump() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line)
                if pattern.search(line):
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(timeout) or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError(f"dermaloop {self.command} did not start:\n" + "".join(self.lines))
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def type_into(page, name: str, text: str) -> None:
    """Type into a text field as a person does (click, select all, keys). Playwright's ``fill`` on
    Flutter's semantics textbox sometimes never reaches the app's value (seen here on 2 busy cores)."""
    box = page.get_by_role("textbox", name=name)
    box.click()
    box.press("Control+A")
    box.press_sequentially(text, delay=15)
