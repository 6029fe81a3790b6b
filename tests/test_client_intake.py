"""How a picked photo reaches the patient app's process (``client.intake``): the choice of transfer,
the private folder uploads land in, and which upload gets answered when picks overlap."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from client.intake import FOLDER, TRANSFER_ENV, UPLOAD, WEBSOCKET, Incoming, prepare_folder, transfer_mode
from dermaloop.preprocess import MAX_BYTES
from dermaloop.settings import PROJECT_ROOT


def test_the_upload_is_the_default_and_an_unknown_transfer_is_refused():
    assert transfer_mode({}) == UPLOAD
    assert transfer_mode({TRANSFER_ENV: " WebSocket "}) == WEBSOCKET
    with pytest.raises(ValueError, match=f"{TRANSFER_ENV} must be one of upload, websocket, not 'ftp'"):
        transfer_mode({TRANSFER_ENV: "ftp"})


def test_the_app_does_not_start_with_an_unknown_transfer(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DERMALOOP_")}
    env[TRANSFER_ENV] = "carrier-pigeon"
    done = subprocess.run([sys.executable, "-m", "dermaloop", "client", "--data-dir", str(tmp_path / "device")],
                          capture_output=True, text=True, env=env, cwd=PROJECT_ROOT, timeout=300)
    assert done.returncode == 2
    assert f"dermaloop client: {TRANSFER_ENV} must be one of upload, websocket" in done.stderr
    assert not (tmp_path / "device").exists()  # refused before anything was made


def test_the_folder_is_private_emptied_of_leftovers_and_given_to_flet(tmp_path):
    folder = tmp_path / "device" / FOLDER
    folder.mkdir(parents=True)
    (folder / "0123.part").write_bytes(b"half a photo with GPS in its EXIF")
    env: dict[str, str] = {}
    assert prepare_folder(tmp_path / "device", env) == folder
    assert list(folder.iterdir()) == []
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert env["FLET_UPLOAD_DIR"] == str(folder.resolve())
    assert env["FLET_MAX_UPLOAD_SIZE"] == str(MAX_BYTES)
    assert len(env["FLET_SECRET_KEY"]) >= 32
    kept = {"FLET_SECRET_KEY": "the operator's own key"}
    prepare_folder(tmp_path / "device", kept)
    assert kept["FLET_SECRET_KEY"] == "the operator's own key"


def test_an_upload_is_read_once_and_deleted(tmp_path):
    incoming = Incoming(tmp_path)
    target = incoming.expect("spot.jpg")
    (tmp_path / target).write_bytes(b"photo bytes")
    assert incoming.arrived("spot.jpg") == b"photo bytes"
    assert list(tmp_path.iterdir()) == []
    assert incoming.arrived("spot.jpg") is None  # a second report of the same upload answers nothing


def test_only_the_latest_pick_is_answered(tmp_path):
    incoming = Incoming(tmp_path)
    first = incoming.expect("spot.jpg")
    second = incoming.expect("spot.jpg")  # picked again before the first had arrived
    other = incoming.expect("mole.jpg")
    for target in (first, second, other):
        (tmp_path / target).write_bytes(target.encode())
    assert incoming.arrived("spot.jpg") is None  # the first pick: replaced since
    assert incoming.arrived("spot.jpg") is None  # the second: replaced by mole.jpg
    assert incoming.arrived("mole.jpg") == other.encode()
    assert list(tmp_path.iterdir()) == []


def test_a_failed_upload_is_forgotten_and_its_part_deleted(tmp_path):
    incoming = Incoming(tmp_path)
    older = incoming.expect("a.jpg")
    latest = incoming.expect("b.jpg")
    (tmp_path / older).write_bytes(b"part")
    (tmp_path / latest).write_bytes(b"part")
    assert incoming.failed("a.jpg") is False  # nobody waits for it any more
    assert incoming.failed("b.jpg") is True  # the patient waits for this one: tell them
    assert incoming.failed("c.jpg") is False  # never picked
    assert list(tmp_path.iterdir()) == []


def test_a_session_that_ends_leaves_nothing_behind(tmp_path):
    incoming = Incoming(tmp_path)
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / incoming.expect(name)).write_bytes(b"part")
    incoming.clear()
    assert list(tmp_path.iterdir()) == []
    assert incoming.arrived("a.jpg") is None
