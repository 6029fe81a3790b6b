"""The patient's "delete my data" (issue 17), for the UI to call.

The rules let nobody delete, so the app asks: :func:`request_erasure` creates the patient's request
``/erasures/{uid}`` (``dermaloop.cases.erasure_request``), and a server program (the cloud worker's
``cloud_worker/erasure.py``) removes the cases, photos, heatmaps, messages, queue and job entries, the
user record and the Auth account, and writes ``state: done`` on the request. :func:`erasure_state`
reads how far it got and :func:`wait_until_done` polls until it is done, then forgets the patient on
this device (``LocalStore.remove_user``, and the consent record if given).

The account goes before ``done`` is written, and from then on the backend may refuse the patient's
ID token (localbase does at once; Firebase once the token expires or cannot be refreshed). After a
request, such a refusal means exactly that: the account is deleted, and with it the data
(:data:`ACCOUNT_DELETED`). Labels already frozen into a released training set are the one thing
that is not taken back (the consent screen says so).

Nothing here stops the sync engine: the UI stops it before asking (``SyncEngine.stop()``), so no
photo is sent meanwhile. :func:`request_erasure` also holds back every case that is still only on
this device (it is marked failed, with a reason, and removed with the rest once the erasure is done).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from client.store import LocalStore
from dermaloop import cases
from dermaloop.auth import UserSession
from dermaloop.cases import ErasureState
from dermaloop.database import UserDatabase
from dermaloop.errors import PermissionDenied, ServiceError, Unauthenticated, Unavailable
from dermaloop.settings import Settings

__all__ = [
    "ACCOUNT_DELETED", "DONE", "NOT_REQUESTED", "OFFLINE", "REQUESTED", "RUNNING", "STATUS_TEXT",
    "ErasureStatus", "erasure_state", "request_erasure", "wait_until_done",
]

# ErasureStatus.state
NOT_REQUESTED = "not_requested"
REQUESTED = ErasureState.REQUESTED.value  # asked, not started yet
RUNNING = ErasureState.RUNNING.value  # being deleted now
DONE = ErasureState.DONE.value  # the server says everything is gone
ACCOUNT_DELETED = "account_deleted"  # the token is refused after a request: the account is gone
OFFLINE = "offline"  # cannot reach the service to ask; trying again

STATUS_TEXT = {
    NOT_REQUESTED: "You have not asked us to delete your data.",
    REQUESTED: "We have your request to delete your data. It starts in a moment.",
    RUNNING: "Your data is being deleted now: your cases, photos, messages and account.",
    DONE: "All your data has been deleted: your cases, photos, messages and your account.",
    ACCOUNT_DELETED: "Your account has been deleted, and your cases, photos and messages with it.",
    OFFLINE: "No connection. Your request is kept; we check again when you are back online.",
}
TRAINING_NOTE = ("Labels already frozen into a released training set, if you allowed research use, "
                 "are not taken back out of that release.")
HELD_BACK = "Not sent: you asked for all your data to be deleted."


@dataclass(frozen=True)
class ErasureStatus:
    """Where the patient's erasure stands, with a sentence in plain words for the UI (:attr:`text`)."""

    state: str
    requested_at: int | None = None
    done_at: int | None = None
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        """Nothing of the patient is left on the server (the local store may still hold it)."""
        return self.state in (DONE, ACCOUNT_DELETED)

    @property
    def text(self) -> str:
        words = STATUS_TEXT.get(self.state, STATUS_TEXT[REQUESTED])
        return f"{words} {TRAINING_NOTE}" if self.finished else words

    @staticmethod
    def from_record(record: Any) -> ErasureStatus:
        state = cases.erasure_state(record)
        if state is None:
            return ErasureStatus(NOT_REQUESTED)
        counts = record.get("counts")
        return ErasureStatus(
            state.value, _int(record.get("requestedAt")), _int(record.get("doneAt")),
            {k: int(v) for k, v in counts.items() if isinstance(v, int | float)} if isinstance(counts, dict) else {})


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) else None


def _db(session: UserSession, settings: Settings, db: UserDatabase | None) -> UserDatabase:
    return db if db is not None else UserDatabase(session, settings)


def _account_gone(session: UserSession) -> bool:
    """Whether Auth says the session's user no longer exists (asked with the token held, which
    Auth answers USER_NOT_FOUND for a deleted account; anything else, offline included, is no)."""
    token = session.to_dict().get("id_token")
    if not token:
        return False
    try:
        session.client.lookup(token)
    except ServiceError as exc:
        return getattr(exc, "code", None) == "USER_NOT_FOUND"
    return False


def request_erasure(session: UserSession, settings: Settings, store: LocalStore | None = None, *,
                    db: UserDatabase | None = None) -> ErasureStatus:
    """Ask the service to delete all of the signed-in patient's data and their account.

    Safe to repeat (a request that is already there is simply read back). Every case still only on
    this device is held back from sending (marked failed with :data:`HELD_BACK`). Returns the status
    right after asking. Raises :class:`~dermaloop.errors.Unavailable` offline (nothing was asked:
    ask again later) and :class:`~dermaloop.errors.Unauthenticated` when the session has ended
    (sign in again first)."""
    db = _db(session, settings, db)
    path = cases.erasure_path(session.uid)
    try:
        db.set(path, cases.erasure_request())
    except Unauthenticated:
        if _account_gone(session):  # e.g. a repeat after the erasure already removed the account
            return ErasureStatus(ACCOUNT_DELETED)
        raise
    except PermissionDenied:
        # Requests are create-only: a repeat after a lost answer (or from another device) is refused.
        existing = db.get(path)
        if cases.erasure_state(existing) is None:
            raise
    if store is not None:
        for case in store.pending(session.uid):
            store.mark_failed(session.uid, case.case_id, HELD_BACK)
    return erasure_state(session, settings, db=db, requested=True)


def erasure_state(session: UserSession, settings: Settings, *, db: UserDatabase | None = None,
                  requested: bool = False) -> ErasureStatus:
    """The patient's erasure as the server has it. ``requested``: the caller knows a request was
    made, so a refused token means the account is deleted (:data:`ACCOUNT_DELETED`) rather than a
    session to renew; without it that is assumed only when Auth says the user no longer exists.
    Raises :class:`~dermaloop.errors.Unavailable` offline."""
    try:
        record = _db(session, settings, db).get(cases.erasure_path(session.uid))
    except Unauthenticated:
        if requested or _account_gone(session):
            return ErasureStatus(ACCOUNT_DELETED)
        raise
    return ErasureStatus.from_record(record)


def wait_until_done(session: UserSession, settings: Settings, store: LocalStore, *,
                    consent: Any = None, poll_s: float = 1.0, timeout: float | None = None,
                    on_status: Callable[[ErasureStatus], None] | None = None,
                    stop: threading.Event | None = None, db: UserDatabase | None = None) -> ErasureStatus:
    """Read the request until the erasure is finished, then forget the patient on this device
    (``store.remove_user``; ``consent.forget`` for a :class:`client.consent.ConsentStore`).

    Call it after :func:`request_erasure` (a refused token counts as the account being deleted).
    ``on_status`` hears every change of state (from this thread); offline it reports
    :data:`OFFLINE` and keeps trying. Returns the last status: finished, or not yet when
    ``timeout`` seconds passed or ``stop`` was set (the request stands; call again later)."""
    db = _db(session, settings, db)
    deadline = None if timeout is None else time.monotonic() + timeout
    stop = stop or threading.Event()
    last: ErasureStatus | None = None
    while True:
        try:
            status = erasure_state(session, settings, db=db, requested=True)
        except Unavailable:
            status = ErasureStatus(OFFLINE)
        if on_status is not None and (last is None or status.state != last.state):
            on_status(status)
        last = status
        if status.finished:
            store.remove_user(session.uid)
            if consent is not None:
                consent.forget(session.uid)
            return status
        if status.state == NOT_REQUESTED:
            return status  # nothing asked (yet): nothing to wait for
        if deadline is not None and time.monotonic() >= deadline:
            return status
        if stop.wait(poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic()))):
            return status
