"""First-run preparation for ``dermaloop run``: demo accounts and starter models (both idempotent)."""

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

    for account in DEMO_ACCOUNTS:
        auth.create_user(settings=settings, **account)
    return "Demo sign-ins: " + "; ".join(f"{a['role']} {a['email']} / {a['password']}" for a in DEMO_ACCOUNTS)


def starter_models(settings: Settings, options: dict[str, Any]) -> str:
    from training.starter import ensure_starter_models

    model_dir = ensure_starter_models(settings.models_dir, options.get("ham10000"))
    return f"Models: {model_dir}"


def analysis_model(settings: Settings, options: dict[str, Any]) -> str:
    """The device analysis model (lesion box + not-skin check) the worker and ``diagnose`` use."""
    from training.localiser_train import ensure_localiser

    return f"Image-analysis model: {ensure_localiser(settings.models_dir)}"
