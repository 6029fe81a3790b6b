"""First-run model preparation for ``dermaloop run`` (and ``diagnose`` on a bare machine): both need
Keras, so they live with training and are named, not imported, by ``dermaloop.services.PREPARE``."""

from __future__ import annotations

from typing import Any

from dermaloop.settings import Settings


def starter_models(settings: Settings, options: dict[str, Any]) -> str:
    from training.starter import ensure_starter_models

    model_dir = ensure_starter_models(settings.models_dir, options.get("ham10000"))
    return f"Models: {model_dir}"


def analysis_model(settings: Settings, options: dict[str, Any]) -> str:
    """The device analysis model (lesion box + not-skin check) the worker and ``diagnose`` use."""
    from training.localiser_train import ensure_localiser

    return f"Image-analysis model: {ensure_localiser(settings.models_dir)}"
