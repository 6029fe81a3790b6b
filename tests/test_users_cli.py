"""``dermaloop users``: the real command in a subprocess, against localbase, checked with firebase-admin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

from firebase_admin import auth as admin_auth

from dermaloop import admin_app
from dermaloop.auth import AuthClient
from dermaloop.settings import PROJECT_ROOT
from localbase import tokens


def run_cli(localbase, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FIREBASE_", "STORAGE_EMULATOR", "GOOGLE_"))}
    env.update(localbase.settings().emulator_env())
    return subprocess.run([sys.executable, "-m", "dermaloop", "users", *args], capture_output=True, text=True,
                          env=env, cwd=PROJECT_ROOT, timeout=120)


def test_add_is_idempotent_and_sets_the_role_claim(localbase):
    email = f"derm-{uuid.uuid4().hex[:8]}@example.com"
    first = run_cli(localbase, "add", "--email", email, "--password", "secret123", "--role", "dermatologist",
                    "--display-name", "Dr D")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith(f"created {email}")
    app = admin_app.get_app(localbase.settings())
    user = admin_auth.get_user_by_email(email, app=app)
    assert user.custom_claims == {"role": "dermatologist"} and user.display_name == "Dr D"

    again = run_cli(localbase, "add", "--email", email, "--password", "secret456", "--role", "dermatologist")
    assert again.returncode == 0 and again.stdout.startswith(f"updated {email}")
    assert admin_auth.get_user_by_email(email, app=app).uid == user.uid  # same account, not a second one

    session = AuthClient(localbase.settings()).sign_in(email, "secret456")
    assert tokens.decode_unverified(session.id_token())["role"] == "dermatologist"

    changed = run_cli(localbase, "set-role", "--email", email, "--role", "admin")
    assert changed.returncode == 0, changed.stderr
    assert admin_auth.get_user(user.uid, app=app).custom_claims == {"role": "admin"}
    assert tokens.decode_unverified(session.force_refresh())["role"] == "admin"

    listed = run_cli(localbase, "list", "--json")
    assert listed.returncode == 0
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert {"uid": user.uid, "email": email, "role": "admin", "displayName": "Dr D", "disabled": False} in rows


def test_errors_are_reported_with_a_nonzero_exit(localbase):
    weak = run_cli(localbase, "add", "--email", "weak@example.com", "--password", "123", "--role", "patient")
    assert weak.returncode == 1 and "password" in weak.stderr.lower()
    bad_role = run_cli(localbase, "add", "--email", "x@example.com", "--password", "secret123", "--role", "god")
    assert bad_role.returncode == 2 and "invalid choice" in bad_role.stderr
    missing = run_cli(localbase, "set-role", "--email", f"nobody-{uuid.uuid4().hex[:6]}@example.com", "--role", "admin")
    assert missing.returncode == 1 and "no account" in missing.stderr
