"""`dermaloop run` starts the system on the embedded backend and Ctrl-C stops every process."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys

import pytest

from dermaloop.run import ServiceFailed, _check_ports_free


def _start(tmp_path, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FIREBASE_", "STORAGE_EMULATOR", "GOOGLE_APPLICATION"))}
    env["PYTHONUNBUFFERED"] = "1"
    return subprocess.Popen(
        [sys.executable, "-m", "dermaloop", "run", "--free-ports", "--skip-prepare", "--data-dir", str(tmp_path), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )


def _read_until(proc: subprocess.Popen, marker: str) -> str:
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError("run ended before " + repr(marker) + ":\n" + "".join(seen))


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_run_prints_backend_addresses_and_disclaimer(tmp_path):
    proc = _start(tmp_path, "--exit-when-ready")
    out, _ = proc.communicate()
    assert proc.returncode == 0, out
    assert "DermaLoop is running on embedded localbase" in out
    assert re.search(r"Realtime Database\s+http://127\.0\.0\.1:\d+/\?ns=", out)
    assert "not a diagnosis" in out
    assert (tmp_path / "localbase").is_dir()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_signal_stops_every_child_cleanly(tmp_path, sig):
    proc = _start(tmp_path)
    out = _read_until(proc, "Press Ctrl-C")
    port = int(re.search(r"localbase database listening on http://127\.0\.0\.1:(\d+)", out).group(1))
    assert _accepts(port)
    proc.send_signal(sig)
    rest, _ = proc.communicate()
    assert proc.returncode == 0, out + rest
    assert "localbase stopped" in rest  # the backend shut down on its own SIGTERM path
    assert "[run] stopped" in rest
    assert not _accepts(port)  # run waits for its children, so the port is closed by now


def test_busy_port_gives_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ServiceFailed, match=f"port {port} for the database service is in use"):
            _check_ports_free("127.0.0.1", {"database": port})
