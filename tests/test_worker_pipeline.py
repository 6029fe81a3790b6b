"""The worker's processing steps without Firebase: poison inputs get the right reasons, batched
inference and Grad-CAM agree with one-at-a-time, declined photos are not classified, triage order."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cloud_worker import triage
from cloud_worker.errors import JobError
from cloud_worker.model import load_model
from cloud_worker.pipeline import Checked, NoAnalysis, infer, prepare, record
from tests.worker_support import lesion_jpeg, png_header_only, tiny_model_dir


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(tiny_model_dir(tmp_path_factory.mktemp("m") / "tiny"))


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "not_an_image"),
    (b"GIF89a not really", "not_an_image"),
    (b"hello, this is text\n" * 10, "not_an_image"),
    (lesion_jpeg(1)[:1500], "corrupt_image"),
    (png_header_only(20000, 20000), "image_too_large"),
], ids=["zero-bytes", "fake-gif", "text", "truncated-jpeg", "huge-png-header"])
def test_poison_inputs_are_permanent_failures_with_a_reason(data, reason):
    with pytest.raises(JobError) as err:
        prepare(data, NoAnalysis())
    assert err.value.reason == reason and err.value.permanent and err.value.detail


def test_a_batch_gives_the_same_answers_as_one_at_a_time(model):
    items = [prepare(lesion_jpeg(s), NoAnalysis()) for s in range(5)]
    batched = infer(model, items)
    single = [infer(model, [prepare(lesion_jpeg(s), NoAnalysis())])[0] for s in range(5)]
    for b, s in zip(batched, single, strict=True):
        np.testing.assert_allclose(b.probs, s.probs, atol=1e-5)
        np.testing.assert_allclose(b.heatmap, s.heatmap, atol=1e-4)
    assert all(item.timings_ms["batch"] == 5 for item in items)


def test_batched_grad_cam_matches_the_analysis_module(model):
    from dermaloop.analysis.gradcam import grad_cam

    items = [prepare(lesion_jpeg(s), NoAnalysis()) for s in (3, 4)]
    results = infer(model, items)
    for item, result in zip(items, results, strict=True):
        ref = grad_cam(model.inner.model, item.pixels, int(np.argmax(result.probs)))
        assert result.heatmap.shape == ref.heatmap.shape
        assert result.heatmap.min() >= 0.0 and result.heatmap.max() <= 1.0
        # The cloud model averages test-time flips for probabilities; Grad-CAM explains the plain view.
        np.testing.assert_allclose(result.heatmap, ref.heatmap, atol=1e-4)


def test_the_record_and_the_heatmap_follow_the_cards_decision_rule(model, tmp_path):
    """With class offsets in the card (``dermaloop train --class-recall``) the worker lists the call
    first and Grad-CAM explains the call; the calibrated probabilities and the risk are unchanged."""
    from dermaloop.analysis.gradcam import grad_cam
    from dermaloop.taxonomy import load_taxonomy

    df = load_taxonomy("ham10000").ids.index("df")
    offsets = tuple(30.0 if i == df else 0.0 for i in range(7))  # so large that df is always the call
    biased = load_model(tiny_model_dir(tmp_path / "biased", class_offsets=offsets))  # same weights (seed 0)
    items = [prepare(lesion_jpeg(s), NoAnalysis()) for s in (3, 4)]
    plain, called = infer(model, items), infer(biased, items)
    for item, a, b in zip(items, plain, called, strict=True):
        assert int(np.argmax(a.probs)) != df  # the premise: df is not simply the most probable class
        np.testing.assert_allclose(b.probs, a.probs, atol=1e-6)
        rec, ref = record(item, b, None, 1), record(item, a, None, 1)
        assert rec["top"][0]["label"] == "df" and ref["top"][0]["label"] != "df"
        assert (rec["risk"], rec["malignantP"]) == (ref["risk"], ref["malignantP"])
        np.testing.assert_allclose(b.heatmap, grad_cam(biased.inner.model, item.pixels, df).heatmap, atol=1e-4)
        assert not np.allclose(b.heatmap, a.heatmap, atol=1e-3)


class _Declines:
    def check(self, img: Image.Image) -> Checked:
        return Checked(img, {"ok": False, "issues": ["blurry"]}, {"is_lesion": True, "score": 0.9}, None,
                       classify=False, message="Hold the phone steady.")


def test_declined_photos_are_not_classified_but_their_batch_mates_are(model):
    items = [prepare(lesion_jpeg(1), _Declines()), prepare(lesion_jpeg(2), NoAnalysis())]
    declined, classified = infer(model, items)
    assert declined.probs is None and classified.probs is not None
    rec = record(items[0], declined, None, 123)
    assert rec["top"] == [] and rec["risk"] is None and rec["message"] == "Hold the phone steady."
    assert rec["quality"] == {"ok": False, "issues": ["blurry"]}
    ok = record(items[1], classified, None, 123)
    assert len(ok["top"]) == 3 and ok["risk"] in ("low", "moderate", "high") and ok["quality"] is None


def test_triage_order():
    flat = np.full(7, 1 / 7)
    sure = np.array([0.94] + [0.01] * 6)
    now = 1_800_000_000_000
    high = triage.score(triage.urgency("high", 0.8, sure, False), now, now)
    low = triage.score(triage.urgency("low", 0.05, sure, False), now, now)
    unsure = triage.score(triage.urgency("low", 0.05, flat, False), now, now)
    disagree = triage.score(triage.urgency("low", 0.05, sure, True), now, now)
    assert high > unsure > low and disagree > low
    # Waiting counts: a low-risk case that has waited long enough overtakes a fresh one of the same kind...
    waited = triage.score(triage.urgency("low", 0.05, sure, False), now - 48 * 3_600_000, now)
    assert waited > low
    # ... and the order of stored scores does not change as time passes (scores are never rewritten).
    later = now + 10 * 3_600_000
    assert triage.score(1.0, now, later) == triage.score(1.0, now, now)


def test_device_cloud_disagreement():
    device = {"top": [{"label": "nv", "p": 0.9}], "risk": "low"}
    assert not triage.disagrees(device, "nv", "low")
    assert triage.disagrees(device, "mel", "high")
    assert triage.disagrees(device, "nv", "moderate")
    assert not triage.disagrees(None, "mel", "high")


def test_heatmap_overlay_matches_the_analysis_module(model):
    """The worker's fast overlay (lookup tables) draws what ``gradcam.overlay`` draws."""
    import io

    from cloud_worker.pipeline import heatmap_png
    from dermaloop.analysis.gradcam import overlay, place_in_frame
    from dermaloop.preprocess import crop_box

    item = prepare(lesion_jpeg(8), NoAnalysis())
    result = infer(model, [item])[0]
    fast = np.asarray(Image.open(io.BytesIO(heatmap_png(item, result))), np.float32)
    region = crop_box(item.image.width, item.image.height, None, model.preprocess)
    reference = np.asarray(overlay(item.image, place_in_frame(result.heatmap, item.image.size, region)), np.float32)
    assert fast.shape == reference.shape
    assert np.abs(fast - reference).max() <= 3.0  # 256 heat levels instead of continuous values


def test_the_local_model_is_the_newest_directory_with_a_cloud_model(tmp_path):
    import json
    import os

    from dermaloop.model_dir import newest_model_dir

    def card(name: str, body: dict, mtime: int) -> None:
        (tmp_path / name).mkdir()
        (tmp_path / name / "card.json").write_text(json.dumps(body))
        os.utime(tmp_path / name, (mtime, mtime))  # directories are ranked by their modification time

    assert newest_model_dir(tmp_path) is None
    card("older", {"device": {}, "cloud": {}}, 1_000)
    card("newest-device-only", {"device": {}}, 3_000)
    card("half.partial", {"cloud": {}}, 4_000)
    assert newest_model_dir(tmp_path) == tmp_path / "older"
    card("newer", {"cloud": {}}, 2_000)
    assert newest_model_dir(tmp_path) == tmp_path / "newer"
