"""First-run model preparation for ``dermaloop run`` (and ``diagnose`` on a bare machine): both need
Keras, so they live with training and are named, not imported, by ``dermaloop.services.PREPARE``."""

from __future__ import annotations

from typing import Any

from dermaloop.settings import Settings


def starter_models(settings: Settings, options: dict[str, Any]) -> str:
    """The models a first run serves: a model already under the models dir; else a starter trained
    on the HAM10000 folder given; else the release model shipped in ``models/release``; else (or
    with ``--synthetic``) a demonstration starter trained on synthetic images."""
    from dermaloop.model_dir import ModelDir, is_demonstration, newest_model_dir
    from training.starter import ensure_starter_models, install_release

    model_dir = newest_model_dir(settings.models_dir)
    ham10000 = options.get("ham10000")
    if model_dir is None and not ham10000 and not options.get("synthetic"):
        model_dir = install_release(settings.models_dir)
    if model_dir is None:
        model_dir = ensure_starter_models(settings.models_dir, ham10000)
    if is_demonstration(ModelDir.open(model_dir).card):
        return (f"Models: {model_dir} - a DEMONSTRATION model trained on synthetic images: its answers mean "
                "nothing medically and it gives no risk tier")
    return f"Models: {model_dir}"


def analysis_model(settings: Settings, options: dict[str, Any]) -> str:
    """The device analysis model (lesion box + not-skin check) the worker and ``diagnose`` use."""
    from training.localiser_train import ensure_localiser

    return f"Image-analysis model: {ensure_localiser(settings.models_dir)}"
