"""Localiser: box geometry, auto-crop with margin, EXIF orientation, average precision, and the
trained model on example photos (and on real HAM10000 photos where present)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dermaloop.analysis import localiser
from tests.example_photos import lesion_photo


def test_iou_basics():
    a = np.array([0.0, 0.0, 0.5, 0.5])
    assert localiser.iou(a, a) == pytest.approx(1.0)
    assert localiser.iou(a, np.array([0.5, 0.5, 1.0, 1.0])) == pytest.approx(0.0)
    assert localiser.iou(a, np.array([0.25, 0.0, 0.75, 0.5])) == pytest.approx(1 / 3)


def test_average_precision_ranks_by_confidence_and_counts_misses():
    ious = np.array([0.9, 0.8, 0.3, 0.7])
    # Confident on the good boxes: precision 1 until the miss at rank 4 -> AP = 3/4.
    assert localiser.average_precision(ious, np.array([0.9, 0.8, 0.1, 0.7]), 0.5) == pytest.approx(0.75)
    # The miss ranked first: precision 0 at rank 1, then 1/2, 2/3, 3/4 -> envelope 3/4 for each hit.
    assert localiser.average_precision(ious, np.array([0.1, 0.2, 0.9, 0.3]), 0.5) == pytest.approx(0.75 * 0.75)
    assert localiser.average_precision(ious, np.ones(4), 0.95) == 0.0
    # Sklearn agrees once its recall is rescaled to all images (it only sees the detections).
    from sklearn.metrics import average_precision_score

    scores = np.array([0.9, 0.8, 0.1, 0.7])
    tp = ious >= 0.5
    assert localiser.average_precision(ious, scores, 0.5) == pytest.approx(
        average_precision_score(tp, scores) * tp.mean())


def test_clip_box_repairs_swapped_and_out_of_range_boxes():
    assert localiser.clip_box((0.8, 0.9, 0.2, -0.5)) == pytest.approx((0.2, 0.0, 0.8, 0.9))
    x0, y0, x1, y1 = localiser.clip_box((0.5, 0.5, 0.5, 0.5))
    assert x1 - x0 == pytest.approx(0.01) and y1 - y0 == pytest.approx(0.01)
    with pytest.raises(ValueError, match="non-finite"):
        localiser.clip_box((0.1, float("nan"), 0.5, 0.5))


@pytest.mark.parametrize(("size", "box"), [
    ((400, 300), (0.4, 0.4, 0.6, 0.6)),      # centred
    ((400, 300), (0.0, 0.0, 0.1, 0.2)),      # in a corner: the crop is shifted inside the photo
    ((300, 400), (0.2, 0.7, 0.9, 1.0)),      # portrait, wide box at the bottom
    ((4000, 3000), (0.45, 0.45, 0.47, 0.48)),  # tiny lesion in a big photo
])
def test_crop_is_a_square_around_the_box_with_margin_inside_the_photo(size, box):
    w, h = size
    cx0, cy0, cx1, cy1 = localiser.crop_fractions(size, box, margin=0.15)
    assert (cx1 - cx0) * w == pytest.approx((cy1 - cy0) * h, rel=1e-6)  # square in pixels
    assert 0 <= cx0 < cx1 <= 1 and 0 <= cy0 < cy1 <= 1
    side = max((box[2] - box[0]) * w, (box[3] - box[1]) * h)
    if side * 1.3 <= min(w, h):  # room for the margin: the whole box plus context is in the crop
        assert cx0 <= box[0] and cy0 <= box[1] and cx1 >= box[2] and cy1 >= box[3]
        assert (cx1 - cx0) * w == pytest.approx(max(side * 1.3, 16), rel=1e-6)
    no_box = localiser.crop_fractions(size, None)
    assert (no_box[2] - no_box[0]) * w == pytest.approx(min(w, h))


def test_user_adjustment_moves_and_scales_within_the_frame():
    box = (0.4, 0.4, 0.6, 0.6)
    moved = localiser.adjust_box(box, dx=0.1)
    assert moved == pytest.approx((0.5, 0.4, 0.7, 0.6))
    grown = localiser.adjust_box(box, scale=2.0)
    assert grown == pytest.approx((0.3, 0.3, 0.7, 0.7))
    pushed = localiser.adjust_box(box, dx=0.9)  # kept inside, size preserved
    assert pushed == pytest.approx((0.8, 0.4, 1.0, 0.6))
    with pytest.raises(ValueError):
        localiser.adjust_box(box, scale=0)


def _jpeg_with_orientation(img: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92, exif=exif)
    return buf.getvalue()


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_exif_orientation_puts_the_crop_on_the_lesion(orientation):
    """The camera stores pixels sideways and an EXIF tag; the crop must follow the upright photo."""
    from dermaloop.preprocess import load_image, to_model_input

    upright, box = lesion_photo((400, 300), (0.1, 0.2, 0.35, 0.6))
    # What a phone would store for each orientation: the inverse rotation of the upright view.
    stored = {1: upright, 3: upright.rotate(180, expand=True), 6: upright.rotate(90, expand=True),
              8: upright.rotate(-90, expand=True)}[orientation]
    loaded = load_image(_jpeg_with_orientation(stored, orientation))
    assert loaded.size == upright.size
    crop = to_model_input(loaded, 64, box=box)
    reference = to_model_input(upright, 64, box=box)
    assert np.abs(crop - reference).mean() < 6.0  # same content (JPEG noise only)
    # And the crop is centred on the dark spot.
    centre = crop[24:40, 24:40].mean()
    assert centre < crop.mean() - 20


# --- the trained localiser -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def analysis_model():
    pytest.importorskip("keras")
    from training.analysis_model import HEAD_WEIGHTS, build_analysis_model

    if not HEAD_WEIGHTS.is_file():
        pytest.skip("localiser head weights not trained (python -m training.localiser_train --data DIR)")
    return build_analysis_model()


def _predict(model, img: Image.Image) -> np.ndarray:
    from dermaloop.analysis.features import frame_input

    return np.asarray(model(frame_input(img)[None], training=False))[0]


@pytest.mark.parametrize(("size", "box"), [((400, 300), (0.3, 0.25, 0.7, 0.75)),
                                           ((600, 450), (0.45, 0.2, 0.85, 0.6))])
def test_trained_localiser_finds_the_example_spot(analysis_model, size, box):
    img, true_box = lesion_photo(size, box, seed=3)
    out = _predict(analysis_model, img)
    assert out.shape == (6,) and np.all((out >= 0) & (out <= 1))
    assert localiser.iou(out[:4], np.array(true_box)) > 0.5, (out, true_box)


@pytest.mark.ham10000
def test_trained_localiser_on_held_out_real_photos(analysis_model, ham10000):
    from training.hamdata import lesion_split, read_records

    records = read_records(ham10000)
    _, val = lesion_split(records)
    chosen = [records[i] for i in val[::50][:30]]
    ious = [localiser.iou(_predict(analysis_model, Image.open(r.path).convert("RGB"))[:4], np.array(r.box))
            for r in chosen]
    assert np.mean(ious) > 0.65 and np.mean(np.array(ious) >= 0.5) >= 0.8, ious
