"""The patient app's live redraws (``client.app.PatientApp.on_sync_change``) against a screen being
drawn at the same moment: a change that arrives while the case screen is still being built must not
be lost (it was: the screen kept the status it had read, "waiting to upload", while the cloud result
sat on the server). Real store and app code; only the page is a stand-in that records what it was
asked to show."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import flet as ft

import client.app as app_module
from client import wording
from client.app import PatientApp
from client.device import Device
from dermaloop.cases import Status
from dermaloop.settings import load_settings
from tests.worker_support import lesion_jpeg, wait_until


class RecordingPage(SimpleNamespace):
    """What PatientApp touches of a Flet page; ``shown`` keeps the texts of each update."""

    def __init__(self) -> None:
        super().__init__(services=[], controls=[], title="", horizontal_alignment=None, padding=0,
                         on_disconnect=None, on_connect=None, shown=[])

    def update(self) -> None:
        texts = [c.value for c in self.controls[0].controls if isinstance(c, ft.Text)] if self.controls else []
        self.shown.append(texts)


class QuietSync(SimpleNamespace):
    """The sync engine as the screens read it: online, no chat."""

    def __init__(self) -> None:
        super().__init__(online=True, state="idle")

    def unread(self, case_id: str) -> int:
        return 0

    def messages(self, case_id: str) -> list:
        return []

    def stop(self) -> None:  # the app signs out
        pass



def signed_in_app_with_a_case(tmp_path):
    """A patient's app on its own device store, signed in, sync quiet, one case stored."""
    device = Device(load_settings(environ={}), tmp_path / "device")
    page = RecordingPage()
    app = PatientApp(page, device)
    app.session = SimpleNamespace(uid="patient-1")
    app.sync = QuietSync()
    return device, page, app, device.store.add_case("patient-1", lesion_jpeg(1))

def test_a_change_that_arrives_while_the_case_screen_is_built_is_drawn(tmp_path, monkeypatch):
    device, page, app, case = signed_in_app_with_a_case(tmp_path)
    building, go_on = threading.Event(), threading.Event()
    real_preview = app_module.preview_png_from_file

    def slow_preview(path, box):  # the opening screen is half built when the change comes
        if threading.current_thread() is opener:
            building.set()
            go_on.wait(60)
        return real_preview(path, box)

    monkeypatch.setattr(app_module, "preview_png_from_file", slow_preview)
    opener = threading.Thread(target=app.case, args=(case.case_id,))
    opener.start()
    assert building.wait(60)
    device.store.set_status("patient-1", case.case_id, Status.QUEUED)  # the sync engine uploaded it
    app.on_sync_change(case.case_id)  # as the engine calls it: returns at once, a redraw thread draws
    for thread in threading.enumerate():
        if thread.name == "redraw":
            thread.join(1.0)  # the fixed app's redraw waits for the screen (this join returns unfinished)
    go_on.set()
    opener.join(60)
    queued = wording.state_text(Status.QUEUED)
    wait_until(lambda: page.shown and queued in page.shown[-1], "the case screen drawn again, up to date")
    assert app.showing == ("case", case.case_id)


def test_a_burst_of_changes_is_drawn_once_off_the_engine_thread(tmp_path, monkeypatch):
    device, page, app, case = signed_in_app_with_a_case(tmp_path)
    app.case(case.case_id)
    drawn = len(page.shown)
    held = threading.Event()
    real_state = app._state

    def held_state(status, failure):  # the first redraw is slow: the rest of the burst arrives meanwhile
        held.wait(60)
        return real_state(status, failure)

    monkeypatch.setattr(app, "_state", held_state)
    engine = threading.current_thread()
    for _ in range(5):  # say, the chunks of an upload: each call returns without drawing
        app.on_sync_change(case.case_id)
    assert len(page.shown) == drawn and threading.current_thread() is engine
    held.set()
    wait_until(lambda: not any(t.name == "redraw" for t in threading.enumerate()), "the redraws")
    assert 1 <= len(page.shown) - drawn <= 2  # the first change, then the rest of the burst at most once


def _message_box(page) -> ft.TextField:
    boxes = [c for c in page.controls[0].controls if isinstance(c, ft.TextField) and c.label == "Message"]
    assert len(boxes) == 1, "the case screen shows one message box"
    return boxes[0]


def test_a_live_redraw_keeps_the_message_box_the_patient_is_typing_in(tmp_path):
    device, page, app, case = signed_in_app_with_a_case(tmp_path)
    device.store.set_status("patient-1", case.case_id, Status.QUEUED)  # uploaded: the chat is open
    app.case(case.case_id)
    box = _message_box(page)
    box.value = "It has grown a li"  # what the browser reports as the patient types
    box.on_change(None)
    app.on_sync_change(case.case_id)  # the dermatologist answers meanwhile
    wait_until(lambda: not any(t.name == "redraw" for t in threading.enumerate()), "the redraw")
    again = _message_box(page)
    # The same control, not a new one holding a copy of the text: a new box loses the browser's focus
    # and whatever was typed between the last change event and the redraw.
    assert again is box and again.value == "It has grown a li"
    app.sync.send_message = lambda case_id, text: None
    sent = threading.Event()
    app.page.run_thread = lambda fn, *args: (fn(*args), sent.set())
    [button] = [c for c in page.controls[0].controls if isinstance(c, ft.FilledButton) and
                c.content == "Send message"]
    button.on_click(None)
    assert sent.is_set() and _message_box(page).value == "" and app.chat_drafts.get(case.case_id) is None


def test_a_redraw_puts_the_same_photo_back_without_decoding_it_again(tmp_path, monkeypatch):
    device, page, app, case = signed_in_app_with_a_case(tmp_path)
    decoded = []
    real_preview = app_module.preview_png_from_file
    monkeypatch.setattr(app_module, "preview_png_from_file", lambda path, box: decoded.append(path) or
                        real_preview(path, box))

    def photo() -> ft.Image:
        [image] = [c for c in page.controls[0].controls if isinstance(c, ft.Image)]
        return image

    app.case(case.case_id)
    first = photo()
    assert first.semantics_label == "Case photo" and first.src and len(decoded) == 1
    app.on_sync_change(case.case_id)
    wait_until(lambda: len(page.shown) >= 2 and not any(t.name == "redraw" for t in threading.enumerate()),
               "the redraw")
    # The same control, so the browser keeps the picture it shows (a new one blanked it until decoded).
    assert photo() is first and len(decoded) == 1
    app.close()  # signed out: no photo is kept in the process
    app.case(case.case_id)
    assert photo() is not first and len(decoded) == 2
