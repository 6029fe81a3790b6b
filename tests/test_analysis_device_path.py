"""The on-device policy: what is classified, and which instruction the user gets first."""

from __future__ import annotations

import pytest

from dermaloop.analysis import ood, quality
from dermaloop.analysis.device_path import decide


def _report(*issues: str) -> quality.QualityReport:
    return quality.QualityReport(not issues, list(issues))


@pytest.mark.parametrize(("issues", "is_lesion", "force", "classify", "says"), [
    ((), True, False, True, None),
    (("glare",), True, False, True, "glare"),
    (("lesion_too_small",), True, False, True, "Move closer"),
    (("too_dark",), True, False, True, "too dark"),  # corrected, classified, flagged
    (("blurry",), True, False, False, "blurred"),
    (("blurry",), False, False, False, "blurred"),  # blur explains the low lesion score
    ((), False, False, False, "does not look like"),
    (("too_bright",), False, False, False, "over-exposed"),
    (("lesion_too_small",), False, False, False, "Move closer"),  # a distant shot, declined
    (("low_resolution",), True, True, False, "too small"),  # nothing to judge, even when forced
    (("blurry",), False, True, True, "blurred"),
])
def test_policy(issues, is_lesion, force, classify, says):
    ok, message = decide(_report(*issues), is_lesion, force)
    assert ok is classify
    if says is None:
        assert message is None
    else:
        assert says in message
    if not is_lesion and not force and "blurry" not in issues and "low_resolution" not in issues:
        assert message.startswith(ood.MESSAGE)


def test_device_modules_need_only_numpy_and_pillow():
    """Flet's phone builds have numpy and Pillow but not SciPy, scikit-image, scikit-learn or TF."""
    import subprocess
    import sys

    code = ("import sys, dermaloop.analysis.device_path, dermaloop.analysis.device_classifier, "
            "dermaloop.analysis.quality, dermaloop.analysis.ood, dermaloop.analysis.localiser; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'scipy', 'skimage', 'sklearn', 'tensorflow', 'keras', 'matplotlib'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
