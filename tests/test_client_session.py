"""Sessions that survive an app restart, token renewal, and the role claim (real localbase)."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from dermaloop import auth as dl_auth
from dermaloop.auth import AuthClient, AuthError, UserSession
from dermaloop.database import UserDatabase
from dermaloop.errors import Unauthenticated
from dermaloop.http import RetryPolicy
from dermaloop.storage import UserStorage
from localbase.tokens import mint_id_token

FAST = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05)
PASSWORD = "secret123"


@pytest.fixture(scope="module")
def settings(localbase):
    return localbase.settings(database_url="https://client-session-default-rtdb.firebaseio.com")


def new_user(settings, role: str = "patient") -> tuple[str, str]:
    email = f"session-{uuid.uuid4().hex[:8]}@example.com"
    user, _ = dl_auth.create_user(email, PASSWORD, role, settings=settings)
    return user.uid, email


def test_a_saved_session_continues_in_a_new_client(settings, tmp_path):
    uid, email = new_user(settings)
    session = AuthClient(settings).sign_in(email, PASSWORD)
    saved = tmp_path / "session.json"
    saved.write_text(json.dumps(session.to_dict()))
    assert set(json.loads(saved.read_text())) >= {"uid", "email", "refresh_token", "id_token", "expires_at"}

    # "after a restart": a new client, no password
    restored = AuthClient(settings, retry=FAST).restore(json.loads(saved.read_text()))
    assert (restored.uid, restored.email, restored.refresh_token) == (uid, email, session.refresh_token)
    db = UserDatabase(restored, settings, retry=FAST)
    db.set(f"users/{uid}/displayName", "Restored")
    assert db.get(f"users/{uid}/displayName") == "Restored"
    assert restored.id_token() == session.id_token()  # still valid: no refresh was needed


def test_an_expired_restored_token_refreshes_itself(settings):
    uid, email = new_user(settings)
    data = AuthClient(settings).sign_in(email, PASSWORD).to_dict()
    stale = mint_id_token(settings.project_id, uid, now=time.time() - 7200)
    data.update(id_token=stale, expires_at=time.time() - 3600)
    renewals: list[UserSession] = []
    restored = AuthClient(settings, retry=FAST).restore(data, on_change=renewals.append)
    db = UserDatabase(restored, settings, retry=FAST)
    db.set(f"users/{uid}/displayName", "Fresh")
    fresh = restored.id_token()
    assert fresh != stale and restored.expires_at > time.time() + 3000
    assert renewals == [restored]  # the app hears about it, to save the new tokens
    assert restored.to_dict()["id_token"] == fresh

    # restored without any ID token: the first use fetches one
    bare = AuthClient(settings).restore({"uid": uid, "refresh_token": data["refresh_token"]})
    assert bare.claims["sub"] == uid and bare.expires_at > time.time()


def test_a_token_the_server_calls_expired_is_renewed_once(settings):
    """The session's clock says the token is fine, the server says expired: one renewal, then on."""
    uid, email = new_user(settings)
    session = AuthClient(settings).sign_in(email, PASSWORD)
    session._id_token = mint_id_token(settings.project_id, uid, now=time.time() - 7200)  # expired, unknown to the session
    db = UserDatabase(session, settings, retry=FAST)
    db.set(f"users/{uid}/displayName", "Renewed")
    assert db.get(f"users/{uid}/displayName") == "Renewed"
    files = UserStorage(session, settings, retry=FAST)
    session._id_token = mint_id_token(settings.project_id, uid, now=time.time() - 7200)
    meta = files.upload(f"cases/{uid}/c1/image.jpg", b"\xff\xd8\xff\xe0" + b"x" * 1000, "image/jpeg")
    assert int(meta["size"]) == 1004


def test_a_bogus_or_revoked_refresh_token_is_unauthenticated(settings):
    uid, email = new_user(settings)
    bogus = AuthClient(settings, retry=FAST).restore({"uid": uid, "refresh_token": "bogus", "expires_at": 0})
    with pytest.raises(Unauthenticated) as info:
        bogus.id_token()
    assert isinstance(info.value, AuthError) and info.value.code == "INVALID_REFRESH_TOKEN"
    with pytest.raises(Unauthenticated):
        UserDatabase(bogus, settings, retry=FAST).get(f"users/{uid}")

    data = AuthClient(settings).sign_in(email, PASSWORD).to_dict()
    time.sleep(1.1)  # validSince has one-second resolution
    dl_auth.revoke(uid, settings)
    data["expires_at"] = 0
    revoked = AuthClient(settings, retry=FAST).restore(data)
    with pytest.raises(Unauthenticated) as info:
        revoked.id_token()
    assert info.value.code == "TOKEN_EXPIRED"

    with pytest.raises(ValueError):
        AuthClient(settings).restore({"uid": uid})


def test_the_role_claim(settings):
    uid, email = new_user(settings, role="dermatologist")
    session = AuthClient(settings).sign_in(email, PASSWORD)
    assert session.role == "dermatologist"
    assert session.claims["sub"] == uid and session.claims["email"] == email
    dl_auth.set_role(uid, "admin", settings)
    assert session.role == "dermatologist"  # a claim changes with the next token
    session.force_refresh()
    assert session.role == "admin"
    restored = AuthClient(settings).restore(session.to_dict())
    assert restored.role == "admin"  # read from the saved token, no network needed
    no_role = AuthClient(settings).sign_up(f"plain-{uuid.uuid4().hex[:8]}@example.com", PASSWORD)
    assert no_role.role is None
