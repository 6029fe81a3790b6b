"""The image checks of the cloud path: the same analysis model and quality gate as the device path
(``dermaloop.analysis``), applied with the same policy, so device and cloud never disagree about
whether a photo is usable:

* not a skin lesion, or too blurred / too small to judge: not classified; the result says why;
* too dark / too bright: exposure corrected (gamma) before cropping, and flagged;
* a confident lesion box: the classifier sees the auto-crop around it, else the centre square.

The checks themselves are ``DevicePath.inspect``: one implementation for both paths.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from cloud_worker.pipeline import Checked


class ImageChecks:
    def __init__(self, analyser_path: Path | None) -> None:
        from dermaloop.analysis import quality
        from dermaloop.analysis.device_path import Analyser, DevicePath

        quality.load_calibration()  # fail at start-up, not on the first job, if the gate is not calibrated
        # Photos are checked by the download pool's threads: one interpreter per core can run at once.
        copies = max(1, len(os.sched_getaffinity(0)))
        self.analyser = Analyser(analyser_path, threads=1, copies=copies) if analyser_path is not None else None
        self.path = DevicePath(self.analyser, classifier=None)

    @property
    def description(self) -> str:
        return f"quality gate + {'analysis model ' + str(self.analyser.path) if self.analyser else 'no localiser'}"

    def check(self, img: Image.Image) -> Checked:
        seen = self.path.inspect(img)
        lesion = None
        if self.analyser is not None:
            score = None if not np.isfinite(seen.score) else round(float(seen.score), 4)
            lesion = {"is_lesion": seen.is_lesion, "score": score}
        box = None if seen.box is None else [round(float(v), 4) for v in seen.box]
        return Checked(seen.image, seen.report.to_json(), lesion, box, classify=seen.classify,
                       message=seen.message, timings_ms={k: round(v, 1) for k, v in seen.timings_ms.items()})


def load_checks(models_dir: Path) -> ImageChecks:
    """The checks with the newest analysis model under ``models_dir/localiser`` (built by
    ``dermaloop diagnose`` or the run command); the quality gate alone where there is none."""
    from dermaloop.analysis.on_device import find_analysis_model

    return ImageChecks(find_analysis_model(models_dir))
