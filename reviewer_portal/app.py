"""``dermaloop portal``: the dermatologists' reviewer portal (Flet, served with the bundled web client).

Many dermatologists use one portal process at once: each browser session gets its own
:class:`PortalApp` holding its own signed-in :class:`~reviewer_portal.session.PortalSession` (no
per-user state in module globals). Screens: sign in -> triage queue (live, ordered, filtered) ->
case (photo, heatmap and box toggles, both models, the patient's answers, review form, chat) and
monitoring. Every control has a label: it is what screen readers read and what the browser tests
find it by.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import threading
import time
from typing import Any

import flet as ft

from dermaloop import DISCLAIMER, cases
from dermaloop.auth import AuthClient
from dermaloop.errors import ServiceError, Unauthenticated, Unavailable
from dermaloop.settings import Settings, load_settings
from dermaloop.taxonomy import load_taxonomy
from dermaloop.web_app import off_loop, serve
from reviewer_portal import claims, images, monitoring, results, review
from reviewer_portal import queue as triage
from reviewer_portal import templates as saved_templates
from reviewer_portal.session import READ_ONLY_BANNER, NotAllowed, PortalSession, sign_in

log = logging.getLogger("reviewer_portal")

PAGE_SIZE = 50  # rows drawn at once: a browser redraw of 1,000 rows would take seconds
RENEW_EVERY_S = cases.CLAIM_TTL_MS / 3000  # renew an open case's claim well before it lapses
REDRAW_DELAY_S = 0.15  # gather a burst of events into one redraw
RISK_COLOURS = {"high": ft.Colors.RED_100, "moderate": ft.Colors.AMBER_100, "low": ft.Colors.GREEN_100}
ZOOM_STEP = 1.5
MAX_ZOOM = 6.0
VIEW_W, VIEW_H = 480, 360  # the photo's box in the case view (the photo fits inside it)
CASE_GONE = "This case was deleted by its patient. Nothing more can be saved here."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None, help="interface to serve on (default: $DERMALOOP_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default: $DERMALOOP_PORTAL_PORT or 8551)")


def _when(ms: Any) -> str:
    if not isinstance(ms, int | float):
        return ""
    return dt.datetime.fromtimestamp(ms / 1000).strftime("%d %b %Y, %H:%M")


_pct = results.pct


def _heading(text: str, size: int = 20) -> ft.Text:
    return ft.Text(text, size=size, weight=ft.FontWeight.BOLD)


def _badge(text: str, colour: str) -> ft.Control:
    return ft.Container(ft.Text(text, size=12, weight=ft.FontWeight.BOLD),
                        bgcolor=colour, padding=ft.Padding.symmetric(horizontal=6, vertical=2), border_radius=6)


def _model_line(line: results.Line) -> ft.Control:
    if line.kind == "warning":
        return _badge(line.text, ft.Colors.AMBER_200)
    if line.kind == "title":
        return ft.Text(line.text, weight=ft.FontWeight.BOLD)
    if line.kind == "call":
        return ft.Text(line.text, weight=ft.FontWeight.W_500)
    return ft.Text(line.text, size=12 if line.kind == "small" else None, italic=line.kind == "note")


def _read_only_banner() -> ft.Control:
    return ft.Container(ft.Row([ft.Icon(ft.Icons.VISIBILITY, semantics_label="Read-only"),
                                ft.Text(READ_ONLY_BANNER, weight=ft.FontWeight.W_500, expand=True)]),
                        bgcolor=ft.Colors.BLUE_GREY_50, padding=10, border_radius=8,
                        border=ft.Border.all(1, ft.Colors.BLUE_GREY_200))


class PortalApp:
    """One browser session: one signed-in dermatologist and the screen they look at."""

    def __init__(self, page: ft.Page, settings: Settings) -> None:
        self.page = page
        self.settings = settings
        self.auth = AuthClient(settings)
        self.taxonomy = load_taxonomy()
        self.session: PortalSession | None = None
        self.showing: tuple[str, Any] = ("signin", None)
        self.filters = triage.Filters()
        self.limit = PAGE_SIZE
        self.templates = dict(review.DEFAULT_TEMPLATES)  # the dermatologist's own, once loaded
        self.case_view: CaseView | None = None
        self._lock = threading.RLock()
        self._dirty = threading.Event()
        self._closed = threading.Event()
        self.first_render_at: float | None = None
        page.title = "DermaLoop reviewer portal"
        page.scroll = ft.ScrollMode.AUTO
        page.padding = 16
        page.on_disconnect = lambda e: self.close()
        threading.Thread(target=self._redraw_loop, name="portal-redraw", daemon=True).start()

    # ---- plumbing -------------------------------------------------------------------------------
    def show(self, *controls: ft.Control, screen: str, key: Any = None) -> None:
        with self._lock:
            self.showing = (screen, key)
            self.page.controls.clear()
            self.page.add(*controls)
            self.page.update()

    def notify(self, text: str) -> None:
        try:
            self.page.show_dialog(ft.SnackBar(ft.Text(text)))
        except Exception:  # the page went away
            log.debug("notice not shown: %s", text)

    def changed(self, what: str) -> None:
        """From the listener threads: something the current screen shows may have changed."""
        self._dirty.set()

    def _redraw_loop(self) -> None:
        while not self._closed.is_set():
            if not self._dirty.wait(1.0):
                continue
            time.sleep(REDRAW_DELAY_S)
            self._dirty.clear()
            try:
                with self._lock:
                    screen, key = self.showing
                    if self.session is None or self.session.ended:
                        continue
                    if screen == "queue":
                        self.queue_screen(redraw=True)
                    elif screen == "case" and self.case_view is not None:
                        self.case_view.refresh()
                    elif screen == "loading" and self.session.synced:
                        self.queue_screen()
            except Exception:  # a closed page must never kill this thread
                log.exception("redraw failed")

    def close(self) -> None:
        self._closed.set()
        self._leave_case()
        if self.session is not None:
            self.session.close()
            self.session = None

    def fail(self, exc: BaseException, doing: str) -> None:
        """Any failure of a call: end the session if the token is gone, else say what happened."""
        if self.session is not None:
            self.session.check(exc)
            if self.session is not None and self.session.ended:
                return
        if isinstance(exc, Unavailable):
            self.notify(f"{doing} failed: the database cannot be reached. Try again when you are back online.")
        elif isinstance(exc, ServiceError):
            self.notify(f"{doing} failed: {exc.message}")
        else:
            log.exception("%s failed", doing)
            self.notify(f"{doing} failed: {exc}")

    # ---- sign in --------------------------------------------------------------------------------
    def sign_in_screen(self, message: str | None = None) -> None:
        email = ft.TextField(label="Email", autofocus=True, keyboard_type=ft.KeyboardType.EMAIL, width=360)
        password = ft.TextField(label="Password", password=True, can_reveal_password=True, width=360)
        error = ft.Text(message or "", color=ft.Colors.RED_700)
        def say(text: str, problem: bool = True) -> None:
            error.value, error.color = text, ft.Colors.RED_700 if problem else None
            self.page.update()

        def attempt() -> None:
            if not email.value or not password.value:
                say("Enter your email and password.")
                return
            say("Signing in...", problem=False)
            try:
                user = sign_in(self.auth, email.value.strip(), password.value)
            except NotAllowed as exc:
                say(str(exc))
            except Unavailable:
                say("Cannot reach the sign-in service. Check the connection and try again.")
            except Unauthenticated:
                say("Wrong email or password.")
            except ServiceError as exc:
                say(f"Signing in failed: {exc.message}")
            else:
                self.signed_in(user)

        self.show(
            _heading("DermaLoop reviewer portal", 24),
            ft.Text("For dermatologists: triage, review and answer the cases patients send."),
            # off Flet's event loop (dermaloop.web_app.off_loop): "Signing in..." shows, nobody waits
            email, password, ft.FilledButton("Sign in", icon=ft.Icons.LOGIN,
                                             on_click=off_loop(self.page, attempt)), error,
            screen="signin",
        )

    def signed_in(self, user) -> None:
        self.session = PortalSession(user, self.settings, on_change=self.changed, on_ended=self.ended)
        self.show(_heading("Triage queue"), ft.ProgressRing(semantics_label="Loading the queue"),
                  ft.Text("Loading the queue..."), screen="loading")
        if not self.session.read_only:
            threading.Thread(target=self._prepare, args=(self.session,), name="portal-prepare", daemon=True).start()
        if self.session.synced:
            self.queue_screen()

    def _prepare(self, session: PortalSession) -> None:
        """Beside the first queue render: publish our name for colleagues, load our templates."""
        session.publish_name()
        try:
            loaded = saved_templates.load(session.db, session.uid)
        except ServiceError as exc:
            session.check(exc)
            log.info("loading the templates of %s failed: %s (defaults meanwhile)", session.uid, exc)
            return
        if self.session is session:
            self.templates = loaded

    def ended(self, reason: str) -> None:
        self._leave_case()
        self.session = None
        self.sign_in_screen(reason)

    def sign_out(self) -> None:
        self._leave_case()
        if self.session is not None:
            session, self.session = self.session, None
            session.close()
        self.sign_in_screen("Signed out.")

    # ---- the queue --------------------------------------------------------------------------------
    def rows(self) -> list[triage.QueueRow]:
        s = self.session
        assert s is not None
        return triage.build_rows(s.value("queue"), s.value("cases"), s.value("messages"), s.value("reads"),
                                 s.value("claims"), claims.now_ms())

    def _filter(self, label: str, value: str, options: list[str], field: str) -> ft.Dropdown:
        def chosen(e) -> None:
            self.filters = triage.Filters(**{**self.filters.__dict__, field: e.control.value})
            self.limit = PAGE_SIZE
            self.queue_screen()

        return ft.Dropdown(label=label, value=value, width=190, on_select=chosen,
                           options=[ft.DropdownOption(key=o, text=o.capitalize()) for o in options])

    def queue_screen(self, redraw: bool = False) -> None:
        if self.session is None:
            return
        rows = self.rows()
        shown = triage.apply(rows, self.filters)
        f = self.filters
        online = "" if self.session.online else " · offline: showing the last known queue"
        actions: list[ft.Control] = [
            ft.Text(self._signed_in_as()),
            ft.OutlinedButton("Monitoring", icon=ft.Icons.INSIGHTS, on_click=lambda e: self.monitoring_screen())]
        if not self.session.read_only:
            actions.append(ft.OutlinedButton("Recommendation templates", icon=ft.Icons.EDIT_NOTE,
                                             on_click=lambda e: self.templates_dialog()))
        actions.append(ft.TextButton("Sign out", on_click=lambda e: self.sign_out()))
        header = ft.Row([_heading("Triage queue"), ft.Row(actions, wrap=True)],
                        alignment=ft.MainAxisAlignment.SPACE_BETWEEN, wrap=True)
        filters = ft.Row([
            self._filter("Status", f.status, list(triage.STATUS_FILTERS), "status"),
            self._filter("Risk tier", f.risk, ["any", *triage.TIERS], "risk"),
            self._filter("Body site", f.site, ["any", *triage.sites(rows)], "site"),
            self._filter("Waiting time", f.age, list(triage.AGE_FILTERS), "age"),
        ], wrap=True)
        count = ft.Text(f"{len(shown)} case{'s' if len(shown) != 1 else ''} match"
                        f"{'es' if len(shown) == 1 else ''}, highest priority first"
                        f"{f' (showing {self.limit})' if len(shown) > self.limit else ''}{online}")
        items: list[ft.Control] = [self._row(r) for r in shown[: self.limit]]
        if not shown:
            items.append(ft.Text("No case matches these filters." if rows else "The queue is empty."))
        if len(shown) > self.limit:
            items.append(ft.OutlinedButton("Show more", on_click=lambda e: self._more()))
        if redraw and self.showing[0] != "queue":
            return
        top = [header, _read_only_banner()] if self.session.read_only else [header]
        self.show(*top, filters, count, ft.Divider(), *items, screen="queue")
        if self.first_render_at is None:
            self.first_render_at = time.time()

    def _more(self) -> None:
        self.limit += PAGE_SIZE
        self.queue_screen()

    def _row(self, r: triage.QueueRow) -> ft.Control:
        cloud = f"cloud: {r.cloud.name} {_pct(r.cloud.p)}" if r.cloud else "cloud: no call (photo declined or pending)"
        device = f"device: {r.device.name} {_pct(r.device.p)}" if r.device else "device: no call"
        badges: list[ft.Control] = [
            _badge(text, ft.Colors.AMBER_200 if results.DEMONSTRATION in text
                   else ft.Colors.BLUE_100 if text.startswith(results.UNSURE)
                   else RISK_COLOURS.get(r.risk or "", ft.Colors.GREY_200))
            for text in r.risk_badges]
        if r.overdue:
            badges.append(_badge(f"OVERDUE ({triage.waited_text(r.waited_ms)})", ft.Colors.RED_300))
        if r.sent_anyway:
            badges.append(_badge("SENT ANYWAY", ft.Colors.PURPLE_100))
        if r.disagree:
            badges.append(_badge("models disagree", ft.Colors.ORANGE_100))
        if r.unread:
            # An admin keeps no read marks: every patient message counts, so say what it is.
            kind = "message from the patient" if self.session and self.session.read_only else "unread message"
            badges.append(_badge(f"{r.unread} {kind}{'s' if r.unread > 1 else ''}", ft.Colors.BLUE_100))
        if r.claimed_by:
            badges.append(_badge(f"being reviewed by {self.who(r.claimed_by)}", ft.Colors.GREY_300))
        if r.status == cases.Status.REVIEWED:
            badges.append(_badge("reviewed", ft.Colors.GREEN_200))
        if r.status == cases.Status.FAILED:  # the analysis gave up; the patient was told a person will look
            badges.append(_badge("ANALYSIS FAILED", ft.Colors.GREY_400))
        title = f"{cloud} · {device}"
        # The stored score folds waiting time in (it only orders the queue); it means nothing to read.
        details = f"waiting {triage.waited_text(r.waited_ms)} · site: {r.site or 'not given'} · case {r.case_id}"
        return ft.Container(
            ft.Column([ft.Row(badges, wrap=True, spacing=6), ft.Text(title, weight=ft.FontWeight.W_500),
                       ft.Text(details, size=12)], spacing=4),
            padding=10, border=ft.Border.all(1, ft.Colors.GREY_300), border_radius=8,
            on_click=off_loop(self.page, self.open_case, r.uid, r.case_id),  # claims it: a database write
            tooltip=f"Open case {r.case_id}",
        )

    def who(self, uid: str | None) -> str:
        """How a colleague is named on screen: "you", their display name, else their uid."""
        if self.session is None:
            return uid or "someone"
        if uid == self.session.uid:
            return "you"
        try:
            return self.session.names.of(uid)
        except Unauthenticated as exc:
            self.session.check(exc)
            return uid or "someone"

    def _signed_in_as(self) -> str:
        s = self.session
        assert s is not None
        return f"Signed in as {s.email}" + (" (admin, read-only)" if s.read_only else "")

    def templates_dialog(self) -> None:
        """Edit this dermatologist's templates; saved in the database, so every later session has them."""
        session = self.session
        if session is None or session.read_only:
            return
        fields = {u: ft.TextField(label=f"Template: {u}", value=self.templates[u], multiline=True, min_lines=2,
                                  width=560) for u in cases.REVIEW_URGENCIES}
        problem = ft.Text("", color=ft.Colors.RED_700)

        def save(e) -> None:
            try:
                stored = saved_templates.save(session.db, session.uid, {u: f.value or "" for u, f in fields.items()})
            except saved_templates.TemplatesRefused as exc:
                problem.value = str(exc)
                self.page.update()
                return
            except ServiceError as exc:
                problem.value = "Not saved."
                self.page.update()
                self.fail(exc, "Saving the templates")
                return
            self.templates.update(stored)
            self.page.pop_dialog()
            self.notify("Templates saved: your next sessions start from them too.")

        self.page.show_dialog(ft.AlertDialog(
            title=ft.Text("Recommendation templates"),
            content=ft.Column([*fields.values(), problem], tight=True, scroll=ft.ScrollMode.AUTO),
            actions=[ft.TextButton("Cancel", on_click=lambda e: self.page.pop_dialog()),
                     ft.FilledButton("Save templates", on_click=off_loop(self.page, save, None))]))

    # ---- one case ---------------------------------------------------------------------------------
    def open_case(self, uid: str, case_id: str) -> None:
        self._leave_case()
        self.case_view = CaseView(self, uid, case_id)
        self.case_view.open()

    def _leave_case(self) -> None:
        view, self.case_view = self.case_view, None
        if view is not None:
            view.leave()

    def back_to_queue(self) -> None:
        self._leave_case()
        self.queue_screen()

    # ---- monitoring -------------------------------------------------------------------------------
    def monitoring_screen(self) -> None:
        if self.session is None:
            return
        self._leave_case()
        figures = monitoring.compute(self.session.value("cases"), self.session.value("queue"), claims.now_ms())

        def hours(v: float | None) -> str:
            return "no reviews yet" if v is None else f"{v:.1f} h"

        lines = [ft.Text(f"Cases reviewed: {figures.reviewed}"),
                 ft.Text(f"Time to review: median {hours(figures.review_hours_p50)}, "
                         f"95th percentile {hours(figures.review_hours_p95)}")]
        lines += [ft.Text(line) for line in monitoring.waiting_lines(figures)]
        lines += [ft.Text(line) for line in monitoring.agreement_lines(figures)]
        png = monitoring.confusion_png(figures, self.taxonomy.ids)
        banner = [_read_only_banner()] if self.session.read_only else []
        self.show(ft.TextButton("Back to queue", icon=ft.Icons.ARROW_BACK, on_click=lambda e: self.back_to_queue()),
                  *banner, _heading("Monitoring"), *lines,
                  ft.Image(src=png, width=900, fit=ft.BoxFit.CONTAIN,
                           semantics_label="Confusion matrices of the device and cloud models against dermatologists"),
                  screen="monitoring")


class CaseView:
    """The open case: its claim (renewed while open), pictures, both models, the form and the chat.

    For an admin (read-only session) the same case without the write controls: no claim is taken,
    no read mark is kept, the review is shown instead of the form and the chat has no input."""

    def __init__(self, app: PortalApp, uid: str, case_id: str) -> None:
        self.app = app
        self.session = app.session
        self.read_only = self.session.read_only
        self.uid, self.case_id = uid, case_id
        self.claimed = False
        self.holder: str | None = None
        self.gone = False
        self._stop = threading.Event()
        self.photo: bytes | None = None
        self.heatmap: bytes | None = None
        self.earlier: bytes | None = None
        self.picture_note = ft.Text("", color=ft.Colors.RED_700)
        # Zoom: the photo sits in an InteractiveViewer (scroll or pinch to zoom, drag to pan), with
        # buttons for keyboards and screen readers. The viewer, not the image, is hidden until loaded
        # (an InteractiveViewer refuses invisible content).
        self.picture = ft.Image(src=b"", width=VIEW_W, height=VIEW_H, fit=ft.BoxFit.CONTAIN,
                                semantics_label="Case photo (zoomable)")
        self.viewer = ft.InteractiveViewer(content=self.picture, width=VIEW_W, height=VIEW_H, min_scale=1.0,
                                           max_scale=MAX_ZOOM, visible=False)
        self.zoom = 1.0  # the level the buttons last set
        self._zooming = asyncio.Lock()
        self.zoom_row = ft.Row([
            ft.OutlinedButton("Zoom in", icon=ft.Icons.ZOOM_IN, on_click=self._zoom_in),
            ft.OutlinedButton("Zoom out", icon=ft.Icons.ZOOM_OUT, on_click=self._zoom_out),
            ft.TextButton("Reset zoom", icon=ft.Icons.CENTER_FOCUS_STRONG, on_click=self._zoom_reset),
        ], wrap=True, visible=False)
        self.show_heatmap = ft.Switch(label="Heatmap (where the cloud model looked for its call)", value=False,
                                      on_change=lambda e: self._redraw_picture())
        self.show_box = ft.Switch(label="Lesion box", value=False, on_change=lambda e: self._redraw_picture())
        self.claim_text = ft.Text("")
        self.status_text = ft.Text("")
        self.chat = ft.Column(spacing=4)
        self.history = ft.Column([ft.Text("Loading the review history...", size=12)], spacing=4)
        self.form_message = ft.Text("", color=ft.Colors.RED_700)
        self.saved_text = ft.Text("")
        self.send_button: ft.FilledButton | None = None

    # life cycle ---------------------------------------------------------------------------------
    def open(self) -> None:
        case = self.case()
        if case is None:
            self.app.notify("This case no longer exists: its patient deleted it.")
            self.app.queue_screen()
            return
        if not self.read_only:
            try:
                claims.take(self.session.db, self.session.uid, self.uid, self.case_id)
                self.claimed = True
            except claims.ClaimHeld as exc:
                self.holder = exc.holder
            except claims.CaseGone:
                self.app.notify("This case no longer exists: its patient deleted it.")
                self.app.queue_screen()
                return
            except Exception as exc:  # offline or refused: show the case read-only
                self.app.fail(exc, "Claiming the case")
                if self.session.ended:
                    return
        self.render(case)
        if self.claimed:
            threading.Thread(target=self._renew_loop, name="claim-renew", daemon=True).start()
        self.app.page.run_thread(self._load_pictures, case)
        self.app.page.run_thread(self._load_history)
        if not self.read_only:
            self._mark_read()

    def leave(self) -> None:
        self._stop.set()
        if self.claimed and not self.session.ended and not self.gone:
            try:
                claims.release(self.session.db, self.session.uid, self.case_id)
            except ServiceError as exc:
                log.info("releasing the claim on %s failed: %s (it lapses by itself)", self.case_id, exc)

    def _renew_loop(self) -> None:
        while not self._stop.wait(RENEW_EVERY_S):
            try:
                claims.take(self.session.db, self.session.uid, self.uid, self.case_id)
            except claims.ClaimHeld as exc:
                self.claimed, self.holder = False, exc.holder
                self.app.changed("claims")
                return
            except claims.CaseGone:  # the live copy shows why; nothing left to hold
                self.claimed = False
                self.app.changed("cases")
                return
            except Exception as exc:  # offline: try again next round; the save re-checks anyway
                log.info("renewing the claim on %s failed: %s", self.case_id, exc)

    # The buttons zoom about the photo's centre, where a lesion usually is (the viewer's own zoom()
    # keeps the top-left corner still); scroll and pinch zoom about the pointer, as users expect.
    async def _zoom_in(self, e) -> None:
        await self._zoom_by(ZOOM_STEP)

    async def _zoom_out(self, e) -> None:
        await self._zoom_by(1 / ZOOM_STEP)

    async def _zoom_reset(self, e) -> None:
        await self._zoom_by(0.0)

    async def _zoom_by(self, factor: float) -> None:
        """Zoom to the current level times ``factor`` (0: back to the whole photo), about its centre."""
        # One move at a time: two quick clicks would interleave their reset/zoom/pan calls.
        async with self._zooming:
            level = self.zoom = min(max(self.zoom * factor, 1.0), MAX_ZOOM)
            await self.viewer.reset()
            if level > 1.0:
                await self.viewer.zoom(level)
                # pan() moves the content in its own (zoomed) units: shift the centre back into view.
                await self.viewer.pan(VIEW_W / 2 * (1 - level) / level, VIEW_H / 2 * (1 - level) / level)

    def case(self) -> dict[str, Any] | None:
        case = self.session.mirrors["cases"].get(f"{self.uid}/{self.case_id}")
        if case is None:  # not in the copy yet (a brand-new case): ask the server
            try:
                case = self.session.db.get(cases.case_path(self.uid, self.case_id))
            except ServiceError:
                case = None
        return case if isinstance(case, dict) else None

    def _mark_read(self) -> None:
        try:
            self.session.db.set(cases.reads_path(self.session.uid, self.case_id), cases.SERVER_TIMESTAMP)
        except ServiceError as exc:
            log.info("marking %s read failed: %s", self.case_id, exc)

    # pictures -----------------------------------------------------------------------------------
    def _load_pictures(self, case: dict[str, Any]) -> None:
        notes = []
        try:
            self.photo = images.fetch(self.session.storage, (case.get("image") or {}).get("path"), "photo")
        except images.ImageMissing as exc:
            notes.append(str(exc))
        except Unauthenticated as exc:
            self.session.check(exc)
            return
        heatmap_path = (case.get("cloud") or {}).get("heatmapPath")
        if heatmap_path:
            try:
                self.heatmap = images.fetch(self.session.storage, heatmap_path, "heatmap")
            except images.ImageMissing as exc:
                notes.append(str(exc))
            except Unauthenticated as exc:
                self.session.check(exc)
                return
        else:
            self.show_heatmap.disabled = True
            self.show_heatmap.label = "Heatmap (none for this case)"
        earlier_id = case.get("sameLesionAs")
        if isinstance(earlier_id, str):
            try:
                self.earlier = images.render(images.fetch(self.session.storage,
                                                          cases.image_object(self.uid, earlier_id), "earlier photo"),
                                             max_side=360)
            except images.ImageMissing as exc:
                notes.append(str(exc))
            except Unauthenticated as exc:
                self.session.check(exc)
                return
        self.picture_note.value = " ".join(notes)
        self._redraw_picture()

    def _redraw_picture(self) -> None:
        case = self.case() or {}
        source = self.heatmap if (self.show_heatmap.value and self.heatmap) else self.photo
        box = None
        if self.show_box.value:
            box = (case.get("cloud") or {}).get("box") or (case.get("device") or {}).get("box")
            if not box and not self.picture_note.value:
                self.picture_note.value = "No lesion box was found for this photo."
        if source is not None:
            try:
                self.picture.src = images.render(source, box)
                self.viewer.visible = self.zoom_row.visible = True
                self.picture.semantics_label = ("Heatmap" if source is self.heatmap else "Case photo") + " (zoomable)"
            except images.ImageMissing as exc:
                self.picture_note.value = str(exc)
        if self.earlier is not None and self.earlier_image is not None:
            self.earlier_image.src = self.earlier
            self.earlier_image.visible = True
        try:
            self.app.page.update()
        except Exception:
            log.debug("picture update on a closed page")

    # the screen -------------------------------------------------------------------------------------
    def render(self, case: dict[str, Any]) -> None:
        app = self.app
        self.earlier_image = ft.Image(src=b"", width=360, fit=ft.BoxFit.CONTAIN, visible=False,
                                      semantics_label="Earlier photo of the same spot")
        parts: list[ft.Control] = [
            ft.Row([ft.TextButton("Back to queue", icon=ft.Icons.ARROW_BACK, on_click=lambda e: app.back_to_queue()),
                    ft.Text(app._signed_in_as(), size=12)],
                   alignment=ft.MainAxisAlignment.SPACE_BETWEEN),
            *([_read_only_banner()] if self.read_only else []),
            _heading(f"Case {self.case_id}"),
            ft.Text(f"Created {_when(case.get('createdAt'))}", size=12),
            self.status_text, self.claim_text,
        ]
        if (case.get("flags") or {}).get("sentAnyway"):
            parts.append(_badge("SENT ANYWAY: the device checks declined this photo and the patient sent it regardless",
                                ft.Colors.PURPLE_100))
        photo = ft.Column([self.viewer, self.zoom_row,
                           ft.Text("Zoom: scroll or pinch on the photo and drag to move it, or use the buttons.",
                                   size=12)], spacing=4)
        pictures = ft.Row([photo, self.earlier_image], wrap=True, vertical_alignment=ft.CrossAxisAlignment.START)
        parts += [ft.Row([self.show_heatmap, self.show_box], wrap=True), self.picture_note, pictures]
        if case.get("sameLesionAs"):
            parts.append(ft.Text(f"Right: the earlier photo of the same spot (case {case['sameLesionAs']}).", size=12))
        parts.append(ft.Row([self._model_column("Device model", case.get("device")),
                             self._model_column("Cloud model", case.get("cloud"))],
                            vertical_alignment=ft.CrossAxisAlignment.START, wrap=True))
        if case.get("failure"):
            failure = case["failure"]
            parts.append(ft.Text(f"Analysis failed: {cases.failure_message(failure.get('reason'))} "
                                 f"({failure.get('detail', '')})", color=ft.Colors.RED_700))
        parts += self._patient(case)
        parts += self._review_shown(case) if self.read_only else self._form(case)
        parts += [ft.Divider(), _heading("Review history", 16), self.history]
        parts += [ft.Divider(), _heading("Chat with the patient", 16), self.chat,
                  *([] if self.read_only else self._chat_input()), ft.Text(DISCLAIMER, size=11, italic=True)]
        self._update_live(case)
        app.show(*parts, screen="case", key=self.case_id)

    def _review_shown(self, case: dict[str, Any]) -> list[ft.Control]:
        """The review as it stands, for a read-only session (no form)."""
        existing = case.get("review") if isinstance(case.get("review"), dict) else None
        parts: list[ft.Control] = [ft.Divider(), _heading("Review", 16)]
        if not existing:
            return [*parts, ft.Text("Not reviewed yet.")]
        label = self._name(existing.get("label", ""))
        if existing.get("otherText"):
            label += f" ({existing['otherText']})"
        parts += [ft.Text(f"By {self.app.who(existing.get('reviewerUid'))} on {_when(existing.get('at'))}"),
                  ft.Text(f"Diagnosis: {label}"),
                  ft.Text(f"Confidence: {existing.get('confidence') or 'not given'} · Urgency: {existing.get('urgency')}"),
                  ft.Text(f"Recommendation: {existing.get('recommendation') or '(none)'}"),
                  ft.Text("Training use: " + ("allowed" if existing.get("trainingUse") else "not allowed"))]
        return parts

    def _load_history(self) -> None:
        """The append-only audit of this case's reviews, oldest first (fetched, not live: it only
        grows when someone saves, and a save here reloads it)."""
        try:
            entries = self.session.db.get(cases.review_history_path(self.case_id))
        except Unauthenticated as exc:
            self.session.check(exc)
            return
        except ServiceError as exc:
            self.history.controls = [ft.Text(f"The review history could not be loaded ({exc.message}).", size=12)]
            self._update_page()
            return
        rows: list[ft.Control] = []
        items = entries.values() if isinstance(entries, dict) else []
        for entry in sorted((e for e in items if isinstance(e, dict)), key=lambda e: e.get("at") or 0):
            saved = entry.get("review") if isinstance(entry.get("review"), dict) else {}
            before = entry.get("previous") if isinstance(entry.get("previous"), dict) else None
            text = (f"{_when(entry.get('at'))}: {self.app.who(entry.get('editorUid'))} saved "
                    f"{self._name(saved.get('label', ''))}, {saved.get('urgency')}")
            if before:
                text += f" (replacing {self._name(before.get('label', ''))}, {before.get('urgency')})"
            rows.append(ft.Text(text, size=13))
        self.history.controls = rows or [ft.Text("No review saved yet.", size=12)]
        self._update_page()

    def _update_page(self) -> None:
        try:
            self.app.page.update()
        except Exception:
            log.debug("update on a closed page")

    def _model_column(self, title: str, result: Any) -> ft.Control:
        rows = [_model_line(line) for line in results.model_lines(title, result, self._name)]
        return ft.Container(ft.Column(rows, spacing=2), width=330, padding=10,
                            border=ft.Border.all(1, ft.Colors.GREY_300), border_radius=8)

    def _name(self, label: str) -> str:
        try:
            return self.app.taxonomy.get(label).name
        except (KeyError, ValueError):
            return {"other": "Other", "ungradable": "Ungradable"}.get(label, label)

    def _patient(self, case: dict[str, Any]) -> list[ft.Control]:
        note = case.get("note") or {}
        consent = (case.get("consent") or {}).get("research") is True
        return [ft.Divider(), _heading("The patient's answers", 16),
                ft.Text(f"Body site: {note.get('site') or 'not given'}"),
                ft.Text(f"Note: {note.get('text') or 'none'}"),
                ft.Text("Research use: " + ("agreed" if consent else "not agreed"))]

    def _form(self, case: dict[str, Any]) -> list[ft.Control]:
        existing = case.get("review") if isinstance(case.get("review"), dict) else {}
        consent = (case.get("consent") or {}).get("research") is True
        labels = [(c.id, c.name) for c in self.app.taxonomy.classes] + [("other", "Other"), ("ungradable", "Ungradable")]
        self.diagnosis = ft.RadioGroup(value=existing.get("label"), content=ft.Column(
            [ft.Radio(value=v, label=f"{name}" + (f" ({v})" if v not in ("other", "ungradable") else ""))
             for v, name in labels], spacing=0))
        self.other = ft.TextField(label="Other diagnosis", value=existing.get("otherText") or "", width=420)
        # no default: a confidence nobody chose would be stored as the dermatologist's (it is optional)
        self.confidence = ft.RadioGroup(value=existing.get("confidence"), content=ft.Row(
            [ft.Radio(value=v, label=f"{v.capitalize()} confidence") for v in cases.REVIEW_CONFIDENCES]))
        self.recommendation = ft.TextField(label="Recommendation to the patient", multiline=True, min_lines=3,
                                           value=existing.get("recommendation") or "", width=640)

        def urgency_chosen(e) -> None:
            current = (self.recommendation.value or "").strip()
            if not current or current in self.app.templates.values():
                self.recommendation.value = self.app.templates.get(self.urgency.value, "")
                self.app.page.update()

        self.urgency = ft.RadioGroup(value=existing.get("urgency"), on_change=urgency_chosen, content=ft.Row(
            [ft.Radio(value=v, label=v.capitalize()) for v in cases.REVIEW_URGENCIES]))
        self.training = ft.Checkbox(label="The image may be used for training", value=bool(existing.get("trainingUse")),
                                    visible=consent)
        parts: list[ft.Control] = [ft.Divider(), _heading("Review", 16)]
        if existing:
            parts.append(ft.Text(f"Current review by {self.app.who(existing.get('reviewerUid'))} on "
                                 f"{_when(existing.get('at'))}: "
                                 f"{self._name(existing.get('label', ''))}, {existing.get('urgency')}. "
                                 "Saving again keeps it in the audit history.", size=12))
        parts += [ft.Text("Diagnosis", weight=ft.FontWeight.W_500), self.diagnosis, self.other,
                  ft.Text("Confidence", weight=ft.FontWeight.W_500), self.confidence,
                  ft.Text("Urgency", weight=ft.FontWeight.W_500), self.urgency, self.recommendation]
        parts.append(self.training if consent else
                     ft.Text("The patient did not agree to research use: this image will not be used for training.",
                             size=12))
        self.save_button = ft.FilledButton("Save review", icon=ft.Icons.SAVE, on_click=off_loop(self.app.page, self.save),
                                           disabled=not self.claimed)
        parts += [self.save_button, self.form_message, self.saved_text]
        return parts

    def save(self) -> None:
        form = review.ReviewForm(label=self.diagnosis.value or None, recommendation=self.recommendation.value or "",
                                 urgency=self.urgency.value or None, confidence=self.confidence.value or None,
                                 other_text=self.other.value or None, training_use=bool(self.training.value))
        self.form_message.value = "Saving..."
        self.form_message.color = ft.Colors.GREY_700
        self.app.page.update()
        try:
            stored = review.save(self.session.db, self.session.uid, self.uid, self.case_id, form,
                                 self.app.taxonomy.ids)
        except review.ReviewRefused as exc:
            self.form_message.value = str(exc)
            self.form_message.color = ft.Colors.RED_700
            self.app.page.update()
            return
        except Exception as exc:
            self.form_message.value = "Not saved."
            self.app.page.update()
            self.app.fail(exc, "Saving the review")
            return
        self.form_message.value = ""
        self.saved_text.value = (f"Review saved: {self._name(stored.get('label', ''))}, {stored.get('urgency')}. "
                                 "The patient sees it now.")
        self.app.page.update()
        self.app.page.run_thread(self._load_history)

    def _chat_input(self) -> list[ft.Control]:
        self.message = ft.TextField(label="Message to the patient", multiline=True, width=640,
                                    max_length=cases.MAX_MESSAGE_CHARS)

        def send(e) -> None:
            try:
                record = cases.message_record(self.session.uid, "dermatologist", self.message.value or "")
                self.session.db.push(cases.messages_path(self.uid, self.case_id), record)
            except cases.CaseError as exc:
                self.app.notify(f"Not sent: {exc}")
                return
            except Exception as exc:
                self.app.fail(exc, "Sending the message")
                return
            self.message.value = ""
            self.app.page.update()

        self.send_button = ft.FilledButton("Send message", icon=ft.Icons.SEND,
                                           on_click=off_loop(self.app.page, send, None))
        return [self.message, self.send_button]

    # live parts -------------------------------------------------------------------------------------
    def _update_live(self, case: dict[str, Any] | None) -> None:
        if case is None:
            # Deleted while open (the patient's "delete my data"): say so where the eye is, at the
            # top and beside the save button, and leave nothing to press.
            self.gone = True
            self._stop.set()
            self.status_text.value = CASE_GONE
            self.status_text.color = ft.Colors.RED_700
            self.status_text.weight = ft.FontWeight.BOLD
            self.claim_text.value = ""
            if not self.read_only:
                self.form_message.value = CASE_GONE
            if self.send_button is not None:
                self.send_button.disabled = True
        else:
            self.status_text.value = f"Status: {results.status_text(case.get('status'))}"
        claim = self.session.mirrors["claims"].get(self.case_id)
        holder = cases.claim_holder(claim, claims.now_ms())
        if self.claimed and holder not in (None, self.session.uid):
            self.claimed, self.holder = False, holder
        if case is None:
            pass  # nothing to claim any more: the status line says why
        elif self.read_only:
            self.claim_text.value = (f"{self.app.who(holder)} is reviewing this case." if holder
                                     else "Nobody is reviewing this case now.")
            self.claim_text.color = ft.Colors.BLUE_GREY_800
        elif self.claimed:
            self.claim_text.value = "You are reviewing this case: others see it as taken until you leave it."
            self.claim_text.color = ft.Colors.GREEN_800
        else:
            who = holder or self.holder
            self.claim_text.value = (f"{self.app.who(who)} is reviewing this case: you can read it, but not save "
                                     "a review." if who else "Not claimed: reopen the case to review it.")
            self.claim_text.color = ft.Colors.ORANGE_900
        if hasattr(self, "save_button"):
            self.save_button.disabled = not self.claimed or case is None
        messages = self.session.mirrors["messages"].get(f"{self.uid}/{self.case_id}") or {}
        rows: list[ft.Control] = []
        for msg in sorted((m for m in messages.values() if isinstance(m, dict)), key=lambda m: m.get("at") or 0):
            who = "Patient" if msg.get("senderRole") == "patient" else (
                "You" if msg.get("senderUid") == self.session.uid else self.app.who(msg.get("senderUid")))
            rows.append(ft.Text(f"{who} ({_when(msg.get('at'))}): {msg.get('text')}"))
        if not rows:
            rows.append(ft.Text("No messages yet.", size=12))
        self.chat.controls = rows
        self._seen = len(messages)

    def refresh(self) -> None:
        """Called on every change while the case is open: status, claim, chat (the form is kept)."""
        before = getattr(self, "_seen", 0)
        self._update_live(self.case())
        if self._seen != before and not self.read_only and not self.gone:
            self._mark_read()
        self.app.page.update()


def run(args: argparse.Namespace) -> int:
    settings = load_settings()
    host = args.host or settings.host
    port = args.port or settings.portal_port

    def main(page: ft.Page) -> None:
        PortalApp(page, settings).sign_in_screen()

    return serve(main, "portal", host, port)
