"""Staying signed in per browser (``client.remember``) against a real localbase: a browser's key
gives back its own patient's session and no other, renewed tokens are kept under it, signing out
and "delete my data" forget it, a revoked refresh token ends it, and offline it stays."""

from __future__ import annotations

import secrets
import time
import uuid

import pytest

from client.remember import SESSION_ENDED, RememberedSessions
from client.store import LocalStore
from dermaloop import auth as dl_auth
from dermaloop.auth import AuthClient
from dermaloop.database import UserDatabase
from dermaloop.http import RetryPolicy
from dermaloop.settings import load_settings
from localbase.tokens import mint_id_token
from tests.browser_support import free_port

FAST = RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.05)
PASSWORD = "patient-pass-1"


@pytest.fixture(scope="module")
def settings(localbase):
    return localbase.settings(database_url="https://client-remember-default-rtdb.firebaseio.com")


@pytest.fixture
def store(tmp_path):
    with LocalStore(tmp_path / "device") as s:
        yield s


def sign_up(settings):
    return AuthClient(settings, retry=FAST).sign_up(f"remember-{uuid.uuid4().hex[:8]}@example.com", PASSWORD)


def test_each_browser_key_gives_back_its_own_session_only(settings, store):
    remembered = RememberedSessions(store, AuthClient(settings, retry=FAST))
    alice, bob = sign_up(settings), sign_up(settings)
    alice_key, bob_key = remembered.remember(alice), remembered.remember(bob)
    assert alice_key != bob_key and len(alice_key) >= 40

    # "after a reload or a restart": a new RememberedSessions, as a new app process makes
    again = RememberedSessions(store, AuthClient(settings, retry=FAST))
    back = again.restore(alice_key)
    assert (back.uid, back.email, back.refresh_token) == (alice.uid, alice.email, alice.refresh_token)
    assert again.restore(bob_key).uid == bob.uid
    for unknown in (None, "", secrets.token_urlsafe(32), alice_key[:-1]):
        assert again.restore(unknown) is None
    # the restored session works, without the password
    db = UserDatabase(back, settings, retry=FAST)
    db.set(f"users/{alice.uid}/displayName", "Back again")
    assert db.get(f"users/{alice.uid}/displayName") == "Back again"
    assert again.check(alice_key, back).ended is False


def test_renewed_tokens_are_kept_under_the_key(settings, store):
    remembered = RememberedSessions(store, AuthClient(settings, retry=FAST))
    session = sign_up(settings)
    key = remembered.remember(session)
    restored = remembered.restore(key)
    stale = mint_id_token(settings.project_id, session.uid, now=time.time() - 7200)
    restored._id_token, restored.expires_at = stale, 0  # due: the next use renews it
    fresh = restored.id_token()
    assert fresh != stale and store.load_session(key)["id_token"] == fresh


def test_sign_out_and_erasure_forget_the_session(settings, store):
    remembered = RememberedSessions(store, AuthClient(settings, retry=FAST))
    alice, bob = sign_up(settings), sign_up(settings)
    first, second, bobs = remembered.remember(alice), remembered.remember(alice), remembered.remember(bob)
    remembered.forget(first)  # signed out in one browser
    assert remembered.restore(first) is None and remembered.restore(second).uid == alice.uid
    store.remove_user(alice.uid)  # "delete my data": every browser of hers forgets her
    assert remembered.restore(second) is None and remembered.restore(bobs).uid == bob.uid


def test_a_revoked_refresh_token_ends_the_session(settings, store):
    remembered = RememberedSessions(store, AuthClient(settings, retry=FAST))
    session = sign_up(settings)
    key = remembered.remember(session)
    time.sleep(1.1)  # revocation has one-second resolution: the session's tokens must be older
    dl_auth.revoke(session.uid, settings)
    restored = remembered.restore(key)
    check = remembered.check(key, restored)
    assert check.ended and check.message == SESSION_ENDED and "sign in again" in check.message
    assert store.load_session(key) is None and remembered.restore(key) is None


def test_a_saved_copy_that_cannot_be_read_is_forgotten(settings, store):
    remembered = RememberedSessions(store, AuthClient(settings, retry=FAST))
    key = secrets.token_urlsafe(32)
    store.save_session(key, {"uid": "someone"})  # no refresh token
    assert remembered.restore(key) is None and store.load_session(key) is None


def test_offline_the_restored_session_stays(settings, store):
    session = sign_up(settings)
    key = RememberedSessions(store, AuthClient(settings)).remember(session)
    host, ports = "127.0.0.1", {"database": free_port(), "storage": free_port(), "auth": free_port()}
    offline = RememberedSessions(store, AuthClient(load_settings(environ={}).with_local_backend(host, ports),
                                                   retry=FAST))
    restored = offline.restore(key)
    assert restored.uid == session.uid
    assert offline.check(key, restored).ended is False  # cannot ask: the app goes on offline
    assert store.load_session(key)["refresh_token"] == session.refresh_token
