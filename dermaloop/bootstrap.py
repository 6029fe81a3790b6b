"""First-run preparation for ``dermaloop run`` that the shared library can do itself: demo accounts.

Model preparation needs Keras and lives in ``training.prepare``; ``dermaloop.services`` names both.
"""

from __future__ import annotations

from typing import Any

from dermaloop.settings import Settings

# Demo sign-ins printed by the run command. They exist only on the embedded backend.
DEMO_ACCOUNTS = (
    {"email": "patient@dermaloop.test", "password": "patient-demo-1", "role": "patient", "display_name": "Demo Patient"},
    {"email": "derm@dermaloop.test", "password": "derm-demo-1", "role": "dermatologist", "display_name": "Dr Demo"},
)


def demo_accounts(settings: Settings, options: dict[str, Any]) -> str:
    from dermaloop import auth
    from dermaloop.errors import ServiceError

    for account in DEMO_ACCOUNTS:
        try:  # already there with its role: leave it alone (a password reset signs everyone out)
            session = auth.AuthClient(settings).sign_in(account["email"], account["password"])
            if session.role == account["role"]:
                continue
        except ServiceError:
            pass
        auth.create_user(settings=settings, **account)
    return "Demo sign-ins: " + "; ".join(f"{a['role']} {a['email']} / {a['password']}" for a in DEMO_ACCOUNTS)
