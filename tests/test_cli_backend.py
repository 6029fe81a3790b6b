"""Commands in a second terminal find the system that `dermaloop run` started, and when no backend
can be reached every command says so in one line (service, address, what to do), never a traceback."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

from PIL import Image

from dermaloop.settings import PROJECT_ROOT, load_settings, running_file, write_running

FIREBASE_VARS = ("FIREBASE_", "STORAGE_EMULATOR", "GOOGLE_APPLICATION", "GOOGLE_CLOUD_PROJECT", "GCLOUD_PROJECT",
                 "DERMALOOP_")


def _shell_env() -> dict[str, str]:
    """A new terminal: no Firebase or DermaLoop variables at all."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(FIREBASE_VARS)}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _dermaloop(cwd, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dermaloop", *args], capture_output=True, text=True,
                          cwd=cwd, env={**_shell_env(), "PYTHONPATH": str(PROJECT_ROOT)})


def _photo(path) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (320, 240), (190, 140, 120)).save(buf, format="JPEG")
    path.write_bytes(buf.getvalue())
    return str(path)


def test_a_second_terminal_uses_the_running_system_and_a_clear_line_once_it_stopped(tmp_path):
    run = subprocess.Popen(
        [sys.executable, "-m", "dermaloop", "run", "--free-ports", "--skip-prepare", "--data-dir", "var"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**_shell_env(), "PYTHONPATH": str(PROJECT_ROOT)})
    seen = []
    try:
        for line in run.stdout:
            seen.append(line)
            if "Press Ctrl-C" in line:
                break
        assert run.poll() is None, "".join(seen)
        record = json.loads(running_file(tmp_path / "var").read_text())
        assert record["pid"] == run.pid and record["databaseEmulatorHost"].startswith("127.0.0.1:")

        added = _dermaloop(tmp_path, "users", "add", "--email", "p2@dermaloop.test", "--password", "secret-12",
                           "--role", "patient")
        assert added.returncode == 0, added.stderr
        sent = _dermaloop(tmp_path, "submit", "--email", "p2@dermaloop.test", "--password", "secret-12", "--json",
                          _photo(tmp_path / "spot.jpg"))
        assert sent.returncode == 0, sent.stderr
        assert json.loads(sent.stdout.strip())["status"] == "queued"

        # A second run from the same data directory is refused before it touches anything.
        again = _dermaloop(tmp_path, "run", "--free-ports", "--skip-prepare", "--data-dir", "var")
        assert again.returncode == 1 and f"already running from var (pid {run.pid})" in again.stderr
    finally:
        run.terminate()
        run.communicate(timeout=120)
    assert not running_file(tmp_path / "var").exists()  # removed on the way out

    for args in (("users", "list"),
                 ("submit", "--email", "p2@dermaloop.test", "--password", "secret-12", str(tmp_path / "spot.jpg"))):
        gone = _dermaloop(tmp_path, *args)
        assert gone.returncode == 2, gone.stderr
        assert "Traceback" not in gone.stderr and len(gone.stderr.strip().splitlines()) == 1, gone.stderr
    assert "no local DermaLoop is running" in _dermaloop(tmp_path, "users", "list").stderr


def test_an_unreachable_emulator_is_named_with_its_address(tmp_path):
    env_port = "127.0.0.1:9"  # discard port: nothing listens there
    done = subprocess.run([sys.executable, "-m", "dermaloop", "users", "list"], capture_output=True, text=True,
                          cwd=tmp_path, env={**_shell_env(), "PYTHONPATH": str(PROJECT_ROOT),
                                             "FIREBASE_AUTH_EMULATOR_HOST": env_port})
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "dermaloop users: cannot reach Firebase Auth at http://127.0.0.1:9 (connection failed): start the local "
        "system with 'dermaloop run' (in this folder, or set DERMALOOP_DATA_DIR)")


def test_discovery_needs_a_live_process_and_yields_to_chosen_settings(tmp_path):
    data = tmp_path / "var"
    data.mkdir()
    live = load_settings(environ={}, data_dir=str(data)).with_local_backend("127.0.0.1", {
        "database": 9500, "storage": 9501, "auth": 9502})
    write_running(live, os.getpid())
    found = load_settings(environ={"DERMALOOP_DATA_DIR": str(data)}, discover=True)
    assert found.database_emulator_host == "127.0.0.1:9500" and found.storage_emulator_host == "http://127.0.0.1:9501"
    chosen = load_settings(environ={"DERMALOOP_DATA_DIR": str(data), "FIREBASE_DATABASE_URL": "https://x.firebaseio.com"},
                           discover=True)
    assert not chosen.uses_emulators  # a backend the user named wins over the running one
    assert not load_settings(environ={"DERMALOOP_DATA_DIR": str(data)}).uses_emulators  # explicit environ: no discovery

    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()  # exited and reaped: its pid names no process
    write_running(live, finished.pid)
    stale = load_settings(environ={"DERMALOOP_DATA_DIR": str(data)}, discover=True)
    assert not stale.uses_emulators  # the process that wrote it is gone
