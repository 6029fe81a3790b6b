"""``dermaloop client``: the patient app (Flet, served as a local web app with Flet's bundled client).

The Python process is the patient's device: the photo is checked and answered by the on-device
TFLite model before anything leaves it, every case is stored locally first, and the sync engine
uploads when the backend is reachable. Each browser session is its own signed-in patient: all
per-user state lives in one ``PatientApp`` per page, never in module globals.

Screens: sign in / create account -> consent (first photo only) -> cases (newest first) ->
new case (photo, instant answer, questions, send) and case (device answer, cloud result, heatmap,
dermatologist's review, chat). Every control carries a label that screen readers and the browser
tests find it by.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import io
import logging
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flet as ft

from client import wording
from client.device import PREVIEW_SIDE, Device, preview_png, thumbnail_png
from client.intake import UPLOAD, URL_SECONDS, Incoming, prepare_folder, transfer_mode
from client.photos import KeptCopy, PhotoError, check_size, decode, holds_every_pixel
from client.remember import PREFERENCE, SESSION_ENDED, RememberedSessions
from dermaloop import cases
from dermaloop.auth import AuthClient, UserSession
from dermaloop.errors import Conflict, InvalidArgument, ServiceError, Unauthenticated, Unavailable
from dermaloop.settings import load_settings
from dermaloop.web_app import off_loop, serve

log = logging.getLogger("client")

BODY_SITES = ("face", "scalp", "neck", "chest", "abdomen", "back", "upper arm", "forearm", "hand", "thigh",
              "lower leg", "foot", "genital area", "other")
SINCE = ("less than a month", "1 to 3 months", "3 to 12 months", "more than a year", "don't know")
CHANGES = (("size", "It changed in size"), ("shape", "It changed in shape"), ("colour", "It changed in colour"),
           ("itch", "It itches"), ("bleed", "It bleeds"))
PAD = 16
PAINT_PAUSE_S = 0.05  # see pick_photo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None, help="interface to serve on (default: $DERMALOOP_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default: $DERMALOOP_CLIENT_PORT or 8550)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="the device's local store (default: <data dir>/client)")


def _when(ms: Any) -> str:
    if not isinstance(ms, int | float):
        return ""
    return dt.datetime.fromtimestamp(ms / 1000).strftime("%d %b %Y, %H:%M")


def _heading(text: str) -> ft.Text:
    return ft.Text(text, size=20, weight=ft.FontWeight.BOLD)


def _top_rows(top: list[dict[str, Any]]) -> list[ft.Control]:
    """The classes in order of probability (numbers that agree with the percentages), and a line
    saying why when the model's call is a less probable class (its melanoma offset)."""
    rows: list[ft.Control] = [
        ft.Text(f"{i + 1}. {t.get('name') or t.get('label')}: {wording.percent(float(t.get('p') or 0))}")
        for i, t in enumerate(wording.by_probability(top))]
    note = wording.call_note(top)
    if note:
        rows.append(ft.Text(note, italic=True))
    return rows


def _labelled(control: ft.Control, label: str) -> ft.Control:
    """Flet's Dropdown exposes no name to screen readers; a Semantics wrapper gives it its label."""
    return ft.Semantics(content=control, label=label, button=True)


PICTURES_KEPT = 64  # photo controls a session keeps for redraws (previews are about 100 kB each)


def _picture(png: bytes, width: int, label: str) -> ft.Control:
    """An image from bytes needs both sides set to be laid out inside a scrolling page."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as img:
        w, h = img.size
    return ft.Image(src=png, width=width, height=round(width * h / max(w, 1)), fit=ft.BoxFit.CONTAIN,
                    semantics_label=label)


def _risk_box(result: dict[str, Any], name: Callable[[str], str]) -> ft.Control:
    """The risk advice of one model's answer, and under it (never instead) the unsure line of the
    card's abstain rule when the model could not tell classes apart."""
    risk, demonstration = result.get("risk"), bool(result.get("demonstration"))
    title, advice = wording.risk_advice(risk, demonstration)
    colour = {"high": ft.Colors.RED_100, "moderate": ft.Colors.AMBER_100, "low": ft.Colors.GREEN_100}.get(
        risk or "", ft.Colors.GREY_200)
    lines: list[ft.Control] = [ft.Text(title, weight=ft.FontWeight.BOLD), ft.Text(advice)]
    unsure = wording.unsure_line(result, name)
    if unsure:
        lines.append(ft.Text(unsure, weight=ft.FontWeight.W_500))
    return ft.Container(ft.Column(lines, spacing=4), bgcolor=colour, padding=12, border_radius=8)


def _namer(result: dict[str, Any]) -> Callable[[str], str]:
    """Class id to name: the answer's own top list first (its model's taxonomy), else the taxonomy's."""
    known = {str(t.get("label")): str(t.get("name") or t.get("label")) for t in result.get("top") or []
             if isinstance(t, dict)}
    return lambda label: known.get(label) or PatientApp._label_name(label)


class PatientApp:
    """One browser session: one signed-in patient, their sync engine and the screen they look at.

    ``incoming``: the folder the browser uploads picked photos to (``client.intake``); None hands
    them over inside the picker's answer instead (the phone app, or the websocket transfer)."""

    def __init__(self, page: ft.Page, device: Device, incoming: Path | None = None) -> None:
        self.page = page
        self.device = device
        self.settings = device.settings
        self.auth = AuthClient(self.settings)
        self.remembered = RememberedSessions(device.store, self.auth)
        self.session: UserSession | None = None
        self.key: str | None = None  # this browser's sign-in key (client.remember)
        self.sync = None
        self.showing: tuple[str, str | None] = ("signin", None)
        self.draft: dict[str, Any] = {}
        self.chat_drafts: dict[str, str] = {}
        # One message box per case for the session: a live redraw puts the same control back, so the
        # browser keeps its focus and the keys in flight (a new box lost both mid-word).
        self.chat_boxes: dict[str, ft.TextField] = {}
        # The photos on screen, kept as controls: a redraw puts the same image back instead of
        # decoding the stored photo again and sending it anew (the browser blanked it meanwhile).
        self._pictures: OrderedDict[tuple, ft.Control | None] = OrderedDict()
        self._lock = threading.RLock()
        self._changes = threading.Lock()  # what the sync engine changed since the last redraw
        self._changed: set[str | None] = set()
        self._redraw_due = False
        self.incoming = Incoming(incoming) if incoming is not None else None
        self.picker = ft.FilePicker(on_upload=self._uploaded)
        self.prefs = ft.SharedPreferences()  # the browser's half of "stay signed in"
        page.services.extend([self.picker, self.prefs])
        page.title = "DermaLoop"
        page.horizontal_alignment = ft.CrossAxisAlignment.STRETCH  # the screen's column spans the page
        page.padding = PAD
        self._body: ft.Column | None = None  # the screen shown, scrolling on its own (see show)
        self._life = threading.RLock()  # sync engine start/stop (never held while drawing)
        # Flet calls these on its event loop: stopping an engine waits for its thread, so not there
        # (and a disconnected page has no executor of its own).
        page.on_disconnect = lambda e: threading.Thread(target=self.close, daemon=True).start()
        page.on_connect = lambda e: page.run_thread(self.reconnected)

    async def open(self) -> None:
        """The first screen: this browser's saved session if it has one (no network needed, so
        the app opens offline), else the sign-in screen. A restored session is then checked with
        Auth in the background: a refused refresh token goes back to the sign-in screen."""
        self.page.update()  # the services must reach the browser before they are asked
        try:
            key = await asyncio.wait_for(self.prefs.get(PREFERENCE), timeout=30)
        except Exception:  # an old browser, a closed page: then the patient signs in
            log.warning("the browser's saved sign-in key could not be read", exc_info=True)
            key = None
        self.page.run_thread(self._opened, key if isinstance(key, str) else None)

    def _opened(self, key: str | None) -> None:
        session = self.remembered.restore(key)
        if session is None:
            self.sign_in_screen()
            return
        self.key = key
        self.signed_in(session)
        self._check_restored(key, session)

    def _set_preference(self, key: str | None) -> None:
        """Keep (or, with None, drop) the key in the browser; not waited for: the store's half is
        what counts, and it is already written or forgotten."""
        try:
            if key is None:
                self.page.run_task(self.prefs.remove, PREFERENCE)
            else:
                self.page.run_task(self.prefs.set, PREFERENCE, key)
        except Exception:
            log.warning("the browser's sign-in key could not be updated", exc_info=True)

    def _check_restored(self, key: str, session: UserSession) -> None:
        if self.remembered.check(key, session).ended and self.session is session:
            self.session_ended()

    def session_ended(self, message: str = SESSION_ENDED) -> None:
        """The refresh token was refused (revoked, password changed, account gone): forget it on
        both halves and ask for the password, saying why."""
        self.close()
        self.remembered.forget(self.key)
        self._set_preference(None)
        self.key = None
        self.session = None
        self.sign_in_screen(message, problem=True)

    def reconnected(self) -> None:
        """The same page session came back (Flet reconnects a reloaded or woken tab): the sync
        engine the disconnect stopped runs again."""
        with self._life:
            if self.session is not None and self.sync is None:
                self._start_sync(self.session)

    # ---- plumbing -------------------------------------------------------------------------
    def show(self, *controls: ft.Control, screen: str, case_id: str | None = None) -> None:
        """A redraw of the screen shown keeps the patient's place in it; another screen starts at
        its top, in a scroll view of its own. (One scroll view for all opened the case half-way
        down after 'Save and send' at the foot of a long answer, and left Flutter's web
        accessibility tree shifted when a scrolled screen gave way to one that does not scroll.)"""
        with self._lock:
            if self._body is None or self.showing != (screen, case_id):
                self._body = ft.Column(scroll=ft.ScrollMode.AUTO, expand=True)
                self.page.controls.clear()
                self.page.controls.append(self._body)
            self.showing = (screen, case_id)
            self._body.controls = list(controls)
            self.page.update()

    def notify(self, text: str) -> None:
        self.page.show_dialog(ft.SnackBar(ft.Text(text)))

    def close(self) -> None:
        if self.incoming is not None:
            self.incoming.clear()
        with self._lock:
            self._pictures.clear()  # signed out or erased: no photo stays in this process's memory
        with self._life:
            if self.sync is not None:
                self.sync.stop()
                self.sync = None

    def on_sync_change(self, case_id: str | None) -> None:
        """Called by the sync engine's threads: note what changed and leave the redraw to a thread of
        its own. The engine goes on at once (it used to draw each change itself, a case screen per
        uploaded chunk, which held the upload up by 0.7 s on 2 busy cores), and a burst of
        changes is drawn once, from the store as it is by then."""
        from client.sync import SIGNED_OUT

        sync = self.sync
        if sync is not None and sync.state == SIGNED_OUT:
            # Not from this (the engine's) thread: ending the session stops the engine.
            self.page.run_thread(self._ended_by, sync)
            return
        with self._changes:
            self._changed.add(case_id)
            if self._redraw_due:
                return
            self._redraw_due = True
        threading.Thread(target=self._redraw, name="redraw", daemon=True).start()

    def _redraw(self) -> None:
        try:
            # Under the drawing lock: a screen the patient just opened (say "New case") is never
            # replaced by a redraw of the one they left, and one being drawn is drawn again after.
            # The changes are taken once the lock is held: those arriving while another screen
            # is drawn wait for this one redraw.
            with self._lock:
                with self._changes:
                    changed, self._changed, self._redraw_due = self._changed, set(), False
                screen, shown = self.showing
                if screen == "home":
                    self.home()
                elif screen == "case" and (None in changed or shown in changed):
                    self.case(shown)
        except Exception:  # a closed page: nothing to draw on
            log.exception("redraw after a sync change failed")

    # ---- sign in ----------------------------------------------------------------------------
    def sign_in_screen(self, message: str | None = None, problem: bool = False) -> None:
        email = ft.TextField(label="Email", autofocus=True, keyboard_type=ft.KeyboardType.EMAIL, width=360)
        password = ft.TextField(label="Password", password=True, width=360)
        error = ft.Text(message or "", color=ft.Colors.RED_700 if problem else None)

        def attempt(create: bool) -> None:
            error.value = ""
            if not email.value or not password.value:
                # Flet's web client can deliver a click before the text typed just before it:
                # give the field values a moment to arrive before asking for them again.
                time.sleep(0.5)
            if not email.value or not password.value:
                error.value = "Enter your email and a password."
                error.color = ft.Colors.RED_700
                self.page.update()
                return
            error.value = "Creating your account..." if create else "Signing in..."
            error.color = None
            self.page.update()
            try:
                if create:
                    session = self.auth.sign_up(email.value.strip(), password.value)
                else:
                    session = self.auth.sign_in(email.value.strip(), password.value)
            except ServiceError as exc:
                error.value = self._auth_message(exc, create)
                error.color = ft.Colors.RED_700
                self.page.update()
                return
            self.signed_in(session, remember=True)

        # Off Flet's event loop (dermaloop.web_app.off_loop): a slow sign-in there would hold up every
        # other patient's session in this process (and the field values could not arrive meanwhile).
        # One guard for both buttons: "Create account" during a sign-in does nothing either.
        guard = threading.Lock()

        def click(create: bool):
            return off_loop(self.page, attempt, create, guard=guard)

        self.show(
            _heading("DermaLoop"),
            ft.Text("Photograph a skin spot and get a first risk estimate at once, then a dermatologist's view."),
            email, password,
            ft.Row([ft.FilledButton("Sign in", on_click=click(False)),
                    ft.OutlinedButton("Create account", on_click=click(True))], wrap=True),
            error,
            ft.Text(wording.disclaimer(), size=12, italic=True),
            screen="signin",
        )

    @staticmethod
    def _auth_message(exc: ServiceError, create: bool) -> str:
        code = getattr(exc, "code", "") or ""
        if isinstance(exc, Unavailable):
            return "Cannot reach the DermaLoop service. Check your connection and try again."
        if "EMAIL_EXISTS" in code or isinstance(exc, Conflict):
            return "An account with this email already exists. Sign in instead."
        if "WEAK_PASSWORD" in code:
            return "Choose a stronger password: at least 6 characters."
        if "INVALID_EMAIL" in code:
            return "That does not look like an email address."
        if isinstance(exc, Unauthenticated) or code in ("INVALID_PASSWORD", "EMAIL_NOT_FOUND", "INVALID_LOGIN_CREDENTIALS"):
            return "Wrong email or password."
        if isinstance(exc, InvalidArgument):
            return f"The service refused this: {exc.message}"
        return f"{'Creating the account' if create else 'Signing in'} failed: {exc.message}"

    def _ended_by(self, sync) -> None:
        if sync is self.sync:  # not already signed out or ended meanwhile
            self.session_ended()

    def _start_sync(self, session: UserSession) -> None:
        from client.sync import SyncEngine

        with self._life:
            self.sync = SyncEngine(self.device.store, session, self.settings, on_change=self.on_sync_change)
            self.sync.start()

    def signed_in(self, session: UserSession, *, remember: bool = False) -> None:
        """``remember``: a sign-in with the password, kept for this browser's next visit."""
        if remember:
            self.remembered.forget(self.key)
            self.key = self.remembered.remember(session)
            self._set_preference(self.key)
        self.session = session
        self.device.follow_models(session)
        self._start_sync(session)
        if self.device.consent.get(session.uid) is None:
            self.consent_screen()
        else:
            self.home()

    def sign_out(self) -> None:
        self.close()
        self.remembered.forget(self.key)
        self._set_preference(None)
        self.key = None
        self.session = None
        self.sign_in_screen("Signed out.")

    # ---- delete my data --------------------------------------------------------------------------
    def confirm_erasure(self) -> None:
        def go(e) -> None:
            self.page.pop_dialog()
            self.erase()

        self.page.show_dialog(ft.AlertDialog(
            scrollable=True,  # large text on a small screen
            title=ft.Text("Delete all your data?"),
            content=ft.Text("Your cases, photos, results, messages and your account are deleted everywhere: on "
                            "this device and on the service. This cannot be undone."),
            actions=[ft.TextButton("Keep my data", on_click=lambda e: self.page.pop_dialog()),
                     ft.FilledButton("Delete everything", on_click=go)]))

    def erase(self) -> None:
        from client.erasure import request_erasure, wait_until_done

        session = self.session
        self.close()  # nothing more is uploaded for this account
        status = ft.Text("Asking the service to delete your data...")
        self.show(_heading("Deleting your data"), ft.ProgressRing(semantics_label="Deleting"), status,
                  screen="erasing")

        def on_status(s) -> None:
            status.value = s.text
            self.page.update()

        def work() -> None:
            try:
                request_erasure(session, self.settings, self.device.store)
                final = wait_until_done(session, self.settings, self.device.store, consent=self.device.consent,
                                        on_status=on_status)
            except ServiceError as exc:
                self.signed_in(session)  # back to the cases, syncing again
                self.notify(f"Nothing was deleted: the request could not be sent ({exc.message}). "
                            "Try again when you are online.")
                return
            self.session = None
            if final.finished:  # remove_user forgot the saved sessions: the browser's key goes too
                self._set_preference(None)
                self.key = None
            self.sign_in_screen(final.text)

        self.page.run_thread(work)

    # ---- consent ------------------------------------------------------------------------------
    def consent_screen(self) -> None:
        # A Checkbox's own label stays on one line (cut off at large text sizes): the sentence
        # wraps beside it instead, and tapping it ticks the box too.
        research = ft.Checkbox(value=False, semantics_label=wording.RESEARCH_TEXT)

        def toggle(e) -> None:
            research.value = not research.value
            self.page.update()

        def agree(e) -> None:
            self.device.consent.accept(self.session.uid, bool(research.value))
            self.home()

        opt_in = ft.Row([research, ft.Container(ft.Text(wording.RESEARCH_TEXT), expand=True, on_click=toggle)],
                        vertical_alignment=ft.CrossAxisAlignment.START)
        self.show(_heading(wording.CONSENT_TITLE), ft.Text(wording.CONSENT_TEXT), opt_in,
                  ft.FilledButton("I agree", on_click=agree),
                  ft.TextButton("Sign out", on_click=lambda e: self.sign_out()), screen="consent")

    # ---- home -----------------------------------------------------------------------------------
    def home(self) -> None:
        with self._lock:  # see case()
            self._home()

    def _home(self) -> None:
        uid = self.session.uid
        online = bool(self.sync and self.sync.online)
        status = ("Online" if online else "Offline: new cases are kept on this device and upload when you are back "
                  "online.")
        rows: list[ft.Control] = []
        for case in self.device.store.cases(uid):
            rows.append(self._case_row(case))
        if not rows:
            rows.append(ft.Text("No cases yet. Tap 'New case' to photograph a skin spot."))
        self.show(
            # Rows wrap: at 200 % text on a phone the buttons go below the title instead of off the screen.
            ft.Row([_heading("My cases"),
                    ft.Row([ft.TextButton("Delete my data", on_click=lambda e: self.confirm_erasure()),
                            ft.TextButton("Sign out", on_click=lambda e: self.sign_out())], wrap=True)],
                   alignment=ft.MainAxisAlignment.SPACE_BETWEEN, wrap=True),
            ft.Text(status, size=12),
            ft.FilledButton("New case", icon=ft.Icons.ADD_A_PHOTO, on_click=lambda e: self.new_case()),
            ft.Divider(),
            *rows,
            screen="home",
        )

    def _case_row(self, case) -> ft.Control:
        remote = case.remote or {}
        status = remote.get("status") or case.status
        # the cloud's answer once it has one, else the device's
        answer = next((a for a in (remote.get("cloud"), case.device) if a and a.get("top")), None)
        review = remote.get("review")
        if review:  # the dermatologist's word comes before any model's
            summary = f"Dermatologist: {self._label_name(review.get('label'))}"
        elif answer:  # the most probable class, never a less probable call: a list row has no room to explain
            likely = wording.by_probability(answer["top"])[0]
            summary = f"{likely['name']} ({wording.percent(likely['p'])})"
            if answer.get("risk") in wording.RISK_ADVICE and not answer.get("demonstration"):
                summary = f"{wording.RISK_ADVICE[answer['risk']][0]} · {summary}"
        else:
            summary = "No classification"
        unread = self.sync.unread(case.case_id) if self.sync else 0
        title = f"{_when(case.created_at)}: {summary}"
        subtitle = self._state(status, remote.get("failure"))
        if unread:
            subtitle += f" · {unread} new message{'s' if unread > 1 else ''}"
        def thumbnail() -> ft.Control | None:
            thumb = thumbnail_png(case.image_path)
            return ft.Image(src=thumb, width=56, height=56, fit=ft.BoxFit.COVER,
                            semantics_label="Photo") if thumb else None

        return ft.ListTile(
            leading=self._picture_of(case.image_path, None, 56, "Photo", thumbnail),
            title=ft.Text(title), subtitle=ft.Text(subtitle),
            on_click=lambda e, cid=case.case_id: self.case(cid),
        )

    # ---- new case -------------------------------------------------------------------------------
    def new_case(self) -> None:
        self.draft = {}
        self.show(_heading("New case"),
                  ft.Text("Take a sharp close-up of the spot in good light, filling most of the photo."),
                  ft.FilledButton("Choose photo", icon=ft.Icons.PHOTO_CAMERA, on_click=self.pick_photo),
                  ft.TextButton("Back", on_click=lambda e: self.home()), screen="new")

    async def pick_photo(self, e) -> None:
        upload = self.incoming is not None
        files = await self.picker.pick_files(with_data=not upload, file_type=ft.FilePickerFileType.ANY,
                                             cancel_upload_on_window_blur=False)
        if not files:
            return
        picked = files[0]
        if not upload:
            self._checking()
            self.page.run_thread(self._answer, picked.name, picked.bytes or b"")
            return
        try:
            check_size(picked.size, picked.name)  # a file that cannot be used is not sent at all
        except PhotoError as exc:
            self._photo_problem(str(exc))
            return
        self._checking()  # on screen while the photo travels: the patient sees progress at once
        # A moment for the browser to paint it: once it starts reading the file for the upload it
        # paints nothing more until the file is sent (measured: progress seen at 0.1-0.2 s with this
        # pause, often only at 0.6-0.9 s without; the answer comes no later within the noise).
        await asyncio.sleep(PAINT_PAUSE_S)
        target = self.incoming.expect(picked.name)
        try:
            await self.picker.upload([ft.FilePickerUploadFile(
                upload_url=self.page.get_upload_url(target, URL_SECONDS), id=picked.id, name=picked.name)])
        except Exception as exc:  # the page went away, or the server has no upload endpoint
            log.exception("the photo could not be handed to the app")
            self.incoming.failed(picked.name)
            self._photo_problem(f"The app could not read {picked.name} ({exc}). Please pick it again.")

    def _checking(self) -> None:
        self.show(_heading("New case"), ft.ProgressRing(semantics_label="Checking the photo"),
                  ft.Text("Checking the photo on this device..."), screen="new")

    def _uploaded(self, e: ft.FilePickerUploadEvent) -> None:
        """The picker reports an upload: 0 when it starts, 1 when the file is here, or an error."""
        if self.incoming is None:
            return
        if e.error:
            log.warning("the upload of a picked photo failed: %s", e.error)
            if self.incoming.failed(e.file_name):
                self._photo_problem(f"The app could not read {e.file_name} ({e.error}). Please pick it again.")
            return
        if e.progress is None or e.progress < 1:
            return
        data = self.incoming.arrived(e.file_name)
        if data is not None:  # None: a pick the patient has replaced since
            self.page.run_thread(self._answer, e.file_name, data)

    def _answer(self, name: str, data: bytes) -> None:
        try:
            image = decode(data, name, draft=True)  # small and quick: the full-size copy comes after
            answer = self.device.answer(image)
        except PhotoError as exc:
            self._photo_problem(str(exc))
            return
        except Exception as exc:  # the model failed: say so, keep the app alive
            log.exception("the device answer failed")
            self._photo_problem(f"This device could not analyse the photo ({exc}). Please try another photo.")
            return
        kept = KeptCopy(data, name, image if holds_every_pixel(data, image) else None)
        self.draft = {"image": image, "answer": answer, "kept": kept}
        self.answer_screen()
        kept.start()  # once the answer is on its way: the patient reads it meanwhile

    def _photo_problem(self, text: str) -> None:
        self.show(_heading("New case"), ft.Text(text, color=ft.Colors.RED_700),
                  ft.FilledButton("Choose another photo", on_click=self.pick_photo),
                  ft.TextButton("Back", on_click=lambda e: self.home()), screen="new")

    def answer_screen(self) -> None:
        image, answer = self.draft["image"], self.draft["answer"]
        record = answer.get("record")
        classified = bool(answer.get("top"))
        parts: list[ft.Control] = [
            _heading("On-device answer"),
            _picture(preview_png(image, answer.get("box")), 360, "Your photo with the proposed lesion box"),
        ]
        if classified:
            if answer.get("message"):  # quality advice: worth a retake, but the photo was usable
                parts.append(ft.Text(answer["message"]))
            parts += [ft.Text("Most likely, according to the model on this device:")]
            parts += _top_rows(answer["top"])
            parts.append(_risk_box(answer, _namer(answer)))
        else:
            parts.append(ft.Text(answer.get("message") or "", weight=ft.FontWeight.BOLD))
            parts.append(ft.Text(wording.SENT_ANYWAY_NOTE))
        if self.device.model_note:
            parts.append(ft.Text(self.device.model_note, size=12))
        version = (record or {}).get("modelVersion") or answer.get("model_version") or "none"
        parts += [ft.Text(f"Model version: {version}", size=12),
                  ft.Text(wording.disclaimer(), size=12, italic=True)]
        parts += self._questions(classified)
        self.show(*parts, screen="answer")

    def _questions(self, classified: bool) -> list[ft.Control]:
        site = ft.Dropdown(label="Body site", options=[ft.DropdownOption(key=s, text=s.capitalize()) for s in BODY_SITES],
                           width=360)
        since = ft.Dropdown(label="Since when", options=[ft.DropdownOption(key=s, text=s.capitalize()) for s in SINCE],
                            width=360)
        checks = {key: ft.Checkbox(label=text, value=False) for key, text in CHANGES}
        note = ft.TextField(label="Anything else the dermatologist should know", multiline=True, min_lines=2,
                            max_length=1000, width=480)
        earlier = [c for c in self.device.store.cases(self.session.uid)]
        same = ft.Dropdown(label="Same spot as an earlier case", width=360, options=[
            ft.DropdownOption(key="", text="No, a new spot"),
            *[ft.DropdownOption(key=c.case_id, text=f"{_when(c.created_at)}") for c in earlier[:20]]])
        error = ft.Text("", color=ft.Colors.RED_700)

        def send(e, anyway: bool = False) -> None:
            answers = [text for key, text in CHANGES if checks[key].value]
            if since.value:
                answers.append(f"Noticed {since.value} ago" if since.value != "don't know" else "Since: not known")
            text = "; ".join(answers)
            if note.value:
                text = f"{text}. {note.value.strip()}" if text else note.value.strip()
            try:
                self._save_case(site.value or None, text or None, same.value or None, anyway)
            except ValueError as exc:
                error.value = str(exc)
                self.page.update()

        buttons = [ft.OutlinedButton("Retake", icon=ft.Icons.REPLAY, on_click=self.pick_photo)]
        if classified:
            # off the event loop: it may wait for the kept copy of the photo (photos.KeptCopy)
            buttons.insert(0, ft.FilledButton("Save and send", icon=ft.Icons.SEND,
                                              on_click=off_loop(self.page, send, None)))
        else:
            buttons.insert(0, ft.FilledButton("Send to a dermatologist anyway", icon=ft.Icons.SEND,
                                              on_click=off_loop(self.page, send, None, True)))
        return [ft.Divider(), ft.Text("Questions dermatologists ask", weight=ft.FontWeight.BOLD),
                _labelled(site, "Body site"), _labelled(since, "Since when"), *checks.values(), note,
                _labelled(same, "Same spot as an earlier case"), error, ft.Row(buttons, wrap=True),
                ft.TextButton("Cancel", on_click=lambda e: self.home())]

    def _save_case(self, site: str | None, text: str | None, same_as: str | None, anyway: bool) -> None:
        answer = self.draft["answer"]
        photo = self.draft["kept"].result()  # made while the patient read the answer (PhotoError: said below)
        consent = self.device.consent.get(self.session.uid)
        case = self.device.store.add_case(
            uid=self.session.uid, image=photo.jpeg, content_type=photo.content_type, width=photo.width,
            height=photo.height, device=answer.get("record"), note=cases.note_record(site, text),
            research_consent=bool(consent and consent.research), sent_anyway=anyway, same_lesion_as=same_as)
        self.draft = {}
        if self.sync:
            self.sync.kick()
        self.case(case.case_id)

    # ---- one case -----------------------------------------------------------------------------
    def case(self, case_id: str | None) -> None:
        """Read, build and show under the drawing lock: a sync change arriving meanwhile waits and then
        redraws, instead of finding another screen still shown, being dropped, and leaving this one
        with what the store held when it was read (seen: a case stuck at "waiting to upload" while
        its cloud result was on the server)."""
        with self._lock:
            self._case(case_id)

    def _case(self, case_id: str | None) -> None:
        case = self.device.store.get(self.session.uid, case_id) if case_id else None
        if case is None:
            self.home()
            return
        remote = case.remote or {}
        status = remote.get("status") or case.status
        parts: list[ft.Control] = [
            ft.TextButton("Back to my cases", icon=ft.Icons.ARROW_BACK, on_click=lambda e: self.home()),
            _heading(f"Case of {_when(case.created_at)}"),
            ft.Text(self._state(status, remote.get("failure"))),  # offline: "on this device only", not "uploading"
        ]
        if case.last_error and status in (cases.Status.DIAGNOSED_ON_DEVICE, cases.Status.UPLOADING,
                                           cases.Status.CAPTURED, cases.Status.FAILED):
            parts.append(ft.Text(case.last_error, color=ft.Colors.RED_700))
        device = case.device or {}
        earlier = self.device.store.get(self.session.uid, case.same_lesion_as) if case.same_lesion_as else None
        if earlier is not None:  # the same spot photographed before: side by side, with dates and results
            parts.append(ft.Row([self._dated_photo(earlier, "Earlier photo"),
                                 self._dated_photo(case, "This photo")], wrap=True, spacing=16,
                                vertical_alignment=ft.CrossAxisAlignment.START))
        else:
            photo = self._case_picture(case, 360, "Case photo")
            if photo is not None:
                parts.append(photo)
        parts += [ft.Text("On this device", weight=ft.FontWeight.BOLD)]
        if device.get("top"):
            parts += _top_rows(device["top"])
            parts.append(_risk_box(device, _namer(device)))
        else:
            parts.append(ft.Text("Not classified on this device" + (": sent to a dermatologist anyway."
                                                                     if case.sent_anyway else ".")))
        parts.append(ft.Text(f"Device model version: {device.get('modelVersion', 'none')}", size=12))
        cloud = remote.get("cloud")
        if cloud:
            parts += [ft.Divider(), ft.Text("Cloud analysis", weight=ft.FontWeight.BOLD)]
            if cloud.get("top"):
                parts += _top_rows(cloud["top"])
                parts.append(_risk_box(cloud, _namer(cloud)))
            if cloud.get("message"):
                parts.append(ft.Text(cloud["message"]))
            parts.append(ft.Text(f"Cloud model version: {cloud.get('modelVersion')}", size=12))
            if cloud.get("heatmapPath"):
                parts.append(ft.OutlinedButton("Show where the model looked",
                                               on_click=off_loop(self.page, self.show_heatmap, case_id,
                                                                cloud["heatmapPath"])))
        review = remote.get("review")
        if review:
            parts += [ft.Divider(), ft.Text("Dermatologist's review", weight=ft.FontWeight.BOLD),
                      ft.Text(f"Assessment: {self._label_name(review.get('label'))}"),
                      ft.Text(review.get("recommendation") or ""),
                      ft.Text(wording.URGENCY_TEXT.get(review.get("urgency"), ""))]
        parts += self._chat(case_id, status)
        parts.append(ft.Text(wording.disclaimer(), size=12, italic=True))
        self.show(*parts, screen="case", case_id=case_id)
        if self.sync and self.sync.unread(case_id):  # (marking read redraws this screen once more)
            self.sync.mark_read(case_id)

    def _dated_photo(self, case, label: str) -> ft.Control:
        remote = case.remote or {}
        review = remote.get("review")
        top = ((remote.get("cloud") or {}).get("top") or (case.device or {}).get("top") or [None])[0]
        result = (f"Dermatologist: {self._label_name(review.get('label'))}" if review
                  else f"{top['name']} ({wording.percent(top['p'])})" if top else "No classification")
        picture = self._case_picture(case, 240, f"{label} of this spot")
        return ft.Column([ft.Text(f"{label}, {_when(case.created_at)}", weight=ft.FontWeight.BOLD),
                          picture if picture is not None else ft.Text("No photo here"),
                          ft.Text(result)], width=250)

    def _case_picture(self, case, width: int, label: str) -> ft.Control | None:
        """A case's photo with its lesion box, or None when this device has no readable copy."""
        box = (case.device or {}).get("box")

        def build() -> ft.Control | None:
            png = preview_png_from_file(case.image_path, box)
            return _picture(png, width, label) if png else None

        return self._picture_of(case.image_path, box, width, label, build)

    def _picture_of(self, path: Path | None, box: list[float] | None, width: int, label: str,
                    build: Callable[[], ft.Control | None]) -> ft.Control | None:
        """The control ``build`` makes for this photo, kept for the session (the most recent
        PICTURES_KEPT): one control per place on screen, since a control has one parent."""
        if path is None:  # a case made on another device: its photo is not on this one
            return None
        key = (str(path), tuple(box) if box else None, width, label)
        with self._lock:
            if key in self._pictures:
                self._pictures.move_to_end(key)
                return self._pictures[key]
            control = self._pictures[key] = build()
            while len(self._pictures) > PICTURES_KEPT:
                self._pictures.popitem(last=False)
            return control

    def _state(self, status: str, failure: dict | None) -> str:
        if status in cases.LOCAL_STATUSES and not (self.sync and self.sync.online):
            return wording.OFFLINE_PENDING
        return wording.state_text(status, failure)

    @staticmethod
    def _label_name(label: str | None) -> str:
        if label in ("other", "ungradable"):
            return {"other": "Other (see the recommendation)", "ungradable": "The photo could not be assessed"}[label]
        from dermaloop.taxonomy import load_taxonomy

        try:
            return load_taxonomy().get(label).name
        except (KeyError, ValueError, AttributeError):
            return str(label)

    def show_heatmap(self, case_id: str, path: str) -> None:
        from dermaloop.storage import UserStorage

        try:
            data = UserStorage(self.session, self.settings).download(path)
        except ServiceError as exc:
            self.notify(f"The heatmap cannot be shown now: {exc.message}")
            return
        self.page.show_dialog(ft.AlertDialog(
            scrollable=True,
            title=ft.Text("Where the cloud model looked"),
            content=_picture(data, 420, "Heatmap of where the cloud model looked"),
            actions=[ft.TextButton("Close", on_click=lambda e: self.page.pop_dialog())]))

    def _chat(self, case_id: str, status: str) -> list[ft.Control]:
        if status in cases.LOCAL_STATUSES:
            return [ft.Divider(), ft.Text("You can message a dermatologist once the case is uploaded.", size=12)]
        rows: list[ft.Control] = [ft.Divider(), ft.Text("Messages", weight=ft.FontWeight.BOLD)]
        for message in self.sync.messages(case_id) if self.sync else []:
            who = "You" if message.get("senderRole") == "patient" else "Dermatologist"
            if message.get("error"):
                when = message["error"]
            elif message.get("waiting"):
                when = f"{_when(message.get('at'))}, waiting to send"
            else:
                when = _when(message.get("at"))
            rows.append(ft.Text(f"{who} ({when}): {message.get('text')}"))
        # Live updates redraw the screen: what the patient is typing survives them, in the same box.
        box = self.chat_boxes.get(case_id)
        if box is None:
            box = ft.TextField(label="Message", multiline=True, max_length=cases.MAX_MESSAGE_CHARS, width=480)
            box.on_change = lambda e: self.chat_drafts.__setitem__(case_id, box.value or "")
            self.chat_boxes[case_id] = box
        box.value = self.chat_drafts.get(case_id, "")  # the same text unless sent, or given back unsent

        def send(e) -> None:
            # Kept in the outbox first and sent in the background: offline it shows as waiting.
            text = box.value or self.chat_drafts.pop(case_id, "")
            self.chat_drafts.pop(case_id, None)
            box.value = ""
            self.page.run_thread(self._send_chat, case_id, text)

        return [*rows, box, ft.FilledButton("Send message", icon=ft.Icons.SEND, on_click=send)]

    def _send_chat(self, case_id: str, text: str) -> None:
        sync = self.sync
        if sync is None:  # signed out meanwhile: nothing is sent, nothing typed is lost
            self.chat_drafts[case_id] = text
            return
        try:
            sync.send_message(case_id, text)
        except (ValueError, ServiceError) as exc:
            if text.strip():
                self.chat_drafts[case_id] = text  # what the patient wrote is not lost
            self.notify(f"Not sent: {exc}")
        if self.showing == ("case", case_id):
            self.case(case_id)


def preview_png_from_file(path: Path | None, box: list[float] | None) -> bytes | None:
    from PIL import Image

    if path is None:  # a case made on another device: its photo is not on this one
        return None
    try:
        with Image.open(path) as img:
            # Drawn again on every change of the case: a stored 12 MP JPEG decodes at 1/4 scale (still
            # over PREVIEW_SIDE), a tenth of the full decode's time.
            img.draft("RGB", (PREVIEW_SIDE, PREVIEW_SIDE))
            return preview_png(img.convert("RGB"), box)
    except OSError:
        return None


def run(args: argparse.Namespace) -> int:
    settings = load_settings()
    host = args.host or settings.host
    port = args.port or settings.client_port
    data_dir = args.data_dir or Path(settings.data_dir) / "client"
    try:
        transfer = transfer_mode()
    except ValueError as exc:
        print(f"dermaloop client: {exc}", file=sys.stderr)
        return 2
    device = Device(settings, data_dir)
    incoming = prepare_folder(data_dir) if transfer == UPLOAD else None

    async def main(page: ft.Page) -> None:
        await PatientApp(page, device, incoming).open()

    return serve(main, "client", host, port)
