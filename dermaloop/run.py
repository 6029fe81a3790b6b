"""``dermaloop run``: the whole system on one machine, stopped cleanly by Ctrl-C.

With no Firebase variables set it starts the embedded backend (localbase) on the ports in
firebase.json and points every other process at it through Firebase's standard emulator variables.
With ``GOOGLE_APPLICATION_CREDENTIALS`` or emulator variables set, it uses that backend instead.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from dermaloop import DISCLAIMER
from dermaloop.services import BACKEND, PREPARE, SERVICES, Service
from dermaloop.settings import (
    Settings,
    clear_running,
    emulator_ports,
    load_settings,
    read_running,
    running_file,
    write_running,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=None, help="where everything is kept (default: $DERMALOOP_DATA_DIR or ./var)")
    parser.add_argument("--ham10000", default=None, metavar="DIR",
                        help="train the starter models on this HAM10000 folder if none exist "
                             "(default: $DERMALOOP_HAM10000, else the built-in synthetic set)")
    parser.add_argument("--synthetic", action="store_true",
                        help="serve a demonstration model trained on synthetic images instead of the shipped release "
                             "model (its answers mean nothing; for trying the system without any real data)")
    parser.add_argument("--free-ports", action="store_true",
                        help="let the OS pick free ports for the embedded backend instead of firebase.json's")
    parser.add_argument("--skip-prepare", action="store_true", help="do not create demo accounts or starter models")
    parser.add_argument("--exit-when-ready", action="store_true",
                        help="start everything, print the summary, then stop (a smoke test)")


class ServiceFailed(RuntimeError):
    pass


@dataclass
class Child:
    service: Service
    proc: subprocess.Popen
    matches: list[re.Match] = field(default_factory=list)
    tail: deque = field(default_factory=lambda: deque(maxlen=40))
    ready: threading.Event = field(default_factory=threading.Event)


class Supervisor:
    """Starts children, prefixes their output, and stops them all, in reverse order, exactly once."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.children: list[Child] = []
        self._lock = threading.Lock()

    def start(self, service: Service, argv: list[str], timeout: float = 180.0) -> Child:
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env,
            start_new_session=True,  # Ctrl-C reaches us only; we stop children in order
        )
        child = Child(service, proc)
        with self._lock:
            self.children.append(child)
        pattern = re.compile(service.ready_pattern)

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip("\n")
                child.tail.append(line)
                print(f"[{service.name}] {line}", flush=True)
                m = pattern.search(line)
                if m and not child.ready.is_set():
                    child.matches.append(m)
                    if len(child.matches) >= service.ready_count:
                        child.ready.set()
            child.ready.set()  # output closed: wake the waiter, which sees the exit

        threading.Thread(target=pump, name=f"pump-{service.name}", daemon=True).start()
        deadline = time.monotonic() + timeout
        while not child.ready.wait(0.2):
            if time.monotonic() > deadline:
                raise ServiceFailed(f"{service.name} did not become ready within {timeout:.0f} s")
        if proc.poll() is not None or len(child.matches) < service.ready_count:
            proc.wait()
            raise ServiceFailed(
                f"{service.name} exited with code {proc.returncode} before it was ready; last output:\n  "
                + "\n  ".join(child.tail)
            )
        return child

    def first_exited(self) -> Child | None:
        for child in self.children:
            if child.proc.poll() is not None:
                return child
        return None

    def stop_all(self, grace: float = 15.0) -> None:
        with self._lock:
            children, self.children = list(reversed(self.children)), []
        for child in children:
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
                try:
                    child.proc.wait(grace)
                except subprocess.TimeoutExpired:
                    print(f"[run] {child.service.name} ignored SIGTERM; killing it", flush=True)
                    child.proc.kill()
                    child.proc.wait()


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _check_ports_free(host: str, ports: dict[str, int]) -> None:
    for name, port in ports.items():
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                raise ServiceFailed(
                    f"port {port} for the {name} service is in use on {host}: is another localbase or "
                    "Firebase emulator running? Stop it, change the ports in firebase.json, or use --free-ports."
                ) from None


def _summary(settings: Settings, started: list[str], skipped: list[str], notes: list[str], embedded: bool) -> str:
    backend = "embedded localbase" if embedded else ("Firebase emulators" if settings.uses_emulators else "Firebase")
    lines = ["", "=" * 72, f"DermaLoop is running on {backend} (project {settings.project_id})."]
    if settings.database_emulator_host:
        lines.append(f"  Realtime Database  http://{settings.database_emulator_host}/?ns={settings.database_namespace}")
    if settings.storage_emulator_host:
        lines.append(f"  Storage            {settings.storage_emulator_host}  (bucket {settings.storage_bucket})")
    if settings.auth_emulator_host:
        lines.append(f"  Auth               http://{settings.auth_emulator_host}")
    for service in SERVICES:
        if service.name in started and service.url:
            lines.append(f"  {service.name:<18} {service.url(settings)}")
    lines += [f"  {note}" for note in notes]
    if skipped:
        lines.append(f"  Not built yet, so not started: {', '.join(skipped)}.")
    lines += [f"  {DISCLAIMER}", "Press Ctrl-C to stop everything.", "=" * 72, ""]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {"data_dir": args.data_dir}
    settings = load_settings(discover=False, **overrides)
    embedded = not (settings.uses_emulators or settings.credentials_file)
    options: dict[str, Any] = {"ham10000": args.ham10000 or os.environ.get("DERMALOOP_HAM10000"),
                               "synthetic": args.synthetic}
    if embedded:
        ports = emulator_ports()
        if args.free_ports:
            ports = {name: _free_port(settings.host) for name in ports}
        options["backend_ports"] = ports
    supervisor: Supervisor | None = None
    stop = threading.Event()

    def on_signal(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        supervisor = Supervisor(env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if embedded:
            other = read_running(running_file(settings.data_dir)).get("pid")
            if other:
                raise ServiceFailed(f"DermaLoop is already running from {settings.data_dir} (pid {other}); "
                                    "stop it first, or use another --data-dir")
            _check_ports_free(settings.host, options["backend_ports"])
            child = supervisor.start(BACKEND, BACKEND.argv(settings, options))
            real_ports = {m.group(1): int(m.group(3)) for m in child.matches}
            settings = settings.with_local_backend(settings.host, real_ports)
        supervisor.env.update(settings.emulator_env())
        if embedded:
            write_running(settings, os.getpid())  # other terminals' commands find this system
        notes: list[str] = []
        if not args.skip_prepare:
            for step in PREPARE:
                if stop.is_set():
                    break
                if step.embedded_only and not embedded:
                    continue
                if not step.available:
                    notes.append(f"{step.name}: not built yet, skipped")
                    continue
                print(f"[run] preparing {step.name} ...", flush=True)
                note = step(settings, options)
                if note:
                    notes.append(note)
        started, skipped = [], []
        for service in SERVICES:
            if stop.is_set():
                break
            if service.embedded_only and not embedded:
                continue
            if not service.available:
                skipped.append(service.name)
                continue
            supervisor.start(service, service.argv(settings, options))
            started.append(service.name)
        if not stop.is_set():
            print(_summary(settings, started, skipped, notes, embedded), flush=True)
        if args.exit_when_ready:
            return 0
        while not stop.wait(0.5):
            dead = supervisor.first_exited()
            if dead is not None:
                raise ServiceFailed(
                    f"{dead.service.name} stopped unexpectedly (exit code {dead.proc.returncode}); last output:\n  "
                    + "\n  ".join(dead.tail)
                )
        print("[run] stopping ...", flush=True)
        return 0
    except ServiceFailed as exc:
        print(f"[run] error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        clear_running(settings, os.getpid())
        if supervisor is not None:
            supervisor.stop_all()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print("[run] stopped", flush=True)
