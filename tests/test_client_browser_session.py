"""The patient app in headless Chromium, against a real localbase: staying signed in per browser
(reload, app restart, a second browser, sign out, a revoked sign-in), and the main screens at 200 %
text on a small phone screen, with a chat message written offline. Screenshots land in var/test-screens/patient-app-session/ and
var/test-screens/patient-app-200-percent/.

How a web user gets 200 % text: the browser's font size setting changes the root (``html``) font
size, and Flutter's web engine takes that over as its text scale (it watches the ``html`` element's
style). Setting ``html { font-size: 32px }`` (2 x 16 px) is what that setting does.

Flutter builds its accessibility tree (what the role queries find) ahead of, and apart from, what it
paints: a test can pass while its screenshots show something else (they once all showed Flet's
"Working..." boot screen). So each screenshot is checked against the tree: the screen's key controls
must be painted across their boxes, and no screenshot may repeat the one before it."""

from __future__ import annotations

import hashlib
import io
import json
import re
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from client import wording
from client.remember import PREFERENCE
from client.store import DB_FILE
from dermaloop import auth as dl_auth
from dermaloop import cases
from dermaloop.database import admin_reference
from tests.browser_support import (
    LAUNCH_ARGS,
    AppProcess,
    Shots,
    open_flet,
    require_browser,
    shots_folder,
    type_into,
)
from tests.localbase_process import LocalbaseProcess
from tests.worker_support import lesion_jpeg, tiny_device_model_dir

pytestmark = [pytest.mark.slow, pytest.mark.browser]

PASSWORD = "patient-pass-1"
PHONE = {"width": 360, "height": 780}  # a small Android phone, in CSS pixels


@pytest.fixture
def system(tmp_path):
    require_browser()
    backend = LocalbaseProcess(data_dir=tmp_path / "localbase").start()
    settings = backend.settings()
    models = tmp_path / "models"
    tiny_device_model_dir(models / "device-tiny", version="device-tiny-1")
    client = AppProcess("client", settings, ["--data-dir", str(tmp_path / "device")],
                        env_extra={"DERMALOOP_MODELS_DIR": str(models)}).start()
    yield backend, settings, client
    print("client output (tail):\n" + "".join(client.lines[-60:]))  # shown when the test fails
    client.stop()
    backend.stop()


def browser_key(page) -> str | None:
    """The browser's half of "stay signed in" (Flutter keeps preferences JSON-encoded, prefixed)."""
    raw = page.evaluate(f"localStorage.getItem('flutter.{PREFERENCE}')")
    return None if raw is None else json.loads(raw)


def sign_up(page, email: str) -> None:
    from playwright.sync_api import expect

    type_into(page, "Email", email)
    type_into(page, "Password", PASSWORD)
    page.get_by_role("button", name="Create account").click()
    expect(page.get_by_role("button", name="I agree")).to_be_visible()
    page.get_by_role("button", name="I agree").click()
    expect(page.get_by_role("button", name="New case")).to_be_visible()


def test_a_browser_stays_signed_in_across_reloads_and_restarts_and_no_other_browser_does(system, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    backend, settings, client = system
    expect.set_options(timeout=60_000)  # a first paint on 2 busy cores; not a speed check
    shots = Shots(shots_folder("patient-app-session"))

    def shot(page, name: str) -> None:
        page.wait_for_timeout(1000)  # the semantics tree comes before the paint: let the screen be drawn
        shots(page, name)

    alice, bob = (f"{who}-{uuid.uuid4().hex[:6]}@dermaloop.test" for who in ("alice", "bob"))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=LAUNCH_ARGS)
        first = browser.new_context(viewport={"width": 900, "height": 900}).new_page()
        first.set_default_timeout(120_000)
        open_flet(first, client.url)
        sign_up(first, alice)
        shot(first, "alice-signed-in")

        open_flet(first, client.url)  # reload
        expect(first.get_by_role("button", name="New case")).to_be_visible()
        shot(first, "alice-after-reload")

        # A second browser on the same app process: its own sign-in, nothing of Alice's.
        second = browser.new_context(viewport={"width": 900, "height": 900}).new_page()
        second.set_default_timeout(120_000)
        open_flet(second, client.url)
        expect(second.get_by_role("button", name="Sign in")).to_be_visible()
        assert browser_key(second) is None
        shot(second, "second-browser-asks-to-sign-in")
        sign_up(second, bob)
        alice_key, bob_key = browser_key(first), browser_key(second)
        assert alice_key and bob_key and alice_key != bob_key
        with sqlite3.connect(f"file:{tmp_path / 'device' / DB_FILE}?mode=ro", uri=True) as db:
            owners = dict(db.execute("SELECT key_hash, uid FROM sessions").fetchall())
        alice_uid = dl_auth.get_user_by_email(alice, settings).uid
        bob_uid = dl_auth.get_user_by_email(bob, settings).uid
        assert owners == {hashlib.sha256(alice_key.encode()).hexdigest(): alice_uid,
                          hashlib.sha256(bob_key.encode()).hexdigest(): bob_uid}

        # The app process restarts: both browsers come back signed in, each as themselves.
        client.stop()
        client.start()
        open_flet(first, client.url)
        expect(first.get_by_role("button", name="New case")).to_be_visible()
        shot(first, "alice-after-app-restart")

        # Signing out forgets both halves: the next visit asks for the password.
        first.get_by_role("button", name="Sign out").click()
        expect(first.get_by_role("button", name="Sign in")).to_be_visible()
        wait_for(lambda: browser_key(first) is None, "the browser to drop its key")
        open_flet(first, client.url)
        expect(first.get_by_role("button", name="Sign in")).to_be_visible()
        shot(first, "alice-signed-out-after-reload")

        # Bob's sign-in is ended on the server while his app is open: the live updates are refused,
        # and his browser says so and asks for the password.
        time.sleep(1.1)  # revocation has one-second resolution: the session's tokens must be older
        dl_auth.revoke(bob_uid, settings)
        expect(second.get_by_text("You were signed out", exact=False)).to_be_visible()
        expect(second.get_by_role("button", name="Sign in")).to_be_visible()
        shot(second, "bob-revoked-while-open")
        wait_for(lambda: browser_key(second) is None, "the revoked key to be dropped")

        # Alice signs in again, closes the tab; her sign-in is ended while no app runs: the next
        # start finds it refused and says so.
        type_into(first, "Email", alice)
        type_into(first, "Password", PASSWORD)
        first.get_by_role("button", name="Sign in").click()
        expect(first.get_by_role("button", name="New case")).to_be_visible()
        context = first.context
        first.close()
        client.stop()
        time.sleep(1.1)
        dl_auth.revoke(alice_uid, settings)
        client.start()
        again = context.new_page()
        again.set_default_timeout(120_000)
        open_flet(again, client.url)
        expect(again.get_by_text("You were signed out", exact=False)).to_be_visible()
        expect(again.get_by_role("button", name="Sign in")).to_be_visible()
        shot(again, "alice-revoked-while-closed")
        wait_for(lambda: browser_key(again) is None, "the revoked key to be dropped")
        with sqlite3.connect(f"file:{tmp_path / 'device' / DB_FILE}?mode=ro", uri=True) as db:
            assert db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0] == 0
        browser.close()


def wait_for(predicate, what: str) -> None:
    from tests.worker_support import wait_until

    wait_until(predicate, what)


SCROLLBAR = 28  # the scroll bar, over the right edge, fades in and out: left out of comparisons
MIN_INK = 0.02  # share of a control's box that its text or picture covers (a blank area has none)
UNCHANGED = 0.002  # share of changed pixels below which two screenshots show the same (a caret blinks)


def pixels_of(png: bytes | Path):
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(png) if isinstance(png, bytes) else png) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


def changed(a, b) -> float:
    """Share of the content pixels (the scrollbar aside) that differ between two screenshots."""
    import numpy as np

    width = PHONE["width"] - SCROLLBAR
    return float((np.abs(a[:, :width] - b[:, :width]).max(axis=2) > 0).mean())


def drawn(pixels, box: dict[str, float]) -> bool:
    """Something is painted where the accessibility tree puts the control, across its box: clearly
    coloured pixels (text, icon, picture) cover part of it and reach its right and lower parts.
    Flet's "Working..." boot screen or an unpainted canvas has nothing there. (A stale picture of
    another screen can pass this: the screenshots are also compared with each other.)"""
    import numpy as np

    x0, y0 = max(int(box["x"]) + 1, 0), max(int(box["y"]) + 1, 0)
    x1 = min(int(box["x"] + box["width"]) - 1, pixels.shape[1])
    y1 = min(int(box["y"] + box["height"]) - 1, pixels.shape[0])
    region = pixels[y0:y1, x0:x1]
    if region.size == 0:
        return False
    colours, counts = np.unique(region.reshape(-1, 3), axis=0, return_counts=True)
    ink = np.abs(region - colours[counts.argmax()]).max(axis=2) > 60  # off the box's own background
    if ink.mean() < MIN_INK:
        return False
    rows, cols = np.nonzero(ink)
    return bool(cols.max() >= 0.6 * (x1 - x0) and rows.max() >= 0.5 * (y1 - y0))


def in_view(box: dict[str, float] | None) -> bool:
    return box is not None and box["x"] >= -0.5 and box["y"] >= -0.5 and \
        box["x"] + box["width"] <= PHONE["width"] + 0.5 and box["y"] + box["height"] <= PHONE["height"] + 0.5


def wait_painted(page, keys: tuple, evidence: Path | None = None) -> dict[int, dict[str, float]]:
    """Wait until the canvas shows every key control that lies on the screen (the accessibility
    tree runs ahead of the paint); returns their boxes by index. A screen that is never painted
    fails the test (its last screenshot kept as ``evidence``) rather than leaving a screenshot of
    something else."""
    for _ in range(240):  # two minutes at most: only stops a hung paint, not a speed check
        boxes = {}
        for i, key in enumerate(keys):
            box = key.first.bounding_box()
            if in_view(box):
                boxes[i] = box
        png = page.screenshot()
        pixels = pixels_of(png)
        if all(drawn(pixels, box) for box in boxes.values()):
            return boxes
        page.wait_for_timeout(500)
    if evidence is not None:
        evidence.write_bytes(png)
    missing = {str(keys[i]): box for i, box in boxes.items() if not drawn(pixels, box)}
    shifted = page.evaluate(STALE_SCROLL)
    raise AssertionError(f"the browser never painted {missing} (its canvas shows something else, such as "
                         f"Flet's 'Working...' boot screen; see {evidence})" +
                         (f"; or the accessibility tree is shifted: {shifted}" if shifted else ""))


# Semantics elements that no longer scroll (no overflow helper) but kept a scroll offset: their
# subtree's boxes no longer match the picture. Flutter left one when a scrolled screen gave way to
# one that does not scroll (consent -> home), before client.app gave each screen its own scroll view.
STALE_SCROLL = """() => [...document.querySelectorAll('flt-semantics')]
    .filter(e => e.scrollTop > 0 && !e.querySelector(':scope > flt-semantics-scroll-overflow'))
    .map(e => `${e.id} scrollTop=${e.scrollTop}`)"""


def into_view(page, control) -> None:
    """Bring a control onto the screen with the mouse wheel, as a person does, before it is
    clicked or typed into: the app scrolls, and the screenshots and the accessibility tree follow.
    (Playwright would scroll the tree's DOM element itself, which Flutter only turns into a scroll
    of its own when it is not in pointer mode, as it is after a wheel.)"""
    centre = (PHONE["width"] // 2, PHONE["height"] // 2)
    for _ in range(20):
        box = control.first.bounding_box()
        assert box is not None, f"{control} is not on the page"
        if in_view(box):
            return
        page.mouse.move(*centre)
        page.mouse.wheel(0, box["y"] + box["height"] / 2 - centre[1])
        page.wait_for_timeout(400)
    raise AssertionError(f"{control} could not be scrolled onto the screen")


@dataclass
class Screens:
    """Screenshots of whole screens, each proven to show the screen it is named after: its key
    controls are painted where the accessibility tree has them, and no screenshot repeats the one
    kept before it (a canvas stuck on one picture, as once on Flet's boot screen, fails)."""

    shots: Shots
    previous: Any = None  # the pixels of the last screenshot kept

    def __call__(self, page, name: str, *keys) -> None:
        """From the top, one viewport at a time (Flutter scrolls inside its canvas), until a scroll
        no longer moves it; every key must be seen painted in one of them."""
        assert keys, "name the controls that show this screen"
        centre = (PHONE["width"] // 2, PHONE["height"] // 2)
        page.mouse.move(*centre)
        page.mouse.wheel(0, -100_000)
        seen: set[int] = set()
        for part in range(12):
            page.wait_for_timeout(600)  # let the scroll and the pictures settle before the screenshot
            boxes = wait_painted(page, keys, self.shots.folder / f"{name}-{part}-unpainted.png")
            path = self.shots(page, f"{name}-{part}")
            pixels = pixels_of(path)
            if self.previous is not None and changed(pixels, self.previous) < UNCHANGED:
                assert part > 0, f"{path.name} shows the same picture as the screenshot before it"
                path.unlink()  # the bottom was reached
                break
            unpainted = [str(keys[i]) for i, box in boxes.items() if not drawn(pixels, box)]
            assert not unpainted, f"{path.name} does not show {unpainted}"
            seen |= set(boxes)
            self.previous = pixels
            page.mouse.move(*centre)
            page.mouse.wheel(0, PHONE["height"] * 0.7)
        never = [str(key) for i, key in enumerate(keys) if i not in seen]
        assert not never, f"no screenshot of {name} shows {never}"
        page.mouse.wheel(0, -100_000)
        page.wait_for_timeout(600)


def reachable(page, role: str, name: str | re.Pattern, exact: bool = True) -> None:
    """The control is found by its label and lies within the screen's width (nothing cut off)."""
    from playwright.sync_api import expect

    control = page.get_by_role(role, name=name, exact=exact) if isinstance(name, str) else \
        page.get_by_role(role, name=name)
    # A live redraw (the upload, the cloud result) replaces the controls for a moment: wait for the
    # control to be there again rather than catch it mid-swap.
    expect(control.first).to_be_attached()
    box = control.first.bounding_box()
    assert box is not None, f"{role} {name!r} is not on the page"
    assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"] + 0.5, f"{role} {name!r} sticks out: {box}"


def send_chat(page, text: str) -> None:
    into_view(page, page.get_by_role("textbox", name="Message"))
    type_into(page, "Message", text)
    send = page.get_by_role("button", name="Send message")
    into_view(page, send)
    send.click()


def test_the_main_screens_stay_usable_at_200_percent_text(system, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    backend, settings, client = system
    expect.set_options(timeout=60_000)
    shots = Screens(Shots(shots_folder("patient-app-200-percent")))
    photo = tmp_path / "spot.jpg"
    photo.write_bytes(lesion_jpeg(5, (640, 480)))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=LAUNCH_ARGS)
        page = browser.new_context(viewport=PHONE).new_page()
        page.set_default_timeout(120_000)
        page.on("console", lambda m: print("browser console:", m.type, m.text))  # shown if the test fails
        open_flet(page, client.url)
        expect(page.get_by_role("button", name="Create account")).to_be_visible()
        title = page.get_by_text("DermaLoop", exact=True)
        wait_painted(page, (title,))
        shots.previous = pixels_of(page.screenshot())  # at 100 %: the first screenshot must differ from it
        normal = title.bounding_box()
        page.evaluate("document.documentElement.style.fontSize = '32px'")  # the browser's text size: 200 %
        page.wait_for_timeout(1000)
        large = title.bounding_box()
        assert large["width"] > 1.8 * normal["width"] and large["height"] > 1.8 * normal["height"], (normal, large)

        for role, name in (("textbox", "Email"), ("textbox", "Password"), ("button", "Sign in"),
                           ("button", "Create account")):
            reachable(page, role, name)
        shots(page, "sign-in", title, page.get_by_role("button", name="Create account"))
        email = f"big-{uuid.uuid4().hex[:6]}@dermaloop.test"
        type_into(page, "Email", email)
        type_into(page, "Password", PASSWORD)
        page.get_by_role("button", name="Create account").click()

        expect(page.get_by_role("button", name="I agree")).to_be_visible()
        research = page.get_by_role("checkbox", name=re.compile("^Also allow my photos"))
        reachable(page, "checkbox", re.compile("^Also allow my photos"))
        reachable(page, "button", "I agree")
        shots(page, "consent", page.get_by_text(wording.CONSENT_TITLE, exact=True),
              page.get_by_role("button", name="I agree"))
        sentence = page.get_by_text("Also allow my photos", exact=False)
        into_view(page, sentence)
        sentence.click()  # the wrapped sentence ticks it too
        expect(research).to_be_checked()
        agree = page.get_by_role("button", name="I agree")
        into_view(page, agree)
        agree.click()

        expect(page.get_by_role("button", name="New case")).to_be_visible()
        for name in ("New case", "Delete my data", "Sign out"):
            reachable(page, "button", name)
        shots(page, "home", page.get_by_text("My cases", exact=True), page.get_by_role("button", name="New case"))
        page.get_by_role("button", name="New case").click()
        expect(page.get_by_role("button", name="Choose photo")).to_be_visible()
        reachable(page, "button", "Choose photo")
        reachable(page, "button", "Back")
        shots(page, "new-case", page.get_by_text("New case", exact=True),
              page.get_by_role("button", name="Choose photo"))
        with page.expect_file_chooser() as chooser:
            page.get_by_role("button", name="Choose photo").click()
        chooser.value.set_files(str(photo))

        expect(page.get_by_text("On-device answer")).to_be_visible()
        for role, name in (("img", "Your photo with the proposed lesion box"), ("button", "Body site"),
                           ("button", "Since when"), ("checkbox", "It changed in colour"),
                           ("textbox", "Anything else the dermatologist should know"),
                           ("button", "Same spot as an earlier case"), ("button", "Retake"), ("button", "Cancel"),
                           ("button", re.compile("^(Save and send|Send to a dermatologist anyway)$"))):
            reachable(page, role, name)
        shots(page, "answer", page.get_by_text("On-device answer", exact=True),
              page.get_by_role("button", name=re.compile("^(Save and send|Send to a dermatologist anyway)$")))
        send = page.get_by_role("button", name=re.compile("^(Save and send|Send to a dermatologist anyway)$"))
        into_view(page, send)
        send.click()

        expect(page.get_by_role("button", name="Send message")).to_be_visible(timeout=300_000)  # uploaded
        # Waits for the last redraw the upload brings (a redraw replaces the buttons under the clicks).
        expect(page.get_by_text(wording.STATE_TEXT[cases.Status.QUEUED], exact=True)).to_be_visible()
        for role, name in (("button", "Back to my cases"), ("img", "Case photo"), ("textbox", "Message"),
                           ("button", "Send message")):
            reachable(page, role, name)
        send_chat(page, "It has grown a little since the summer.")
        expect(page.get_by_text("It has grown a little since the summer.", exact=False)).to_be_visible()
        shots(page, "case", page.get_by_role("button", name="Back to my cases"),
              page.get_by_text("It has grown a little since the summer.", exact=False))

        # Written with the backend down: kept on the device, shown as waiting, sent once it is back.
        # The backend goes down while the patient is on the home screen, which says when the app has
        # noticed: that redraw is over before they open the case and type (a redraw replaces the
        # controls under the keys and clicks).
        page.get_by_role("button", name="Back to my cases").click()
        expect(page.get_by_role("button", name="New case")).to_be_visible()
        backend.stop()
        expect(page.get_by_text(re.compile("^Offline: "))).to_be_visible()
        page.get_by_role("button", name=re.compile(wording.STATE_TEXT[cases.Status.QUEUED])).click()
        send_chat(page, "And it itches at night.")
        waiting = page.get_by_text(re.compile(r"waiting to send\): And it itches at night\."))
        expect(waiting).to_be_visible()
        shots(page, "case-message-waiting", page.get_by_role("button", name="Back to my cases"), waiting)
        backend.start()
        expect(waiting).to_have_count(0, timeout=300_000)
        expect(page.get_by_text("And it itches at night.", exact=False)).to_be_visible()
        shots(page, "case-message-sent", page.get_by_role("button", name="Back to my cases"),
              page.get_by_text("And it itches at night.", exact=False))
        uid = dl_auth.get_user_by_email(email, settings).uid
        chats = admin_reference(f"messages/{uid}", settings, app_name=f"big-{uuid.uuid4().hex[:6]}").get()
        texts = [m["text"] for chat in chats.values() for m in chat.values()]
        assert sorted(texts) == ["And it itches at night.", "It has grown a little since the summer."]  # once each
        page.get_by_role("button", name="Back to my cases").click()

        expect(page.get_by_role("button", name="New case")).to_be_visible()
        page.get_by_role("button", name="Delete my data").click()
        expect(page.get_by_text("Delete all your data?")).to_be_visible()
        reachable(page, "button", "Keep my data")
        reachable(page, "button", "Delete everything")
        shots(page, "delete-dialog", page.get_by_text("Delete all your data?"),
              page.get_by_role("button", name="Delete everything"))
        page.get_by_role("button", name="Keep my data").click()
        browser.close()
