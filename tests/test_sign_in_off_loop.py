"""Sign-in runs off Flet's event loop in both apps. Flet 1.0 runs a plain (not async) click handler
on the loop itself, so a sign-in waiting on the network there held up every other session of the
process, and its "Signing in..." never reached the browser before the answer. Real app code; the
page is a stand-in that records what the apps ask of it, and the Auth call is one that waits."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import flet as ft

import reviewer_portal.app as portal_module
from client.app import PatientApp
from client.device import Device
from dermaloop.errors import Unauthenticated
from dermaloop.settings import load_settings
from reviewer_portal.app import PortalApp


class Page(SimpleNamespace):
    """What the apps touch of a Flet page; ``threads`` holds what they asked to run off the loop."""

    def __init__(self) -> None:
        super().__init__(services=[], controls=[], title="", horizontal_alignment=None, padding=0,
                         on_disconnect=None, on_connect=None, threads=[], texts=[])

    def add(self, *controls) -> None:
        self.controls.extend(controls)

    def update(self) -> None:
        self.texts.append([c.value for c in walk(self.controls) if isinstance(c, ft.Text)])

    def run_thread(self, fn, *args) -> None:
        self.threads.append((fn, args))


def walk(controls):
    for c in controls:
        yield c
        yield from walk(getattr(c, "controls", None) or [])


def button(page: Page, text: str) -> ft.Control:
    return next(c for c in walk(page.controls) if isinstance(c, ft.FilledButton | ft.OutlinedButton)
                and c.content == text)


def fill(page: Page) -> None:
    email, password = [c for c in walk(page.controls) if isinstance(c, ft.TextField)][:2]
    email.value, password.value = "someone@example.org", "secret-pass"


def check_sign_in_is_handed_off_and_runs_once(page: Page, text: str, answer: threading.Event, calls: list,
                                              also: str | None = None) -> None:
    button(page, text).on_click(None)
    assert calls == [] and len(page.threads) == 1  # nothing waited on the loop: a thread was asked for
    fn, args = page.threads[0]
    first = threading.Thread(target=fn, args=args)
    first.start()
    for _ in range(200):
        if calls:
            break
        threading.Event().wait(0.05)
    assert calls == ["someone@example.org"]
    assert any("Signing in..." in texts for texts in page.texts)  # shown while the service is asked
    fn(*args)  # a second click while the first is on its way: returns at once, asks nothing
    if also:  # another button of the same form, clicked meanwhile: nothing either
        button(page, also).on_click(None)
        other, other_args = page.threads[-1]
        other(*other_args)
    assert calls == ["someone@example.org"]
    answer.set()
    first.join(10)
    assert not first.is_alive() and any("Wrong email or password." in texts for texts in page.texts)


def test_the_patient_apps_sign_in_runs_off_the_event_loop_and_once(tmp_path):
    page = Page()
    app = PatientApp(page, Device(load_settings(environ={}), tmp_path / "device"))
    answer, calls = threading.Event(), []

    def slow_sign_in(email: str, password: str):
        calls.append(email)
        answer.wait(10)
        raise Unauthenticated("INVALID_LOGIN_CREDENTIALS")

    app.auth = SimpleNamespace(sign_in=slow_sign_in, sign_up=slow_sign_in)
    app.sign_in_screen()
    fill(page)
    check_sign_in_is_handed_off_and_runs_once(page, "Sign in", answer, calls, also="Create account")


def test_the_portals_sign_in_runs_off_the_event_loop_and_once(monkeypatch):
    page = Page()
    app = PortalApp(page, load_settings(environ={}))
    answer, calls = threading.Event(), []

    def slow_sign_in(auth, email: str, password: str):
        calls.append(email)
        answer.wait(10)
        raise Unauthenticated("INVALID_LOGIN_CREDENTIALS")

    monkeypatch.setattr(portal_module, "sign_in", slow_sign_in)
    try:
        app.sign_in_screen()
        fill(page)
        check_sign_in_is_handed_off_and_runs_once(page, "Sign in", answer, calls)
    finally:
        app.close()
