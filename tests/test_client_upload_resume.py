"""Uploads that a new process finishes after the one that started them was killed (SIGKILL).

A child process uploads through ``UserStorage`` with a ``FileSessionStore`` and is killed; the test
process then calls ``upload`` with the same store and must send only what the server is missing.
Everything runs against a real localbase.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
import requests

from dermaloop import auth as dl_auth
from dermaloop.http import RetryPolicy
from dermaloop.settings import PROJECT_ROOT
from dermaloop.storage import FileSessionStore, UserStorage, admin_bucket

KB = 1024
CHUNK = 256 * KB
PASSWORD = "secret123"
FAST = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05)

CHILD = r"""
import sys, time
from dermaloop.auth import AuthClient
from dermaloop.settings import load_settings
from dermaloop.storage import FileSessionStore, UserStorage

email, password, path, payload, store, stop_after, chunk = sys.argv[1:8]
settings = load_settings()
session = AuthClient(settings).sign_in(email, password)

def progress(sent, total):
    print(f"progress {sent} {total}", flush=True)
    if int(stop_after) and sent >= int(stop_after):
        print("waiting to be killed", flush=True)
        time.sleep(600)

data = open(payload, "rb").read()
UserStorage(session, settings).upload(path, data, "image/jpeg", chunk_bytes=int(chunk),
                                      session_store=FileSessionStore(store), on_progress=progress)
print("done", flush=True)
"""


class Recording(requests.Session):
    """A real session that notes every resumable command it sends (offset and bytes)."""

    def __init__(self) -> None:
        super().__init__()
        self.commands: list[tuple[str, int | None, int]] = []

    def request(self, method, url, *args, **kwargs):
        headers = kwargs.get("headers") or {}
        command = headers.get("X-Goog-Upload-Command")
        if command:
            offset = headers.get("X-Goog-Upload-Offset")
            self.commands.append((command, None if offset is None else int(offset), len(kwargs.get("data") or b"")))
        return super().request(method, url, *args, **kwargs)

    def uploaded_bytes(self) -> int:
        return sum(size for command, _, size in self.commands if command.startswith("upload"))


@pytest.fixture(scope="module")
def settings(localbase):
    return localbase.settings()


@pytest.fixture(scope="module")
def patient(settings):
    email = f"resume-{uuid.uuid4().hex[:8]}@example.com"
    user, _ = dl_auth.create_user(email, PASSWORD, "patient", settings=settings)
    return user.uid, email, dl_auth.AuthClient(settings).sign_in(email, PASSWORD)


def child_env(settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FIREBASE_", "STORAGE_EMULATOR", "GOOGLE_"))}
    env.update(settings.emulator_env(), PYTHONUNBUFFERED="1")
    return env


def start_child(settings, email: str, path: str, payload: Path, store: Path, stop_after: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, email, PASSWORD, path, str(payload), str(store), str(stop_after), str(CHUNK)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env(settings), cwd=PROJECT_ROOT)


def photo(tmp_path: Path, size: int) -> tuple[bytes, Path]:
    data = b"\xff\xd8\xff\xe0" + os.urandom(size - 4)
    payload = tmp_path / "photo.jpg"
    payload.write_bytes(data)
    return data, payload


def check_stored(settings, meta: dict, path: str, data: bytes) -> None:
    assert int(meta["size"]) == len(data)
    assert meta["md5Hash"] == base64.b64encode(hashlib.md5(data).digest()).decode()
    stored = admin_bucket(settings).blob(path).download_as_bytes()
    assert hashlib.sha256(stored).hexdigest() == hashlib.sha256(data).hexdigest()


def test_a_new_process_finishes_an_upload_from_where_the_dead_one_stopped(settings, patient, tmp_path):
    uid, email, session = patient
    data, payload = photo(tmp_path, 3 * 1024 * KB + 12345)  # 13 chunks, the last one short
    path = f"cases/{uid}/{uuid.uuid4().hex[:8]}/image.jpg"
    store = tmp_path / "upload-session.json"
    child = start_child(settings, email, path, payload, store, stop_after=2 * CHUNK)
    lines = []
    for line in child.stdout:
        lines.append(line)
        if line.startswith("waiting"):
            break
    child.send_signal(signal.SIGKILL)
    child.wait(30)
    assert child.returncode == -signal.SIGKILL, "".join(lines)
    assert "progress 524288" in "".join(lines) and "done" not in "".join(lines)
    saved_url = json.loads(store.read_text())["url"]
    assert "upload_id=" in saved_url

    http = Recording()
    progress: list[tuple[int, int]] = []
    meta = UserStorage(session, settings, http=http, retry=FAST).upload(
        path, data, "image/jpeg", chunk_bytes=CHUNK, session_store=FileSessionStore(store), on_progress=lambda sent, total: progress.append((sent, total)))
    check_stored(settings, meta, path, data)
    # the server was asked what it had, and only the rest was sent
    assert progress[0] == (2 * CHUNK, len(data)) and progress[-1] == (len(data), len(data))
    assert http.commands[0] == ("query", None, 0)
    uploads = http.commands[1:]
    assert uploads[0][1] == 2 * CHUNK and len(uploads) == 11 and uploads[-1][0] == "upload, finalize"
    assert http.uploaded_bytes() == len(data) - 2 * CHUNK
    assert not store.exists()  # done: the session is forgotten


@pytest.mark.parametrize("chunks_done", [1, 4, 9])
def test_an_upload_killed_at_any_moment_finishes_intact(settings, patient, tmp_path, chunks_done):
    """Killed while it keeps sending (maybe mid-chunk): the next process sends exactly the rest."""
    uid, email, session = patient
    data, payload = photo(tmp_path, 4 * 1024 * KB + 777)
    path = f"cases/{uid}/{uuid.uuid4().hex[:8]}/image.jpg"
    store = tmp_path / "upload-session.json"
    child = start_child(settings, email, path, payload, store, stop_after=0)
    seen = 0
    for line in child.stdout:
        seen += line.startswith("progress")
        if seen > chunks_done:  # the first line is the start (0 bytes)
            break
    child.send_signal(signal.SIGKILL)
    output = child.communicate(timeout=30)[0]
    assert seen > chunks_done, output

    http = Recording()
    progress: list[tuple[int, int]] = []
    meta = UserStorage(session, settings, http=http, retry=FAST).upload(
        path, data, "image/jpeg", chunk_bytes=CHUNK, session_store=FileSessionStore(store),
        on_progress=lambda sent, total: progress.append((sent, total)))
    check_stored(settings, meta, path, data)
    resumed_at = progress[0][0]
    assert resumed_at >= chunks_done * CHUNK
    assert http.uploaded_bytes() == len(data) - resumed_at  # nothing the server had was sent again
    if resumed_at < len(data):
        assert http.commands[0][0] == "query" and "start" not in [c[0] for c in http.commands]


def test_an_unknown_or_foreign_session_starts_afresh(settings, patient, tmp_path):
    uid, _, session = patient
    files = UserStorage(session, settings, http=Recording(), retry=FAST)
    data = b"\xff\xd8\xff\xe0" + os.urandom(100 * KB)
    path = f"cases/{uid}/{uuid.uuid4().hex[:8]}/image.jpg"
    store = FileSessionStore(tmp_path / "s.json")
    store.save(f"{files.base}?name={path}&upload_id={uuid.uuid4()}&upload_protocol=resumable")  # expired / unknown
    meta = files.upload(path, data, "image/jpeg", chunk_bytes=CHUNK, session_store=store)
    check_stored(settings, meta, path, data)
    assert [c[0] for c in files.http.commands] == ["query", "start", "upload, finalize"]

    other = f"cases/{uid}/{uuid.uuid4().hex[:8]}/image.jpg"
    store.save(f"{files.base}?name={other}&upload_id={uuid.uuid4()}&upload_protocol=resumable")  # another file's
    files.http.commands.clear()
    check_stored(settings, files.upload(path, data, "image/jpeg", session_store=store), path, data)
    assert [c[0] for c in files.http.commands] == ["start", "upload, finalize"]  # not even asked about
    assert store.load() is None


def test_a_session_the_dead_process_had_finished_is_not_sent_again(settings, patient, tmp_path):
    uid, _, session = patient
    data = b"\xff\xd8\xff\xe0" + os.urandom(300 * KB)
    path = f"cases/{uid}/{uuid.uuid4().hex[:8]}/image.jpg"
    files = UserStorage(session, settings, retry=FAST)

    class Forgetful(FileSessionStore):
        def clear(self) -> None:  # the process died before it could forget the session
            pass

    store = Forgetful(tmp_path / "s.json")
    files.upload(path, data, "image/jpeg", chunk_bytes=CHUNK, session_store=store)
    assert store.load()
    again = UserStorage(session, settings, http=Recording(), retry=FAST)
    meta = again.upload(path, data, "image/jpeg", chunk_bytes=CHUNK, session_store=FileSessionStore(store.path))
    check_stored(settings, meta, path, data)
    assert [c[0] for c in again.http.commands] == ["query"]


def test_an_upload_rides_out_a_server_restart(tmp_path):
    """The backend is killed (SIGKILL) mid-upload and comes back: the same call finishes the upload
    from what the server had kept on disk."""
    from tests.localbase_process import LocalbaseProcess

    server = LocalbaseProcess(data_dir=tmp_path / "localbase").start()
    try:
        settings = server.settings()
        email = f"outage-{uuid.uuid4().hex[:8]}@example.com"
        user, _ = dl_auth.create_user(email, PASSWORD, "patient", settings=settings)
        session = dl_auth.AuthClient(settings).sign_in(email, PASSWORD)
        data, _ = photo(tmp_path, 2 * 1024 * KB + 99)
        path = f"cases/{user.uid}/{uuid.uuid4().hex[:8]}/image.jpg"
        restarts = []

        def progress(sent: int, total: int) -> None:
            if sent >= 3 * CHUNK and not restarts:
                server.kill9()
                restarts.append(threading.Timer(1.0, server.restart))
                restarts[0].start()

        http = Recording()
        patient = UserStorage(session, settings, http=http, retry=RetryPolicy(attempts=40, base_delay=0.1, max_delay=0.3))
        meta = patient.upload(path, data, "image/jpeg", chunk_bytes=CHUNK, on_progress=progress)
        restarts[0].join()
        check_stored(settings, meta, path, data)
        commands = [c[0] for c in http.commands]
        assert commands.count("start") == 1 and "query" in commands  # resumed, not restarted
        first_query = commands.index("query")
        resumed = next(c for c in http.commands[first_query:] if c[0] != "query")
        assert resumed[1] == 3 * CHUNK  # nothing the server had was sent again
    finally:
        server.stop()
