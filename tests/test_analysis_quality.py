"""Quality gate: each check on fixed example photos and, where present, on real HAM10000 photos."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dermaloop.analysis import quality
from tests.example_photos import lesion_photo
from training import degrade


@pytest.fixture(scope="module")
def photo():
    return lesion_photo((400, 300), (0.35, 0.3, 0.65, 0.7))


def test_clean_example_passes(photo):
    img, box = photo
    report = quality.assess(img, box)
    assert report.ok, report.metrics
    assert report.issues == [] and report.to_json() == {"ok": True, "issues": [], "messages": []}


@pytest.mark.parametrize(("name", "make", "expected"), [
    ("gaussian blur", lambda im: degrade.gaussian_blur(im, 0.02), "blurry"),
    ("motion blur", lambda im: degrade.motion_blur(im, 0.06, 30), "blurry"),
    ("gamma 3.0", lambda im: degrade.gamma(im, 3.0), "too_dark"),
    ("gamma 0.3", lambda im: degrade.gamma(im, 0.3), "too_bright"),
    ("flash glare", lambda im: degrade.glare(im, radius_frac=0.1), "glare"),
])
def test_each_degradation_gets_its_own_issue(photo, name, make, expected):
    img, box = photo
    report = quality.assess(make(img), box)
    assert not report.ok
    assert expected in report.issues, (name, report.issues, report.metrics)
    assert quality.MESSAGES[expected] in report.to_json()["messages"]


def test_small_and_off_centre_lesion_from_the_box(photo):
    img, box = photo
    small_img, small_box = degrade.downscale_lesion(img, box, 0.1)
    assert quality.assess(small_img, small_box).issues == ["lesion_too_small"]
    report = quality.assess(img, (0.0, 0.0, 0.3, 0.35))
    assert "lesion_off_centre" in report.issues
    assert "Centre it" in " ".join(report.messages)


def test_tiny_image_is_a_defined_result_not_a_crash():
    report = quality.assess(Image.new("RGB", (20, 10), (200, 150, 130)))
    assert report.issues == ["low_resolution"] and not report.ok


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "I;16", "P"])
def test_any_pillow_mode_is_accepted(photo, mode):
    img, box = photo
    converted = img.convert("L").convert(mode) if mode == "I;16" else img.convert(mode)
    report = quality.assess(converted, box)
    assert isinstance(report.ok, bool)


def test_exposure_correction_moves_towards_typical(photo):
    img, _ = photo
    dark = degrade.gamma(img, 3.0)
    fixed, g = quality.correct_exposure(dark)
    assert g < 1.0
    typical = quality.load_calibration()["typical_median_luminance"]
    med = lambda im: float(np.median(np.asarray(im.convert("L"), np.float32) / 255))  # noqa: E731
    assert abs(med(fixed) - typical) < abs(med(dark) - typical)
    assert "too_dark" not in quality.assess(fixed).issues


def test_white_balance_removes_a_colour_cast(photo):
    img, _ = photo
    arr = np.asarray(img, np.float32)
    cast = Image.fromarray(np.clip(arr * [1.0, 0.8, 0.6], 0, 255).astype(np.uint8))
    balanced = np.asarray(quality.white_balance(cast), np.float32).reshape(-1, 3).mean(0)
    before = arr.reshape(-1, 3).mean(0) * [1.0, 0.8, 0.6]
    assert np.ptp(balanced / balanced.mean()) < np.ptp(before / before.mean())


def test_calibration_file_records_its_evidence():
    cal = quality.load_calibration()
    assert cal["fitted_on"]["clean_flag_rate_per_check"] <= 0.01
    for key in ("blur", "dark", "bright"):
        assert 0.0 < cal[key]["threshold"] < 1.0
    assert "validation" in cal and cal["validation"]["clean"]["n"] >= 100


@pytest.mark.ham10000
def test_real_photos_clean_pass_and_blurred_fail(ham10000):
    from training.hamdata import lesion_split, read_records

    records = read_records(ham10000)
    _, val = lesion_split(records)
    chosen = [records[i] for i in val[::97][:20]]
    clean_ok = blurred = dark = 0
    for rec in chosen:
        img = Image.open(rec.path).convert("RGB")
        clean_ok += quality.assess(img, rec.box).ok
        blurred += "blurry" in quality.assess(degrade.gaussian_blur(img, 0.02), rec.box).issues
        dark += "too_dark" in quality.assess(degrade.gamma(img, 3.0), rec.box).issues
    assert clean_ok >= 17 and blurred >= 18 and dark >= 17, (clean_ok, blurred, dark)
