"""The on-device answer, opened in one call: photo in -> quality, lesion box, not-a-lesion score,
top 3, risk tier and per-step timings out.

The patient app, ``dermaloop diagnose`` and the cloud worker's photo checks all start here, so the
three never wire the quality gate, the analysis model (localiser + not-skin) and the device
classifier differently. Everything it loads is a TFLite file run by the small interpreter in
``dermaloop.model_dir.make_interpreter``: no Keras and no TensorFlow, which a phone build cannot
carry (a test imports it in a fresh process and checks neither was loaded). Building a missing
analysis model needs Keras and is training's job (``dermaloop run`` prepares it).
"""

from __future__ import annotations

from pathlib import Path

from dermaloop.analysis.device_classifier import load_device_classifier
from dermaloop.analysis.device_path import Analyser, DevicePath

ANALYSIS_FILES = ("analysis_fp32.tflite", "analysis_int8.tflite")  # preference order


class AnalysisModelMissing(FileNotFoundError):
    """No analysis model under the models directory (``dermaloop run`` builds one on first start)."""


def find_analysis_model(models_dir: str | Path) -> Path | None:
    """The newest analysis model under ``models_dir/localiser/<version>/`` (float32 preferred: it meets
    the localisation targets; int8 is the smaller, faster option), if any."""
    root = Path(models_dir) / "localiser"
    if not root.is_dir():
        return None
    for name in ANALYSIS_FILES:
        found = sorted(root.glob(f"*/{name}"), key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1]
    return None


def open_analyser(models_dir: str | Path | None = None, analysis_model: str | Path | None = None, *,
                  threads: int = 1, copies: int = 1) -> Analyser:
    """The analysis model given, else the newest one under ``models_dir``."""
    path = Path(analysis_model) if analysis_model is not None else None
    if path is None and models_dir is not None:
        path = find_analysis_model(models_dir)
    if path is None:
        raise AnalysisModelMissing(
            f"no image-analysis model under {Path(models_dir or '.') / 'localiser'}: `dermaloop run` builds it on "
            "first start, or run `python -m training.localiser_train --export MODELS_DIR`")
    if not path.is_file():
        raise AnalysisModelMissing(f"{path} does not exist")
    return Analyser(path, threads=threads, copies=copies)


def open_device_path(models_dir: str | Path | None = None, model_dir: str | Path | None = None, *,
                     analysis_model: str | Path | None = None, localise: bool = True,
                     threads: int = 1) -> DevicePath:
    """The whole on-device path.

    ``model_dir``: a model directory (``dermaloop train --out``); without it the newest one under
    ``models_dir`` with a device model. With no classifier at all the path still runs the photo
    checks and says so in its message. ``localise=False`` skips the analysis model (centre square,
    no not-skin check). Raises ``AnalysisModelMissing``, ``FileNotFoundError`` or
    ``dermaloop.model_dir.ModelError`` when a file it was asked for is not usable."""
    analyser = open_analyser(models_dir, analysis_model, threads=threads) if localise else None
    classifier = load_device_classifier(model_dir, models_dir, threads=threads)
    return DevicePath(analyser, classifier)
