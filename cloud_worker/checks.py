"""The image checks of the cloud path: the same analysis model and quality gate as the device path
(``dermaloop.analysis``), applied with the same policy, so device and cloud never disagree about
whether a photo is usable:

* not a skin lesion, or too blurred / too small to judge: not classified; the result says why;
* too dark / too bright: exposure corrected (gamma) before cropping, and flagged;
* a confident lesion box: the classifier sees the auto-crop around it, else the centre square.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image

from cloud_worker.pipeline import Checked


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000.0, 1)


class ImageChecks:
    def __init__(self, analyser_path: Path | None) -> None:
        from dermaloop.analysis import quality
        from dermaloop.analysis.device_path import Analyser

        quality.load_calibration()  # fail at start-up, not on the first job, if the gate is not calibrated
        self.analyser = Analyser(analyser_path, threads=1) if analyser_path is not None else None

    @property
    def description(self) -> str:
        return f"quality gate + {'analysis model ' + str(self.analyser.path) if self.analyser else 'no localiser'}"

    def check(self, img: Image.Image) -> Checked:
        from dermaloop.analysis import ood, quality
        from dermaloop.analysis.device_path import BLOCKING_ISSUES, EXPOSURE_ISSUES
        from dermaloop.analysis.localiser import MIN_CONFIDENCE

        timings: dict[str, float] = {}
        box, lesion, is_lesion = None, None, True
        if self.analyser is not None:
            t = time.perf_counter()
            if min(img.size) >= quality.MIN_SIDE:
                raw_box, confidence, score = self.analyser(img)
                is_lesion = bool(np.isfinite(score) and score >= self.analyser.threshold)
                box = [round(float(v), 4) for v in raw_box] if is_lesion and confidence >= MIN_CONFIDENCE else None
                lesion = {"is_lesion": is_lesion, "score": round(float(score), 4)}
            else:
                is_lesion = False
                lesion = {"is_lesion": False, "score": None}
            timings["analyse"] = _ms(t)
        t = time.perf_counter()
        report = quality.assess(img, tuple(box) if box else None)
        timings["quality"] = _ms(t)
        checked = Checked(img, report.to_json(), lesion, box, timings_ms=timings)
        if not is_lesion:
            checked.classify, checked.message = False, ood.MESSAGE
        elif set(report.issues) & BLOCKING_ISSUES:
            checked.classify, checked.message = False, " ".join(report.messages)
        else:
            if set(report.issues) & EXPOSURE_ISSUES:
                checked.image, _ = quality.correct_exposure(img)
            if report.issues:
                checked.message = " ".join(report.messages)
        return checked


def load_checks(models_dir: Path) -> ImageChecks:
    """The checks with the newest analysis model under ``models_dir/localiser`` (built by
    ``dermaloop diagnose`` or the run command); the quality gate alone where there is none."""
    from training.localiser_train import find_localiser

    return ImageChecks(find_localiser(models_dir))
